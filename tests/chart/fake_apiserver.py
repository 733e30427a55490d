"""A minimal Kubernetes API server on loopback, just enough for Helm's install action.

libhelm_sdkpy exposes Helm's lint and install but no `helm template` and no dry-run option,
so tests/chart renders a chart by installing it against this server: Helm's own code renders
the templates, validates the values against values.schema.json, checks the cluster version
against Chart.yaml's kubeVersion, maps every kind through API discovery and sends each object;
this server answers discovery, says no object exists yet, and records what it was sent. The
release record Helm stores (a Secret) is accepted and ignored.

It serves only the API groups a workersd chart can use; an object of any other kind makes the
install fail, as it would on a cluster without that API.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KUBE_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}

# (group, version) -> [(plural, kind, namespaced)]
API_RESOURCES: dict[tuple[str, str], list[tuple[str, str, bool]]] = {
    ("", "v1"): [
        ("pods", "Pod", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
        ("namespaces", "Namespace", False),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True)],
    ("rbac.authorization.k8s.io", "v1"): [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor", True)],
    ("apiextensions.k8s.io", "v1"): [
        ("customresourcedefinitions", "CustomResourceDefinition", False)
    ],
    ("coordination.k8s.io", "v1"): [("leases", "Lease", True)],
    ("events.k8s.io", "v1"): [("events", "Event", True)],
}

_GROUP_VERSION = re.compile(r"/api/(v1)|/apis/([^/]+)/([^/]+)")
_SECRETS = re.compile(r"/api/v1/namespaces/[^/]+/secrets(/.*)?")


class FakeApiServer:
    """Start with `with FakeApiServer() as api:`; `api.url` is the server, `api.created` the
    objects received by POST (release-record Secrets excluded), in order."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body are separate writes: without this, Nagle's algorithm and
            # delayed ACKs add 40 ms to every response.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else {}

            def _not_found(self) -> None:
                self._reply(404, _status(404, "NotFound", f"{self.path} not found"))

            def do_GET(self):
                server._log("GET", self.path)
                path = self.path.split("?", 1)[0]
                if path == "/version":
                    return self._reply(200, KUBE_VERSION)
                if path == "/api":
                    return self._reply(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    return self._reply(200, _group_list())
                match = _GROUP_VERSION.fullmatch(path)
                if match:
                    gv = ("", "v1") if match.group(1) else (match.group(2), match.group(3))
                    if gv in API_RESOURCES:
                        return self._reply(200, _resource_list(*gv))
                    return self._not_found()
                if _SECRETS.fullmatch(path) and not _SECRETS.fullmatch(path).group(1):
                    # Helm's release history: no release yet.
                    return self._reply(
                        200, {"kind": "SecretList", "apiVersion": "v1", "items": [], "metadata": {}}
                    )
                return self._not_found()  # no object exists yet

            def _store(self, code: int) -> None:
                path = self.path.split("?", 1)[0]
                if _SECRETS.fullmatch(path):
                    # Helm's release record, sent as protobuf: accepted, not kept.
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length)
                    obj = {"kind": "Secret", "apiVersion": "v1", "metadata": {}}
                else:
                    obj = self._body()
                    with server._lock:
                        server.created.append(json.loads(json.dumps(obj)))
                meta = obj.setdefault("metadata", {})
                meta.setdefault("uid", "00000000-0000-4000-8000-000000000001")
                meta["resourceVersion"] = "1"
                self._reply(code, obj)

            def do_POST(self):
                server._log("POST", self.path)
                self._store(201)

            def do_PUT(self):
                server._log("PUT", self.path)
                self._store(200)

            def do_PATCH(self):
                server._log("PATCH", self.path)
                self._reply(405, _status(405, "MethodNotAllowed", "not supported here"))

            def do_DELETE(self):
                server._log("DELETE", self.path)
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, namespace: str) -> str:
        """A kubeconfig (YAML text) pointing at this server."""
        return (
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            f"- name: fake\n  cluster: {{server: \"{self.url}\"}}\n"
            "contexts:\n"
            f"- name: fake\n  context: {{cluster: fake, user: fake, namespace: {namespace}}}\n"
            "current-context: fake\n"
            "users:\n"
            "- name: fake\n  user: {token: fake}\n"
        )

    @staticmethod
    def offline_kubeconfig() -> str:
        """A kubeconfig for actions that never call the API (lint): port 9 on loopback."""
        return (
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: none\n  cluster: {server: \"http://127.0.0.1:9\"}\n"
            "contexts:\n"
            "- name: none\n  context: {cluster: none, user: none, namespace: default}\n"
            "current-context: none\n"
            "users:\n"
            "- name: none\n  user: {token: none}\n"
        )

    def __enter__(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


def _group_list() -> dict:
    groups: dict[str, list[str]] = {}
    for group, version in API_RESOURCES:
        if group:
            groups.setdefault(group, []).append(version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
            }
            for group, versions in groups.items()
        ],
    }


def _resource_list(group: str, version: str) -> dict:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [
            {
                "name": plural,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            }
            for plural, kind, namespaced in API_RESOURCES[(group, version)]
        ],
    }
