"""Start a fake_kube server as a subprocess and drive it (stdlib only).

    from fake_kube.client import FakeKube, make_pod      # with tests/support on sys.path

    with FakeKube(tmp_path, bookmark_interval=1.0) as fk:
        fk.kubeconfig            # path of a kubeconfig for kubectl / kube-rs (KUBECONFIG=...)
        fk.url                   # http://127.0.0.1:PORT
        fk.api("POST", "/api/v1/namespaces", {"metadata": {"name": "demo"}})
        fk.bulk_pods("demo", 100, annotations={"workersd.io/service": "web"})
        fk.set_pod_status("demo", "pod-0", podIP="127.0.0.2", phase="Running", ready=True)
        fk.wait_for_watch("pods")          # until a client (the controller) watches pods
        fk.create_node("n1", internal_ip="127.0.1.1")            # a Ready core/v1 Node
        fk.create_pod("demo", "web-0", node_name="n1", ip="127.0.1.2")   # bound to it, Running
        fk.delete_node("n1"); fk.podgc()   # the pod GC controller's orphan pass, on demand
        fk.compact(); fk.drop_watches(); fk.requests()

Every wait is bounded; stop() (or leaving the with block) kills the process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

SERVER_PY = Path(__file__).resolve().parent / "server.py"

# Never send loopback traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiResponse:
    def __init__(self, status, body: bytes, headers):
        self.status = status
        self.body = body
        self.headers = headers

    def json(self):
        return json.loads(self.body) if self.body else None

    def __repr__(self):
        return f"ApiResponse({self.status}, {self.body[:200]!r})"


class FakeKube:
    def __init__(self, workdir=None, *, bookmark_interval=None, history_limit=None, graceful_deletion=False,
                 auto_create_namespaces=False, seeds=(), extra_args=(), log_requests=False,
                 python=sys.executable, host="127.0.0.1", workermetrics_crd=True, watch_list=False):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fake-kube-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = str(self.workdir / "kubeconfig")
        self.ready_file = self.workdir / "fake-kube.url"
        self.log_path = self.workdir / "fake-kube.log"
        args = [python, str(SERVER_PY), "--listen", f"{host}:0", "--ready-file", str(self.ready_file),
                "--kubeconfig-out", self.kubeconfig]
        if bookmark_interval is not None:
            args += ["--bookmark-interval", str(bookmark_interval)]
        if history_limit is not None:
            args += ["--history-limit", str(history_limit)]
        if graceful_deletion:
            args.append("--graceful-deletion")
        if not workermetrics_crd:
            args.append("--no-workermetrics-crd")
        if watch_list:
            args.append("--watch-list")
        if auto_create_namespaces:
            args.append("--auto-create-namespaces")
        if log_requests:
            args.append("--log-requests")
        for s in seeds:
            args += ["--seed", str(s)]
        self.args = args + list(extra_args)
        self.proc = None
        self.url = None

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout=20.0):
        if self.ready_file.exists():
            self.ready_file.unlink()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake_kube exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready_file.exists():
                text = self.ready_file.read_text().strip()
                if text:
                    self.url = text
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake_kube not ready within {timeout}s: {self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    # -- raw API ----------------------------------------------------------------

    def api(self, method, path, body=None, *, content_type="application/json", query=None, timeout=30.0,
            headers=None) -> ApiResponse:
        url = self.url + path
        if query:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                return ApiResponse(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return ApiResponse(e.code, e.read(), dict(e.headers))

    def ok(self, method, path, body=None, **kw):
        r = self.api(method, path, body, **kw)
        if r.status >= 300:
            raise AssertionError(f"{method} {path} -> {r.status}: {r.body[:500]!r}")
        return r.json()

    # -- controls ---------------------------------------------------------------

    def compact(self, resource=None):
        return self.ok("POST", "/_control/compact", query={"resource": resource} if resource else None)

    def drop_watches(self, resource=None, mode="reset"):
        q = {"mode": mode}
        if resource:
            q["resource"] = resource
        return self.ok("POST", "/_control/drop-watches", query=q)["dropped"]

    def watches(self, resource=None):
        ws = self.ok("GET", "/_control/watches")["watches"]
        return [w for w in ws if resource is None or resource in (w["resource"], w["resource"].split(".")[0])]

    def wait_for_watch(self, resource, timeout=30.0, count=1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ws = self.watches(resource)
            if len(ws) >= count:
                return ws
            time.sleep(0.05)
        raise AssertionError(f"no watch on {resource} within {timeout}s; open watches: {self.watches()}")

    def requests(self):
        return self.ok("GET", "/_control/requests")

    def reset_requests(self):
        return self.ok("POST", "/_control/requests/reset")

    def add_fault(self, path, code=500, count=1, method="*", verb=None, retry_after=None, delay=None, message=None):
        body = {"path": path, "code": code, "count": count, "method": method}
        for k, v in (("verb", verb), ("retryAfterSeconds", retry_after), ("delaySeconds", delay), ("message", message)):
            if v is not None:
                body[k] = v
        return self.ok("POST", "/_control/faults", body)

    def clear_faults(self):
        return self.ok("DELETE", "/_control/faults")

    def config(self, **kw):
        return self.ok("POST", "/_control/config", kw) if kw else self.ok("GET", "/_control/config")

    def set_latency(self, list=None, page=None, watch=None, resources=None):
        """Latency (seconds) of lists (once per list), of every list page, and before a watch
        starts; `resources` (plurals or plural.group) limits it to those, [] = all."""
        body = {}
        for k, v in (("listLatencySeconds", list), ("listPageLatencySeconds", page), ("watchLatencySeconds", watch),
                     ("latencyResources", resources)):
            if v is not None:
                body[k] = v
        return self.config(**body)

    def writes(self, resource=None):
        """Every write (time.time(), resourceVersion, type, object), oldest first; never compacted."""
        return self.ok("GET", "/_control/writes", query={"resource": resource} if resource else None)["writes"]

    def state(self, resource=None):
        return self.ok("GET", "/_control/state", query={"resource": resource} if resource else None)

    def set_pod_status(self, namespace, name, **fields):
        """fields: podIP, hostIP, phase, ready, running, restartCount, nodeName, containerStatuses,
        initContainerStatuses, status (raw merge)."""
        return self.ok("POST", f"/_control/pods/{namespace}/{name}/status", fields)

    def terminate_pod(self, namespace, name, grace_period_seconds=30):
        """Graceful deletion (deletionTimestamp set); None = until finalize_pod()."""
        return self.ok("POST", f"/_control/pods/{namespace}/{name}/terminate",
                       {"gracePeriodSeconds": grace_period_seconds})

    def finalize_pod(self, namespace, name):
        return self.ok("POST", f"/_control/pods/{namespace}/{name}/finalize")

    def create_node(self, name, **kw):
        """POST a Node (make_node keywords); a Node keeps the status it is created with."""
        return self.ok("POST", "/api/v1/nodes", make_node(name, **kw))

    def delete_node(self, name):
        """Delete a Node; its pods stay until podgc() (no controller runs on its own)."""
        return self.ok("DELETE", f"/api/v1/nodes/{name}")

    def podgc(self):
        """One orphan pass of the pod GC controller: pods bound to a missing Node are marked
        Failed, then deleted. Returns their "namespace/name"s."""
        return self.ok("POST", "/_control/podgc")["deleted"]

    def create_pod(self, namespace, name, *, ip=None, running=True, ready=True, **kw):
        """POST a pod (make_pod keywords, e.g. node_name=) and, with `ip`, give it a Running
        status with that podIP through the control API (a create drops the status)."""
        pod = self.ok("POST", f"/api/v1/namespaces/{namespace}/pods", make_pod(name, namespace, **kw))
        if ip is not None:
            st = pod_status(ip, running=running, ready=ready, pod=pod)
            pod = self.set_pod_status(namespace, name, status=st)
        return pod

    def bulk(self, objects, upsert=False, create_namespaces=True, timeout=120.0):
        return self.ok("POST", "/_control/bulk", {"objects": objects, "upsert": upsert,
                                                  "createNamespaces": create_namespaces}, timeout=timeout)

    def bulk_pods(self, namespace, count, *, prefix="pod", start=0, labels=None, annotations=None,
                  ip=None, running=True, ready=True, node_name=None, containers=1, batch=2500):
        """Create `count` pods named {prefix}-{i}; ip(i) -> podIP (default none, i.e. Pending)."""
        created = 0
        for lo in range(start, start + count, batch):
            objs = []
            for i in range(lo, min(start + count, lo + batch)):
                pod = make_pod(f"{prefix}-{i}", namespace, labels=labels, annotations=annotations,
                               containers=containers, node_name=node_name)
                if ip is not None:
                    pod["status"] = pod_status(ip(i), running=running, ready=ready, pod=pod)
                objs.append(pod)
            created += self.bulk(objs)["created"]
        return created


def make_pod(name, namespace="default", *, labels=None, annotations=None, containers=1, image="busybox",
             node_name=None, ports=None):
    spec = {"containers": [{"name": f"c{j}" if containers > 1 else "app", "image": image} for j in range(containers)]}
    if ports:
        spec["containers"][0]["ports"] = [{"containerPort": p} for p in ports]
    if node_name:
        spec["nodeName"] = node_name
    meta = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def make_node(name, *, ready=True, labels=None, internal_ip=None, unschedulable=False, taints=None,
              pod_cidr=None, kubelet_version="v1.30.0"):
    """A core/v1 Node as a kubelet registers it: a Ready condition (True/False), nodeInfo and
    an InternalIP address."""
    meta = {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}
    spec = {}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = list(taints)
    if pod_cidr:
        spec["podCIDR"] = pod_cidr
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastHeartbeatTime": t,
                              "lastTransitionTime": t, "reason": "KubeletReady" if ready else "KubeletNotReady"}],
              "nodeInfo": {"kubeletVersion": kubelet_version}}
    if internal_ip:
        status["addresses"] = [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}]
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec, "status": status}


def pod_status(ip, *, running=True, ready=True, pod=None, restart_count=0):
    names = [c["name"] for c in (pod or {}).get("spec", {}).get("containers", [])] or ["app"]
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cs = [{"name": n, "image": "busybox", "imageID": "", "ready": bool(ready and running), "started": running,
           "restartCount": restart_count, "state": {"running": {"startedAt": t}} if running else {"waiting": {"reason": "ContainerCreating"}},
           "lastState": {}} for n in names]
    ok = "True" if ready and running else "False"
    st = {"phase": "Running" if running else "Pending", "containerStatuses": cs,
          "conditions": [{"type": "Ready", "status": ok, "lastProbeTime": None, "lastTransitionTime": t},
                         {"type": "ContainersReady", "status": ok, "lastProbeTime": None, "lastTransitionTime": t}]}
    if ip:
        st["podIP"] = ip
        st["podIPs"] = [{"ip": ip}]
        st["hostIP"] = "127.0.0.1"
    if running:
        st["startTime"] = t
    return st


if __name__ == "__main__":  # tiny manual check: python3 client.py
    with FakeKube() as fk:
        print(fk.url, fk.kubeconfig)
        print(fk.api("GET", "/api/v1/namespaces").status)
