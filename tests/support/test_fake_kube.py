"""Fidelity tests for the fake Kubernetes API server (tests/support/fake_kube).

Part 1 drives it with a REAL kubectl (Debian's kubernetes-client, kubectl 1.20; install
with tests/support/install_kubectl.sh; KUBECTL=/path overrides). Part 2 checks the API
conventions directly over HTTP. Everything runs on 127.0.0.1 and every wait is bounded.

    python3 -m pytest tests/support -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_kube.client import FakeKube, make_pod  # noqa: E402

HERE = Path(__file__).resolve().parent
NO_PROXY = {"http": None, "https": None}


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def fk(tmp_path):
    server = FakeKube(tmp_path / "fk", bookmark_interval=0.5)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def debian_kubectl():
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    unpacked = "/opt/kubernetes-client/usr/bin/kubectl"
    if os.access(unpacked, os.X_OK):
        return unpacked
    if subprocess.run(["dpkg", "-s", "kubernetes-client"], capture_output=True).returncode == 0:
        return "/usr/bin/kubectl"
    return None


@pytest.fixture(scope="session")
def kubectl_bin():
    k = debian_kubectl()
    if not k:
        pytest.fail("Debian's kubectl (package kubernetes-client) is not installed: run "
                    "`bash tests/support/install_kubectl.sh` (or set KUBECTL=/path/to/kubectl)")
    out = subprocess.run([k, "version", "--client"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{k} version --client failed: {out.stderr}"
    return k


class Kubectl:
    def __init__(self, binary, fk, tmp_path):
        self.binary = binary
        self.fk = fk
        self.base = [binary, "--kubeconfig", fk.kubeconfig, "--cache-dir", str(tmp_path / "kcache")]

    def __call__(self, *args, check=True, timeout=60, input=None):
        p = subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} -> rc {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}\n"
                                 f"server log: {self.fk.log_tail()}")
        return p

    def json(self, *args):
        return json.loads(self(*args, "-o", "json").stdout)


@pytest.fixture
def kubectl(kubectl_bin, fk, tmp_path):
    return Kubectl(kubectl_bin, fk, tmp_path)


def json_stream(text):
    dec = json.JSONDecoder()
    i, out = 0, []
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            break  # a partial document at the end
        out.append(obj)
    return out


def http(fk, method, path, body=None, ctype="application/json", **params):
    data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
    return requests.request(method, fk.url + path, params=params or None, data=data,
                            headers={"Content-Type": ctype} if data is not None else {}, timeout=30, proxies=NO_PROXY)


def watch(fk, path, *, timeout_seconds=3, max_events=None, stop=None, **params):
    """Read a watch stream until it ends (timeoutSeconds), max_events, or stop(event) is true."""
    params = dict(params, watch="true", timeoutSeconds=str(timeout_seconds))
    events = []
    t0 = time.time()
    with requests.get(fk.url + path, params=params, stream=True, timeout=(5, timeout_seconds + 10),
                      proxies=NO_PROXY) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            events.append(ev)
            if (max_events and len(events) >= max_events) or (stop and stop(ev)):
                break
            assert time.time() - t0 < timeout_seconds + 10, "watch did not end in time"
    return events


def ensure_ns(fk, name):
    r = http(fk, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert r.status_code in (201, 409), r.text


def create_pod(fk, ns, name, **kw):
    r = http(fk, "POST", f"/api/v1/namespaces/{ns}/pods", make_pod(name, ns, **kw))
    assert r.status_code == 201, r.text
    return r.json()


WM = {
    "apiVersion": "workersd.io/v1alpha1",
    "kind": "WorkerMetrics",
    "metadata": {"name": "web", "namespace": "demo"},
    "spec": {"service": "web", "selector": {"matchLabels": {"app": "web"}},
             "containers": [{"name": "app", "ports": "9100-9103"}]},
}
WM_PATH = "/apis/workersd.io/v1alpha1/namespaces/demo/workermetrics"


# ---------------------------------------------------------------------------
# Part 1: a real kubectl
# ---------------------------------------------------------------------------


def test_kubectl_discovery_and_empty_lists(kubectl):
    v = kubectl("version")
    assert "v1.30.0-fake-kube" in v.stdout
    pods = kubectl.json("get", "pods", "-A")
    assert pods["kind"] == "List" and pods["items"] == []
    res = kubectl("api-resources").stdout
    for line in ("workermetrics", "leases", "events", "pods", "namespaces", "customresourcedefinitions"):
        assert line in res, res
    wm_line = [l for l in res.splitlines() if l.startswith("workermetrics")][0]
    assert "workersd.io/v1alpha1" in wm_line and "true" in wm_line and "WorkerMetrics" in wm_line
    ns = kubectl.json("get", "namespaces")
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in ns["items"]}
    crd = kubectl.json("get", "crd", "workermetrics.workersd.io")
    assert crd["spec"]["names"]["kind"] == "WorkerMetrics"


def test_kubectl_apply_annotate_delete_and_watch(kubectl, fk, tmp_path):
    kubectl("create", "namespace", "demo")
    out_path = tmp_path / "watch.out"
    with open(out_path, "w") as out:
        watcher = subprocess.Popen(kubectl.base + ["get", "pods", "-n", "demo", "--watch", "-o", "json",
                                                   "--output-watch-events", "--request-timeout=40s"],
                                   stdout=out, stderr=subprocess.PIPE, text=True)
    try:
        fk.wait_for_watch("pods", timeout=30)
        pod_yaml = tmp_path / "pod.yaml"
        pod_yaml.write_text(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {app: web}\n"
            "  annotations:\n    workersd.io/service: web\n    workersd.io/ports: \"9100-9103\"\n"
            "spec:\n  containers:\n  - name: app\n    image: busybox\n    ports: [{containerPort: 8080}]\n")
        assert "pod/web-1 created" in kubectl("apply", "-f", str(pod_yaml)).stdout
        wm_yaml = tmp_path / "wm.yaml"
        wm_yaml.write_text(json.dumps(WM))
        assert "workermetrics.workersd.io/web created" in kubectl("apply", "-f", str(wm_yaml)).stdout

        wms = kubectl.json("get", "workermetrics", "-n", "demo")
        assert [w["metadata"]["name"] for w in wms["items"]] == ["web"]
        assert wms["items"][0]["metadata"]["generation"] == 1
        table = kubectl("get", "workermetrics", "-n", "demo").stdout
        # the repository CRD's printer columns (no extra Age column: the CRD declares one)
        assert table.split()[:7] == ["NAME", "SERVICE", "PODS", "ENDPOINTS", "AGE", "web", "web"], table

        kubectl("annotate", "pod", "web-1", "-n", "demo", "workersd.io/ports=9200", "--overwrite")
        pod = kubectl.json("get", "pod", "web-1", "-n", "demo")
        assert pod["metadata"]["annotations"]["workersd.io/ports"] == "9200"
        assert pod["status"]["phase"] == "Pending"

        # re-apply with a changed image: a strategic merge patch on containers[name=app]
        pod_yaml.write_text(pod_yaml.read_text().replace("image: busybox", "image: busybox:2"))
        assert "configured" in kubectl("apply", "-f", str(pod_yaml)).stdout
        pod = kubectl.json("get", "pod", "web-1", "-n", "demo")
        assert pod["spec"]["containers"] == [{"name": "app", "image": "busybox:2", "ports": [{"containerPort": 8080}]}]
        # three-way apply re-asserts the declared value and keeps what it never declared
        assert pod["metadata"]["annotations"]["workersd.io/ports"] == "9100-9103"
        assert "kubectl.kubernetes.io/last-applied-configuration" in pod["metadata"]["annotations"]
        assert pod["metadata"]["generation"] == 2

        assert 'pod "web-1" deleted' in kubectl("delete", "pod", "web-1", "-n", "demo").stdout
        assert kubectl("get", "pod", "web-1", "-n", "demo", check=False).returncode != 0

        deadline = time.time() + 20
        events = []
        while time.time() < deadline:
            events = json_stream(out_path.read_text())
            if any(e.get("type") == "DELETED" for e in events):
                break
            time.sleep(0.1)
    finally:
        watcher.terminate()
        try:
            watcher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait(timeout=10)
    types = [e["type"] for e in events]
    assert types == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"], (types, watcher.stderr.read() if watcher.stderr else "")
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4
    assert events[1]["object"]["metadata"]["annotations"]["workersd.io/ports"] == "9200"
    assert events[3]["object"]["metadata"]["name"] == "web-1"


def test_kubectl_human_tables_status_and_events(kubectl, fk):
    ensure_ns(fk, "demo")
    create_pod(fk, "demo", "p1", labels={"app": "web"})
    fk.set_pod_status("demo", "p1", podIP="127.0.0.7", phase="Running", ready=True, restartCount=2)
    out = kubectl("get", "pods", "-n", "demo", "-o", "wide").stdout.split("\n")
    assert out[0].split()[:6] == ["NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"], out
    assert out[1].split()[:5] == ["p1", "1/1", "Running", "2", "127.0.0.7"], out
    sel = kubectl.json("get", "pods", "-A", "-l", "app in (web,api)", "--field-selector", "status.phase=Running")
    assert [p["metadata"]["name"] for p in sel["items"]] == ["p1"]
    bad = kubectl("get", "pods", "-A", "--field-selector", "spec.bogus=1", check=False)
    assert bad.returncode != 0 and "field label not supported: spec.bogus" in bad.stderr
    # an events.k8s.io/v1 Event (what kube-rs' Recorder writes) is visible as a core/v1 Event
    ev = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
          "metadata": {"name": "p1.abc", "namespace": "demo"},
          "eventTime": "2024-01-01T00:00:00.000000Z", "reportingController": "workersd.io/controller",
          "reportingInstance": "workersd-0", "action": "Probe", "reason": "NoLiveWorkers", "type": "Warning",
          "note": "no worker answered", "regarding": {"kind": "Pod", "namespace": "demo", "name": "p1",
                                                      "apiVersion": "v1"}}
    assert http(fk, "POST", "/apis/events.k8s.io/v1/namespaces/demo/events", ev).status_code == 201
    evs = kubectl.json("get", "events", "-n", "demo", "--field-selector", "involvedObject.name=p1")
    assert [(e["reason"], e["message"], e["involvedObject"]["name"], e["reportingComponent"]) for e in evs["items"]] == \
        [("NoLiveWorkers", "no worker answered", "p1", "workersd.io/controller")]


def test_kubectl_apply_custom_resource_update_and_spec_rules(kubectl, fk, tmp_path):
    kubectl("create", "namespace", "demo")
    f = tmp_path / "wm.yaml"
    f.write_text(json.dumps(WM))
    kubectl("apply", "-f", str(f))
    wm2 = json.loads(json.dumps(WM))
    wm2["spec"]["containers"][0]["ports"] = "9100-9107"
    f.write_text(json.dumps(wm2))
    assert "configured" in kubectl("apply", "-f", str(f)).stdout
    got = kubectl.json("get", "workermetrics", "web", "-n", "demo")
    assert got["spec"]["containers"][0]["ports"] == "9100-9107" and got["metadata"]["generation"] == 2
    # pods' specs are immutable apart from images (like the real server)
    create_pod(fk, "demo", "p1")
    r = kubectl("patch", "pod", "p1", "-n", "demo", "--type=merge", "-p", '{"spec":{"restartPolicy":"Never"}}', check=False)
    assert r.returncode != 0 and "Forbidden: pod updates may not change fields" in r.stderr
    r = kubectl("create", "-f", "-", check=False, input=json.dumps(make_pod("x", "nowhere")))
    assert r.returncode != 0 and 'namespaces "nowhere" not found' in r.stderr


def test_kubectl_custom_resources_follow_the_crd_schema(kubectl, fk, tmp_path):
    """The repository's CRD schema is enforced as by apiextensions-apiserver: types, required
    fields and minimums -> 422 naming the field; unknown fields and non-nullable nulls pruned."""
    kubectl("create", "namespace", "demo")
    f = tmp_path / "wm.yaml"
    bad = json.loads(json.dumps(WM))
    bad["spec"]["containers"][0]["ports"] = 9100  # an integer where the schema says string
    del bad["spec"]["service"]
    f.write_text(json.dumps(bad))
    r = kubectl("apply", "-f", str(f), check=False)
    assert r.returncode != 0
    assert ('spec.containers[0].ports: Invalid value: "integer": spec.containers[0].ports in body must be of type '
            'string: "integer"') in r.stderr, r.stderr
    assert "spec.service: Required value" in r.stderr, r.stderr
    assert kubectl("get", "workermetrics", "-n", "demo", "-o", "name").stdout.strip() == ""
    # the field paths are in the Status causes, as clients read them
    resp = http(fk, "POST", WM_PATH, bad)
    assert resp.status_code == 422 and resp.json()["reason"] == "Invalid"
    causes = {(c["field"], c["reason"]) for c in resp.json()["details"]["causes"]}
    assert causes == {("spec.containers[0].ports", "FieldValueTypeInvalid"), ("spec.service", "FieldValueRequired")}
    assert resp.json()["message"].startswith('WorkerMetrics.workersd.io "web" is invalid: [')

    extra = json.loads(json.dumps(WM))
    extra["spec"]["bogus"] = True
    extra["spec"]["containers"][0]["extra"] = 1
    extra["spec"]["meta"] = None  # not nullable, no default: pruned
    extra["spec"]["path"] = None  # nullable: kept
    # unknown fields: fieldValidation=Strict (kubectl >= 1.27's default) is refused ...
    f.write_text(json.dumps(extra))
    resp = requests.post(fk.url + WM_PATH, params={"fieldValidation": "Strict"}, json=extra, timeout=30,
                         proxies=NO_PROXY)
    assert resp.status_code == 400 and "strict decoding error: " in resp.json()["message"]
    assert 'unknown field "spec.bogus"' in resp.json()["message"]
    # ... and the server's default (Warn; kubectl 1.20 sends no directive) prunes them, warning for each
    r = kubectl("apply", "-f", str(f))
    assert 'unknown field "spec.bogus"' in r.stderr and 'unknown field "spec.containers[0].extra"' in r.stderr
    got = kubectl.json("get", "workermetrics", "web", "-n", "demo")["spec"]
    assert "bogus" not in got and got["containers"] == [{"name": "app", "ports": "9100-9103"}]
    assert "meta" not in got and "path" in got and got["path"] is None

    # status writes are validated too (matchedPods has minimum 0), and defaults fill the rest
    # (kubectl 1.20 has no --subresource: over HTTP)
    status_path = f"{WM_PATH}/web/status"
    resp = http(fk, "PATCH", status_path, {"status": {"matchedPods": -1}}, "application/merge-patch+json")
    assert resp.status_code == 422
    assert "status.matchedPods in body should be greater than or equal to 0" in resp.json()["message"], resp.json()
    resp = http(fk, "PATCH", status_path, {"status": {"matchedPods": 2}}, "application/merge-patch+json")
    assert resp.status_code == 200
    st = kubectl.json("get", "workermetrics", "web", "-n", "demo")["status"]
    assert st == {"matchedPods": 2, "liveEndpoints": 0}, st
    table = kubectl("get", "workermetrics", "-n", "demo").stdout.split()
    assert table[:9] == ["NAME", "SERVICE", "PODS", "ENDPOINTS", "AGE", "web", "web", "2", "0"], table


def test_kubectl_native_sidecar_pods(kubectl, fk, tmp_path):
    """Native sidecars (KEP-753): an init container with restartPolicy Always; its state is in
    status.initContainerStatuses; restartPolicy on a regular container, or another value on
    an init container, is refused (core/v1 validation)."""
    kubectl("create", "namespace", "demo")
    pod = make_pod("web-1", "demo")
    pod["spec"]["initContainers"] = [{"name": "setup", "image": "busybox"},
                                     {"name": "metrics", "image": "exporter", "restartPolicy": "Always"}]
    f = tmp_path / "pod.yaml"
    f.write_text(json.dumps(pod))
    assert "pod/web-1 created" in kubectl("apply", "-f", str(f)).stdout
    fk.set_pod_status("demo", "web-1", podIP="127.0.0.9", phase="Running", running=True, ready=True)
    got = kubectl.json("get", "pod", "web-1", "-n", "demo")
    ics = {c["name"]: c for c in got["status"]["initContainerStatuses"]}
    assert list(ics) == ["setup", "metrics"]
    assert "running" in ics["metrics"]["state"] and ics["metrics"]["started"] is True
    assert ics["setup"]["state"]["terminated"]["reason"] == "Completed"
    assert [c["name"] for c in got["status"]["containerStatuses"]] == [c["name"] for c in pod["spec"]["containers"]]
    row = kubectl("get", "pod", "web-1", "-n", "demo", "--no-headers").stdout.split()
    assert row[1] == f"{len(pod['spec']['containers']) + 1}/{len(pod['spec']['containers']) + 1}", row

    bad = make_pod("bad", "demo")
    bad["spec"]["containers"][0]["restartPolicy"] = "Always"
    bad["spec"]["initContainers"] = [{"name": "i", "image": "x", "restartPolicy": "OnFailure"}]
    r = kubectl("create", "-f", "-", check=False, input=json.dumps(bad))
    assert r.returncode != 0
    assert "spec.containers[0].restartPolicy: Forbidden: may not be set for non-init containers" in r.stderr, r.stderr
    assert 'spec.initContainers[0].restartPolicy: Unsupported value: "OnFailure"' in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# Part 2: API conventions over HTTP
# ---------------------------------------------------------------------------


def test_resource_versions_are_one_increasing_counter(fk):
    ensure_ns(fk, "demo")
    rvs = [int(create_pod(fk, "demo", f"p{i}")["metadata"]["resourceVersion"]) for i in range(3)]
    lease = http(fk, "POST", "/apis/coordination.k8s.io/v1/namespaces/demo/leases",
                 {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}).json()
    rvs.append(int(lease["metadata"]["resourceVersion"]))
    wm = http(fk, "POST", WM_PATH, WM).json()
    rvs.append(int(wm["metadata"]["resourceVersion"]))
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    lst = http(fk, "GET", "/api/v1/pods").json()
    assert lst["kind"] == "PodList" and lst["apiVersion"] == "v1"
    assert int(lst["metadata"]["resourceVersion"]) >= rvs[-1]
    for p in lst["items"]:
        assert p["kind"] == "Pod" and p["metadata"]["uid"] and p["metadata"]["creationTimestamp"]
    assert http(fk, "GET", WM_PATH).json()["kind"] == "WorkerMetricsList"


def test_watch_from_resource_version_replays_in_order_and_times_out(fk):
    ensure_ns(fk, "demo")
    a = create_pod(fk, "demo", "a")
    rv0 = a["metadata"]["resourceVersion"]
    http(fk, "PATCH", "/api/v1/namespaces/demo/pods/a", {"metadata": {"labels": {"x": "1"}}},
         "application/merge-patch+json")
    create_pod(fk, "demo", "b")
    http(fk, "DELETE", "/api/v1/namespaces/demo/pods/a")
    t0 = time.time()
    evs = watch(fk, "/api/v1/namespaces/demo/pods", resourceVersion=rv0, timeout_seconds=1)
    assert 0.9 <= time.time() - t0 < 5, "timeoutSeconds must end the stream"
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and rvs[0] > int(rv0)
    # resourceVersion unset (and "0"): synthetic ADDED for the current state first
    for rv in (None, "0"):
        extra = {"resourceVersion": rv} if rv is not None else {}
        evs = watch(fk, "/api/v1/pods", timeout_seconds=1, **extra)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "b")]


def test_watch_live_events_and_selector_transitions(fk):
    ensure_ns(fk, "demo")
    create_pod(fk, "demo", "a", labels={"app": "web"})
    got = []

    def run():
        got.extend(watch(fk, "/api/v1/pods", labelSelector="app=web", timeout_seconds=4, max_events=4))

    t = threading.Thread(target=run)
    t.start()
    fk.wait_for_watch("pods", timeout=10)
    p = "/api/v1/namespaces/demo/pods/a"
    http(fk, "PATCH", p, {"metadata": {"labels": {"app": "api"}}}, "application/merge-patch+json")  # leaves
    http(fk, "PATCH", p, {"metadata": {"labels": {"app": "web"}}}, "application/merge-patch+json")  # enters
    create_pod(fk, "demo", "other", labels={"app": "api"})  # never matches
    t.join(timeout=15)
    assert not t.is_alive()
    assert [e["type"] for e in got] == ["ADDED", "DELETED", "ADDED"]
    # the DELETED carries the previous content at the event's resourceVersion (like the watch cache)
    assert got[1]["object"]["metadata"]["labels"] == {"app": "web"}
    assert int(got[1]["object"]["metadata"]["resourceVersion"]) > int(got[0]["object"]["metadata"]["resourceVersion"])


def test_bookmarks(fk):
    ensure_ns(fk, "demo")
    create_pod(fk, "demo", "a")
    rv = http(fk, "GET", "/api/v1/pods").json()["metadata"]["resourceVersion"]
    evs = watch(fk, "/api/v1/pods", resourceVersion=rv, allowWatchBookmarks="true", timeout_seconds=5,
                stop=lambda e: e["type"] == "BOOKMARK")
    bm = evs[-1]
    assert bm["type"] == "BOOKMARK"
    assert set(bm["object"]) == {"kind", "apiVersion", "metadata"} and bm["object"]["kind"] == "Pod"
    assert int(bm["object"]["metadata"]["resourceVersion"]) >= int(rv)
    # no bookmarks unless asked
    evs = watch(fk, "/api/v1/pods", resourceVersion=rv, timeout_seconds=1.5)
    assert evs == []
    # streaming list (sendInitialEvents): refused while the WatchList gate is off (1.30's default) ...
    streaming = dict(watch="true", sendInitialEvents="true", resourceVersionMatch="NotOlderThan",
                     allowWatchBookmarks="true", timeoutSeconds="5")
    off = http(fk, "GET", "/api/v1/pods", **streaming)
    assert off.status_code == 422 and off.json()["reason"] == "Invalid"
    assert off.json()["message"] == ('ListOptions.meta.k8s.io "" is invalid: sendInitialEvents: Forbidden: '
                                     "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled")
    assert off.json()["details"]["causes"][0]["field"] == "sendInitialEvents"
    # ... and served once it is on: ADDED..., then the initial-events-end bookmark
    assert http(fk, "POST", "/_control/config", {"watchList": True}).json()["watchList"] is True
    evs = watch(fk, "/api/v1/pods", sendInitialEvents="true", resourceVersionMatch="NotOlderThan",
                allowWatchBookmarks="true", timeout_seconds=5, stop=lambda e: e["type"] == "BOOKMARK")
    assert [e["type"] for e in evs] == ["ADDED", "BOOKMARK"]
    assert evs[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    bad = http(fk, "GET", "/api/v1/pods", watch="true", sendInitialEvents="true")
    assert bad.status_code == 422 and "resourceVersionMatch" in bad.json()["message"]


def test_compaction_gives_410_gone(fk):
    ensure_ns(fk, "demo")
    old_rv = create_pod(fk, "demo", "a")["metadata"]["resourceVersion"]
    create_pod(fk, "demo", "b")
    page = http(fk, "GET", "/api/v1/pods", limit="1").json()
    assert page["metadata"]["continue"]
    create_pod(fk, "demo", "c")  # the token's revision is now older than the compaction point
    fk.compact()
    evs = watch(fk, "/api/v1/pods", resourceVersion=old_rv, timeout_seconds=3)
    assert len(evs) == 1 and evs[0]["type"] == "ERROR"
    st = evs[0]["object"]
    assert (st["kind"], st["code"], st["reason"], st["status"]) == ("Status", 410, "Expired", "Failure")
    assert "too old resource version" in st["message"]
    r = http(fk, "GET", "/api/v1/pods", resourceVersion=old_rv, resourceVersionMatch="Exact")
    assert r.status_code == 410 and r.json()["reason"] == "Expired"
    r = http(fk, "GET", "/api/v1/pods", resourceVersion=old_rv, limit="10")  # legacy exact semantics
    assert r.status_code == 410
    r = http(fk, "GET", "/api/v1/pods", limit="1", **{"continue": page["metadata"]["continue"]})
    assert r.status_code == 410 and r.json()["reason"] == "Expired"
    # "not older than" semantics still serve the current state; a fresh RV watches fine
    assert len(http(fk, "GET", "/api/v1/pods", resourceVersion=old_rv).json()["items"]) == 3
    cur = http(fk, "GET", "/api/v1/pods").json()["metadata"]["resourceVersion"]
    assert watch(fk, "/api/v1/pods", resourceVersion=cur, timeout_seconds=1) == []


def test_history_limit_expires_old_watch_positions(tmp_path):
    with FakeKube(tmp_path / "fk", history_limit=8) as small:
        ensure_ns(small, "demo")
        first = create_pod(small, "demo", "p0")["metadata"]["resourceVersion"]
        for i in range(1, 30):
            create_pod(small, "demo", f"p{i}")
        evs = watch(small, "/api/v1/pods", resourceVersion=first, timeout_seconds=2)
        assert evs[0]["type"] == "ERROR" and evs[0]["object"]["code"] == 410
        recent = http(small, "GET", "/api/v1/namespaces/demo/pods/p27").json()["metadata"]["resourceVersion"]
        evs = watch(small, "/api/v1/pods", resourceVersion=recent, timeout_seconds=1)
        assert [e["object"]["metadata"]["name"] for e in evs] == ["p28", "p29"]
        # exact lists inside the horizon are reconstructed from history
        snap = http(small, "GET", "/api/v1/pods", resourceVersion=recent, resourceVersionMatch="Exact").json()
        assert len(snap["items"]) == 28 and snap["metadata"]["resourceVersion"] == recent


def test_optimistic_concurrency(fk):
    ensure_ns(fk, "demo")
    for path, body in (("/apis/coordination.k8s.io/v1/namespaces/demo/leases",
                        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
                         "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}),
                       (WM_PATH, WM)):
        created = http(fk, "POST", path, body)
        assert created.status_code == 201
        assert http(fk, "POST", path, body).json()["reason"] == "AlreadyExists"
        obj = created.json()
        name = obj["metadata"]["name"]
        stale = json.loads(json.dumps(obj))
        obj["spec"]["holderIdentity" if "holderIdentity" in obj["spec"] else "service"] = "b"
        r1 = http(fk, "PUT", f"{path}/{name}", obj)
        assert r1.status_code == 200, r1.text
        assert int(r1.json()["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
        r2 = http(fk, "PUT", f"{path}/{name}", stale)  # still the old resourceVersion
        assert r2.status_code == 409 and r2.json()["reason"] == "Conflict", r2.text
        assert "the object has been modified" in r2.json()["message"]
        r3 = http(fk, "PATCH", f"{path}/{name}", {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"],
                                                               "labels": {"x": "y"}}}, "application/merge-patch+json")
        assert r3.status_code == 409
        # a no-op write keeps the resourceVersion and emits nothing
        cur = r1.json()
        r4 = http(fk, "PUT", f"{path}/{name}", cur)
        assert r4.json()["metadata"]["resourceVersion"] == cur["metadata"]["resourceVersion"]
        # delete with a stale precondition -> 409, then for real
        r5 = http(fk, "DELETE", f"{path}/{name}", {"preconditions": {"resourceVersion": stale["metadata"]["resourceVersion"]}})
        assert r5.status_code == 409
        assert http(fk, "DELETE", f"{path}/{name}").status_code == 200
        assert http(fk, "GET", f"{path}/{name}").json()["reason"] == "NotFound"


def test_status_subresource_and_generation(fk):
    ensure_ns(fk, "demo")
    body = json.loads(json.dumps(WM))
    body["status"] = {"matchedPods": 3}
    wm = http(fk, "POST", WM_PATH, body).json()
    assert "status" not in wm and wm["metadata"]["generation"] == 1  # create drops status
    p = f"{WM_PATH}/web"
    # /status writes change only .status (liveEndpoints comes from the schema's default: 0)
    sub = json.loads(json.dumps(wm))
    sub["status"] = {"matchedPods": 2}
    sub["spec"]["service"] = "ignored"
    sub["metadata"]["labels"] = {"ignored": "yes"}
    r = http(fk, "PUT", p + "/status", sub).json()
    assert r["status"] == {"matchedPods": 2, "liveEndpoints": 0} and r["spec"]["service"] == "web"
    assert "labels" not in r["metadata"] and r["metadata"]["generation"] == 1
    r = http(fk, "PATCH", p + "/status", {"status": {"observedGeneration": 1}}, "application/merge-patch+json").json()
    assert r["status"] == {"matchedPods": 2, "liveEndpoints": 0, "observedGeneration": 1}
    assert http(fk, "GET", p + "/status").json()["status"]["matchedPods"] == 2
    # main-resource writes ignore .status; metadata changes do not bump generation
    r = http(fk, "PATCH", p, {"status": {"matchedPods": 99}, "metadata": {"labels": {"a": "b"}}},
             "application/merge-patch+json").json()
    assert r["status"]["matchedPods"] == 2 and r["metadata"]["labels"] == {"a": "b"} and r["metadata"]["generation"] == 1
    r = http(fk, "PATCH", p, {"spec": {"path": "/m"}}, "application/merge-patch+json").json()
    assert r["metadata"]["generation"] == 2 and r["spec"]["path"] == "/m"
    r = http(fk, "PATCH", p + "/status", [{"op": "replace", "path": "/status/matchedPods", "value": 5}],
             "application/json-patch+json").json()
    assert r["status"]["matchedPods"] == 5 and r["metadata"]["generation"] == 2
    # strategic merge patch is rejected for custom resources (like a CRD)
    assert http(fk, "PATCH", p, {"spec": {}}, "application/strategic-merge-patch+json").status_code == 415
    # pods: status via the subresource, not via the main resource
    create_pod(fk, "demo", "a")
    pp = "/api/v1/namespaces/demo/pods/a"
    assert http(fk, "PATCH", pp, {"status": {"podIP": "1.2.3.4"}}, "application/merge-patch+json").json()["status"].get("podIP") is None
    assert http(fk, "PATCH", pp + "/status", {"status": {"podIP": "127.0.0.9"}}, "application/merge-patch+json").json()["status"]["podIP"] == "127.0.0.9"


def test_label_and_field_selectors(fk):
    ensure_ns(fk, "a")
    ensure_ns(fk, "b")
    specs = [("a", "p1", {"app": "web", "tier": "fe"}, "n1"), ("a", "p2", {"app": "api"}, "n2"),
             ("b", "p3", {"app": "web"}, None), ("b", "p4", {}, "n1")]
    for ns, name, labels, node in specs:
        create_pod(fk, ns, name, labels=labels, node_name=node)
    fk.set_pod_status("a", "p1", podIP="127.0.0.2", phase="Running", ready=True)

    def names(**params):
        r = http(fk, "GET", "/api/v1/pods", **params)
        assert r.status_code == 200, r.text
        return sorted(p["metadata"]["name"] for p in r.json()["items"])

    assert names(labelSelector="app=web") == ["p1", "p3"]
    assert names(labelSelector="app==web,tier=fe") == ["p1"]
    assert names(labelSelector="app!=web") == ["p2", "p4"]
    assert names(labelSelector="app in (web, api)") == ["p1", "p2", "p3"]
    assert names(labelSelector="app notin (web)") == ["p2", "p4"]
    assert names(labelSelector="tier") == ["p1"]
    assert names(labelSelector="!app") == ["p4"]
    assert names(labelSelector="app,!tier") == ["p2", "p3"]
    assert names(fieldSelector="metadata.name=p2") == ["p2"]
    assert names(fieldSelector="metadata.namespace=b") == ["p3", "p4"]
    assert names(fieldSelector="spec.nodeName=n1") == ["p1", "p4"]
    assert names(fieldSelector="spec.nodeName=") == ["p3"]
    assert names(fieldSelector="status.phase=Running") == ["p1"]
    assert names(fieldSelector="status.phase!=Running,metadata.namespace=a") == ["p2"]
    assert names(labelSelector="app=web", fieldSelector="spec.nodeName!=n1") == ["p3"]
    r = http(fk, "GET", "/api/v1/namespaces/a/pods", labelSelector="app=web")
    assert [p["metadata"]["name"] for p in r.json()["items"]] == ["p1"]
    for bad in ({"fieldSelector": "spec.containers=x"}, {"labelSelector": "app in (web"},
                {"labelSelector": "a=b=c"}, {"labelSelector": "bad key=1"}):
        r = http(fk, "GET", "/api/v1/pods", **bad)
        assert r.status_code == 400 and r.json()["reason"] == "BadRequest", (bad, r.text)
    assert "field label not supported: spec.containers" in http(fk, "GET", "/api/v1/pods", fieldSelector="spec.containers=x").json()["message"]


def test_patch_flavours(fk):
    ensure_ns(fk, "demo")
    pod = make_pod("a", "demo", containers=2)
    pod["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    assert http(fk, "POST", "/api/v1/namespaces/demo/pods", pod).status_code == 201
    p = "/api/v1/namespaces/demo/pods/a"
    smp = {"metadata": {"annotations": {"k": "v"}},
           "spec": {"containers": [{"name": "c1", "image": "busybox:2"}],
                    "$setElementOrder/containers": [{"name": "c0"}, {"name": "c1"}]}}
    r = http(fk, "PATCH", p, smp, "application/strategic-merge-patch+json").json()
    assert [(c["name"], c["image"]) for c in r["spec"]["containers"]] == [("c0", "busybox"), ("c1", "busybox:2")]
    assert r["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    assert not any(k.startswith("$") for k in r["spec"])
    r = http(fk, "PATCH", p, {"metadata": {"annotations": {"k": None}}}, "application/merge-patch+json").json()
    assert "k" not in (r["metadata"].get("annotations") or {})
    r = http(fk, "PATCH", p, [{"op": "add", "path": "/metadata/labels", "value": {"x": "1"}},
                              {"op": "test", "path": "/metadata/name", "value": "a"}], "application/json-patch+json")
    assert r.status_code == 200 and r.json()["metadata"]["labels"] == {"x": "1"}
    assert http(fk, "PATCH", p, [{"op": "test", "path": "/metadata/name", "value": "zz"}],
                "application/json-patch+json").status_code == 422
    # server-side apply (simplified): creates when missing, needs a fieldManager
    lp = "/apis/coordination.k8s.io/v1/namespaces/demo/leases/l1"
    body = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: l1\nspec:\n  holderIdentity: me\n"
    assert http(fk, "PATCH", lp, body, "application/apply-patch+yaml").status_code == 422
    r = requests.patch(fk.url + lp, params={"fieldManager": "t"}, data=body, timeout=10, proxies=NO_PROXY,
                       headers={"Content-Type": "application/apply-patch+yaml"})
    assert r.status_code == 201 and r.json()["spec"]["holderIdentity"] == "me"
    assert http(fk, "PATCH", p, "{}", "text/plain").status_code == 415


def test_deletion_graceful_and_finalizers(fk):
    ensure_ns(fk, "demo")
    create_pod(fk, "demo", "a")
    # default: immediate
    r = http(fk, "DELETE", "/api/v1/namespaces/demo/pods/a", {"gracePeriodSeconds": 30})
    assert r.status_code == 200 and http(fk, "GET", "/api/v1/namespaces/demo/pods/a").status_code == 404
    # opt-in graceful deletion: deletionTimestamp first (MODIFIED), gone after the grace period
    fk.config(gracefulDeletion=True)
    rv = create_pod(fk, "demo", "b")["metadata"]["resourceVersion"]
    r = http(fk, "DELETE", "/api/v1/namespaces/demo/pods/b", gracePeriodSeconds="1").json()
    assert r["metadata"]["deletionTimestamp"] and r["metadata"]["deletionGracePeriodSeconds"] == 1
    evs = watch(fk, "/api/v1/pods", resourceVersion=rv, timeout_seconds=5, max_events=2)
    assert [e["type"] for e in evs] == ["MODIFIED", "DELETED"]
    # control: terminate (no deadline) then finalize
    create_pod(fk, "demo", "c")
    t = fk.terminate_pod("demo", "c", None)
    assert t["metadata"]["deletionTimestamp"]
    time.sleep(0.3)
    assert http(fk, "GET", "/api/v1/namespaces/demo/pods/c").status_code == 200
    fk.finalize_pod("demo", "c")
    assert http(fk, "GET", "/api/v1/namespaces/demo/pods/c").status_code == 404
    # finalizers hold deletion until removed
    body = json.loads(json.dumps(WM))
    body["metadata"]["finalizers"] = ["workersd.io/cleanup"]
    http(fk, "POST", WM_PATH, body)
    r = http(fk, "DELETE", f"{WM_PATH}/web").json()
    assert r["metadata"]["deletionTimestamp"] and r["metadata"]["generation"] == 2
    assert http(fk, "GET", f"{WM_PATH}/web").status_code == 200
    http(fk, "PATCH", f"{WM_PATH}/web", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert http(fk, "GET", f"{WM_PATH}/web").status_code == 404
    # deleting a namespace removes its content
    create_pod(fk, "demo", "d")
    assert http(fk, "DELETE", "/api/v1/namespaces/demo").status_code == 200
    assert http(fk, "GET", "/api/v1/pods").json()["items"] == []


def test_controls_faults_drop_watches_and_request_counts(fk):
    ensure_ns(fk, "demo")
    fk.reset_requests()
    fk.add_fault("/api/v1/pods", code=500, count=2, method="GET")
    fk.add_fault("/apis/coordination.k8s.io", code=429, count=1, retry_after=2)
    codes = [http(fk, "GET", "/api/v1/pods").status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    r = http(fk, "GET", "/apis/coordination.k8s.io/v1/namespaces/demo/leases")
    assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.json()["reason"] == "TooManyRequests"
    counts = fk.requests()
    assert counts["byVerb"]["list pods"] == 3 and counts["byPath"]["GET /api/v1/pods"] == 3
    # dropping watches ends the streams; the client sees the connection go away
    result = {}

    def run():
        t0 = time.time()
        try:
            watch(fk, "/api/v1/pods", timeout_seconds=30)
            result["how"] = "ended"
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
            result["how"] = "reset"
        result["took"] = time.time() - t0

    t = threading.Thread(target=run)
    t.start()
    fk.wait_for_watch("pods", timeout=10)
    assert fk.requests()["byVerb"]["watch pods"] == 1
    assert fk.drop_watches() == 1
    t.join(timeout=15)
    assert not t.is_alive() and result["took"] < 10 and result["how"] in ("ended", "reset")
    deadline = time.time() + 5
    while fk.watches() and time.time() < deadline:
        time.sleep(0.05)
    assert fk.watches() == []
    st = fk.state("namespaces")
    assert "demo" in [o["metadata"]["name"] for o in st["storages"]["/namespaces"]["objects"]]


def test_kubectl_sees_list_latency_per_list_and_per_page(kubectl, fk):
    """Slow lists (as on a big cluster) are visible to a real client: once per list, and once
    per page of a chunked list; other resources stay fast."""
    ensure_ns(fk, "demo")
    for i in range(3):
        create_pod(fk, "demo", f"p{i}")

    def timed(*args):
        t0 = time.monotonic()
        out = kubectl(*args)
        return time.monotonic() - t0, out.stdout

    fast, _ = timed("get", "pods", "-n", "demo")
    fk.set_latency(list=2.0, resources=["pods"])
    assert fk.config()["listLatencySeconds"] == 2.0
    slow, out = timed("get", "pods", "-n", "demo")
    assert slow >= 2.0 and all(f"p{i}" in out for i in range(3)), (slow, out)
    ns_time, _ = timed("get", "namespaces")
    assert ns_time < slow, (ns_time, slow)  # only pods are slowed
    # Per page: --chunk-size=1 reads the 3 pods in 3 pages.
    fk.set_latency(list=0, page=1.0)
    paged, out = timed("get", "pods", "-n", "demo", "--chunk-size=1")
    assert paged >= 3.0 and all(f"p{i}" in out for i in range(3)), (paged, out)
    whole, _ = timed("get", "pods", "-n", "demo", "--chunk-size=0")
    assert 1.0 <= whole < paged, (whole, paged)
    fk.set_latency(page=0)
    print(f"\nkubectl get pods: {fast:.2f} s, with 2 s list latency {slow:.2f} s, "
          f"3 pages at 1 s each {paged:.2f} s, one page {whole:.2f} s")


def test_watch_latency_delays_the_stream_and_loses_nothing(fk):
    ensure_ns(fk, "demo")
    rv = http(fk, "GET", "/api/v1/namespaces/demo/pods").json()["metadata"]["resourceVersion"]
    fk.set_latency(watch=1.5, resources=["pods"])
    got = {}

    def run():
        t0 = time.monotonic()
        evs = watch(fk, "/api/v1/namespaces/demo/pods", timeout_seconds=4, max_events=1, resourceVersion=rv)
        got["events"], got["took"] = evs, time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    fk.wait_for_watch("pods", timeout=10)
    create_pod(fk, "demo", "made-during-the-delay")  # written before the response starts
    t.join(timeout=20)
    assert not t.is_alive()
    assert got["took"] >= 1.5, got
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in got["events"]] == [("ADDED", "made-during-the-delay")]


def events_v1(name, ns="demo", **extra):
    ev = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name, "namespace": ns},
          "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "workersd",
          "reportingInstance": "wd-1", "action": "Validate", "reason": "InvalidSpec", "type": "Warning",
          "note": "bad ports", "regarding": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": "p"}}
    ev.update(extra)
    return ev


def test_kubectl_event_names_are_dns_subdomains_on_events_v1_only(kubectl, fk):
    """kube-apiserver validates an events.k8s.io/v1 Event's name (DNS subdomain, <= 253) and its
    series; a core/v1 Event keeps the legacy leniency."""
    ensure_ns(fk, "demo")
    too_long = "p" * 250 + ".1a2b"
    for bad, why in ((too_long, "no more than 253 characters"), ("Bad_Name.1a2b", "RFC 1123 subdomain")):
        p = kubectl("create", "-f", "-", input=json.dumps(events_v1(bad)), check=False)
        assert p.returncode != 0 and "is invalid" in p.stderr and why in p.stderr, p.stderr
        r = http(fk, "POST", "/apis/events.k8s.io/v1/namespaces/demo/events", events_v1(bad))
        assert r.status_code == 422 and r.json()["details"]["causes"][0]["field"] == "metadata.name", r.text
    legacy = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "Bad_Name.1a2b", "namespace": "demo"},
              "involvedObject": {"kind": "Pod", "namespace": "demo", "name": "p"}, "reason": "X", "message": "m"}
    kubectl("create", "-f", "-", input=json.dumps(legacy))
    ok = events_v1("p." + "a" * 200)
    kubectl("create", "-f", "-", input=json.dumps(ok))
    # A series needs count >= 2 and lastObservedTime.
    r = http(fk, "PATCH", f"/apis/events.k8s.io/v1/namespaces/demo/events/{ok['metadata']['name']}",
             {"series": {"count": 1}}, ctype="application/merge-patch+json")
    assert r.status_code == 422 and {c["field"] for c in r.json()["details"]["causes"]} == {
        "series.count", "series.lastObservedTime"}, r.text
    r = http(fk, "PATCH", f"/apis/events.k8s.io/v1/namespaces/demo/events/{ok['metadata']['name']}",
             {"series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}},
             ctype="application/merge-patch+json")
    assert r.status_code == 200 and r.json()["series"]["count"] == 2, r.text


def test_kubectl_sees_events_expire_after_the_event_ttl(kubectl, fk):
    """Events vanish event_ttl after their last write (kube-apiserver --event-ttl, 1 h by
    default); a write renews the TTL; a watcher sees the expiry as DELETED."""
    ensure_ns(fk, "demo")
    assert fk.config()["eventTTLSeconds"] == 3600
    fk.config(eventTTLSeconds=2.5)
    t0 = time.monotonic()
    kubectl("create", "-f", "-", input=json.dumps(events_v1("kept.1")))
    kubectl("create", "-f", "-", input=json.dumps(events_v1("expires.1")))
    assert {"kept.1", "expires.1"} <= set(kubectl("get", "events", "-n", "demo", "-o", "name").stdout.replace(
        "event.events.k8s.io/", "").replace("event/", "").split())
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))
    kubectl("patch", "events.v1.events.k8s.io", "kept.1", "-n", "demo", "--type=merge", "-p",
            json.dumps({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}}))
    events = watch(fk, "/api/v1/namespaces/demo/events", timeout_seconds=8, resourceVersion="0",
                   stop=lambda ev: ev["type"] == "DELETED")
    gone = time.monotonic()
    assert events[-1]["type"] == "DELETED" and events[-1]["object"]["metadata"]["name"] == "expires.1", events
    assert 2.0 <= gone - t0 <= 6.0, gone - t0
    names = kubectl("get", "events", "-n", "demo", "-o", "name").stdout
    assert "kept.1" in names and "expires.1" not in names, names
    deadline = time.monotonic() + 8
    while "kept.1" in kubectl("get", "events", "-n", "demo", "-o", "name").stdout:
        assert time.monotonic() < deadline, "kept.1 never expired"
        time.sleep(0.2)


def test_kubectl_sees_field_managers_in_managed_fields(kubectl, fk):
    """Each writer is recorded in metadata.managedFields (fieldManager, else the User-Agent up to
    its first '/'), one entry per manager/operation/subresource, as the apiserver does."""
    ensure_ns(fk, "demo")
    kubectl("create", "-f", "-", input=json.dumps(WM))
    r = http(fk, "PATCH", f"{WM_PATH}/web/status", {"status": {"matchedPods": 1}},
             ctype="application/merge-patch+json", fieldManager="workersd")
    assert r.status_code == 200, r.text
    http(fk, "PATCH", f"{WM_PATH}/web/status", {"status": {"matchedPods": 2}},
         ctype="application/merge-patch+json", fieldManager="workersd")
    obj = kubectl.json("get", "workermetrics", "web", "-n", "demo")
    managers = {(m["manager"], m["operation"], m.get("subresource")) for m in obj["metadata"]["managedFields"]}
    kubectl_manager = [m for m, _, sub in managers if sub is None]
    assert len(kubectl_manager) == 1 and kubectl_manager[0].startswith("kubectl"), managers
    assert ("workersd", "Update", "status") in managers, managers
    assert len(obj["metadata"]["managedFields"]) == 2, "one entry per manager and subresource"
    status_entry = [m for m in obj["metadata"]["managedFields"] if m["manager"] == "workersd"][0]
    assert status_entry["fieldsV1"] == {"f:status": {}} and status_entry["apiVersion"] == "workersd.io/v1alpha1"
    # Without fieldManager the User-Agent names the manager.
    r = requests.patch(fk.url + f"{WM_PATH}/web", data=json.dumps({"metadata": {"labels": {"x": "y"}}}),
                       headers={"Content-Type": "application/merge-patch+json", "User-Agent": "tool/1.2 (linux)"},
                       timeout=30, proxies=NO_PROXY)
    assert "tool" in {m["manager"] for m in r.json()["metadata"]["managedFields"]}, r.text


def test_write_log_survives_compaction(fk):
    ensure_ns(fk, "demo")
    path = "/apis/coordination.k8s.io/v1/namespaces/demo/leases"
    body = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
    assert http(fk, "POST", path, body).status_code == 201
    fk.compact()
    r = http(fk, "PATCH", f"{path}/l", {"spec": {"holderIdentity": "b"}}, ctype="application/merge-patch+json")
    assert r.status_code == 200
    assert http(fk, "DELETE", f"{path}/l").status_code == 200
    writes = fk.writes("leases")
    assert [(w["type"], (w["object"].get("spec") or {}).get("holderIdentity")) for w in writes] == [
        ("ADDED", "a"), ("MODIFIED", "b"), ("DELETED", "b")]
    assert writes[0]["time"] <= writes[1]["time"] <= writes[2]["time"] <= time.time()


def test_crd_created_at_run_time_is_served(fk):
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.com"},
           "spec": {"group": "example.com", "scope": "Cluster",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    assert http(fk, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).status_code == 201
    groups = [g["name"] for g in http(fk, "GET", "/apis").json()["groups"]]
    assert "example.com" in groups
    res = http(fk, "GET", "/apis/example.com/v1").json()["resources"]
    assert res[0]["name"] == "widgets" and res[0]["namespaced"] is False and res[0]["shortNames"] == ["wd"]
    r = http(fk, "POST", "/apis/example.com/v1/widgets", {"apiVersion": "example.com/v1", "kind": "Widget",
                                                         "metadata": {"name": "w1"}, "spec": {"size": 1}})
    assert r.status_code == 201 and r.json()["metadata"]["generation"] == 1
    assert http(fk, "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com").status_code == 200
    assert http(fk, "GET", "/apis/example.com/v1/widgets").status_code == 404


def test_crd_absent_then_created_then_deleted_ends_watches(kubectl_bin, tmp_path):
    """Without the CRD the resource's paths are 404 (crdHandler delegates to NotFound); once
    applied it is served; deleting it deletes every object (DELETED events reach open
    watches), ends those watches, and a watch resumed at an old revision after re-creation
    gets 410 (a fresh watch cache)."""
    repo_crd = str(HERE.parent.parent / "crds" / "workermetrics.yaml")
    with FakeKube(tmp_path / "fk", workermetrics_crd=False, bookmark_interval=0.5) as server:
        k = Kubectl(kubectl_bin, server, tmp_path)
        k("create", "namespace", "demo")
        assert http(server, "GET", WM_PATH).status_code == 404
        assert http(server, "GET", "/apis/workersd.io/v1alpha1/workermetrics", watch="1").status_code == 404
        r = k("get", "workermetrics", "-n", "demo", check=False)
        assert r.returncode != 0 and "the server doesn't have a resource type" in r.stderr, r.stderr
        assert "workermetrics" not in k("api-resources").stdout

        k("apply", "-f", repo_crd)
        f = tmp_path / "wm.yaml"
        f.write_text(json.dumps(WM))
        k("apply", "-f", str(f))
        assert [w["metadata"]["name"] for w in k.json("get", "workermetrics", "-n", "demo")["items"]] == ["web"]

        listed = http(server, "GET", WM_PATH).json()
        rv = listed["metadata"]["resourceVersion"]
        resp = requests.get(server.url + WM_PATH, params={"watch": "1", "resourceVersion": rv,
                                                          "allowWatchBookmarks": "true", "timeoutSeconds": "60"},
                            stream=True, timeout=30, proxies=NO_PROXY)
        assert resp.status_code == 200
        server.wait_for_watch("workermetrics", timeout=10)
        t0 = time.time()
        k("delete", "crd", "workermetrics.workersd.io")
        events = [json.loads(line) for line in resp.iter_lines() if line]  # ends when the server ends it
        assert time.time() - t0 < 10, "the watch was not ended by the CRD deletion"
        deleted = [e for e in events if e["type"] == "DELETED"]
        assert [e["object"]["metadata"]["name"] for e in deleted] == ["web"]
        assert http(server, "GET", WM_PATH).status_code == 404

        k("apply", "-f", repo_crd)
        assert http(server, "GET", WM_PATH).json()["items"] == []
        old = requests.get(server.url + WM_PATH, params={"watch": "1", "resourceVersion": rv, "timeoutSeconds": "5"},
                           stream=True, timeout=30, proxies=NO_PROXY)
        first = json.loads(next(line for line in old.iter_lines() if line))
        assert first["type"] == "ERROR" and first["object"]["code"] == 410, first


def test_ten_thousand_pods_list_fast_and_chunked(fk):
    n = 10_000
    t0 = time.time()
    assert fk.bulk_pods("bench", n, annotations={"workersd.io/service": "w", "workersd.io/ports": "9100"},
                        labels={"app": "w"}, ip=lambda i: f"127.1.{i // 250}.{i % 250 + 1}") == n
    created_in = time.time() - t0
    t0 = time.time()
    r = requests.get(fk.url + "/api/v1/pods", timeout=60, proxies=NO_PROXY)
    listed_in = time.time() - t0
    assert r.status_code == 200
    items = r.json()["items"]
    assert len(items) == n and items[0]["status"]["podIP"].startswith("127.1.")
    assert listed_in < 5.0, f"listing {n} pods took {listed_in:.2f}s"
    # chunked list (what kubectl and kube-rs' watcher do): consistent pages, continue tokens
    names, cont, pages = [], None, 0
    t0 = time.time()
    while True:
        params = {"limit": "500"}
        if cont:
            params["continue"] = cont
        page = requests.get(fk.url + "/api/v1/namespaces/bench/pods", params=params, timeout=60,
                            proxies=NO_PROXY).json()
        pages += 1
        names += [p["metadata"]["name"] for p in page["items"]]
        cont = page["metadata"].get("continue")
        if not cont:
            break
        assert page["metadata"]["remainingItemCount"] == n - len(names)
        assert pages < 100
    assert pages == 20 and len(set(names)) == n and time.time() - t0 < 10
    sel = requests.get(fk.url + "/api/v1/pods", params={"fieldSelector": "metadata.name=pod-9999"}, timeout=30,
                       proxies=NO_PROXY).json()
    assert [p["metadata"]["name"] for p in sel["items"]] == ["pod-9999"]
    print(f"bulk-created {n} pods in {created_in:.2f}s, listed in {listed_in:.2f}s")


SEED = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: workermetrics.workersd.io}
spec:
  group: workersd.io
  scope: Namespaced
  names: {plural: workermetrics, singular: workermetrics, kind: WorkerMetrics, shortNames: [wm]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Service, type: string, jsonPath: .spec.service}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: v1
kind: Pod
metadata:
  name: seeded
  namespace: seedns
  annotations: {workersd.io/service: web, workersd.io/ports: "9100"}
spec:
  containers: [{name: app, image: busybox}]
status: {phase: Running, podIP: 127.0.0.9}
---
apiVersion: workersd.io/v1alpha1
kind: WorkerMetrics
metadata: {name: web, namespace: seedns}
spec: {service: web}
"""


def test_seed_file_and_crd_printer_columns(kubectl_bin, tmp_path):
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    with FakeKube(tmp_path / "fk", seeds=[seed]) as server:
        k = Kubectl(kubectl_bin, server, tmp_path)
        pod = k.json("get", "pod", "seeded", "-n", "seedns")
        assert pod["status"]["podIP"] == "127.0.0.9" and pod["status"]["phase"] == "Running"
        out = k("get", "wm", "-n", "seedns").stdout.split()
        # printer columns replace the default Age column (serveDefaultColumnsIfEmpty)
        assert out == ["NAME", "SERVICE", "web", "web"], out
        assert "seedns" in [n["metadata"]["name"] for n in k.json("get", "ns")["items"]]


def _pb(num: int, value) -> bytes:
    """One protobuf field: bytes/str length-delimited, int a varint."""
    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    value = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(value)) + value


def test_secrets_accept_protobuf_bodies_and_merge_string_data(fk):
    """client-go sends Secrets as protobuf when asked to (Helm's release records do)."""
    ensure_ns(fk, "pb")
    meta = _pb(1, "rel") + _pb(11, _pb(1, "owner") + _pb(2, "helm"))
    secret = (_pb(1, meta) + _pb(2, _pb(1, "release") + _pb(2, b"\x00\xffbin")) + _pb(3, "helm.sh/release.v1")
              + _pb(4, _pb(1, "note") + _pb(2, "hi")) + _pb(5, 1))
    body = b"k8s\x00" + _pb(1, _pb(1, "v1") + _pb(2, "Secret")) + _pb(2, secret)
    r = http(fk, "POST", "/api/v1/namespaces/pb/secrets", body, ctype="application/vnd.kubernetes.protobuf")
    assert r.status_code == 201, r.text
    got = http(fk, "GET", "/api/v1/namespaces/pb/secrets/rel").json()
    assert got["metadata"]["labels"] == {"owner": "helm"}
    assert got["type"] == "helm.sh/release.v1" and got["immutable"] is True
    assert got["data"] == {"release": "AP9iaW4=", "note": "aGk="} and "stringData" not in got
    # A JSON Secret without a type is Opaque.
    r = http(fk, "POST", "/api/v1/namespaces/pb/secrets", {"metadata": {"name": "plain"}})
    assert r.status_code == 201 and r.json()["type"] == "Opaque", r.text
    # Not a protobuf message; and protobuf for a kind this server cannot decode: 415.
    r = http(fk, "POST", "/api/v1/namespaces/pb/secrets", b"{}", ctype="application/vnd.kubernetes.protobuf")
    assert r.status_code == 400 and "expected prefix" in r.json()["message"], r.text
    r = http(fk, "POST", "/api/v1/namespaces/pb/configmaps", body, ctype="application/vnd.kubernetes.protobuf")
    assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType", r.text
