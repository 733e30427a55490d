"""Fidelity tests for fake_kube's core/v1 Nodes and pods selected by node (CONTRACT.md "Nodes").

Driven by a real kubectl where kubectl can say it; the status subresource and the control
API over HTTP. Fixtures come from test_fake_kube.py.

    python3 -m pytest tests/support/test_fake_kube_nodes.py -q
"""

from __future__ import annotations

import json
import subprocess
import time

from fake_kube.client import make_node
from test_fake_kube import ensure_ns, fk, http, json_stream, kubectl, kubectl_bin  # noqa: F401 (fixtures)

NODE_YAML = """\
apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{node-role.kubernetes.io/worker: "", zone: a}}
spec:
  podCIDR: {cidr}
status:
  conditions: [{{type: Ready, status: "True"}}]
  nodeInfo: {{kubeletVersion: v1.30.0}}
  addresses: [{{type: InternalIP, address: {ip}}}]
  capacity: {{pods: "110"}}
"""


def apply_node(kubectl, tmp_path, name, cidr="10.0.1.0/24", ip="127.0.1.1", check=True):
    path = tmp_path / f"{name}.yaml"
    path.write_text(NODE_YAML.format(name=name, cidr=cidr, ip=ip))
    return kubectl("apply", "-f", str(path), check=check)


class Watcher:
    """`kubectl get ... --watch -o json --output-watch-events` in the background."""

    def __init__(self, kubectl, tmp_path, fk, resource, *args):
        self.out_path = tmp_path / f"watch-{resource}-{time.time_ns()}.out"
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(kubectl.base + ["get", resource, *args, "--watch", "-o", "json",
                                                         "--output-watch-events", "--request-timeout=60s"],
                                         stdout=out, stderr=subprocess.PIPE, text=True)
        fk.wait_for_watch(resource, timeout=30)

    def events(self):
        return json_stream(self.out_path.read_text())

    def wait(self, pred, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            evs = self.events()
            if pred(evs):
                return evs
            time.sleep(0.1)
        raise AssertionError(f"watch never satisfied the condition: {[(e['type'], e['object']['metadata'].get('name')) for e in self.events()]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def summary(evs):
    return [(e["type"], e["object"]["metadata"]["name"]) for e in evs]


def test_kubectl_nodes_discovery_apply_tables_cordon_and_delete(kubectl, tmp_path):
    line = [l for l in kubectl("api-resources").stdout.splitlines() if l.startswith("nodes ")]
    assert line and line[0].split() == ["nodes", "no", "v1", "false", "Node"], line
    assert "node/n1 created" in apply_node(kubectl, tmp_path, "n1").stdout
    node = kubectl.json("get", "node", "n1")
    # strategy.go PrepareForCreate keeps the status of a created Node; conversion.go fills
    # podCIDRs from podCIDR; defaults.go SetDefaults_NodeStatus copies capacity to allocatable
    assert node["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert node["spec"]["podCIDRs"] == ["10.0.1.0/24"]
    assert node["status"]["allocatable"] == {"pods": "110"}
    assert "namespace" not in node["metadata"]
    table = kubectl("get", "nodes").stdout.split("\n")
    assert table[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"], table
    cells = table[1].split()
    assert cells[:3] == ["n1", "Ready", "worker"] and cells[4] == "v1.30.0", table
    wide = kubectl("get", "no", "-o", "wide").stdout.split("\n")
    assert wide[0].split()[5:7] == ["INTERNAL-IP", "EXTERNAL-IP"] and wide[1].split()[5:7] == ["127.0.1.1", "<none>"]

    assert "node/n1 cordoned" in kubectl("cordon", "n1").stdout
    assert kubectl("get", "nodes").stdout.split("\n")[1].split()[1] == "Ready,SchedulingDisabled"
    apply_node(kubectl, tmp_path, "n2", cidr="10.0.2.0/24", ip="127.0.2.1")

    def names(*sel):
        return sorted(n["metadata"]["name"] for n in kubectl.json("get", "nodes", *sel)["items"])

    # field labels (conversion.go): metadata.name and spec.unschedulable (unset reads "false")
    assert names("--field-selector", "spec.unschedulable=true") == ["n1"]
    assert names("--field-selector", "spec.unschedulable=false") == ["n2"]
    assert names("--field-selector", "metadata.name!=n1") == ["n2"]
    assert names("-l", "zone=a") == ["n1", "n2"]
    bad = kubectl("get", "nodes", "--field-selector", "spec.nodeName=n1", check=False)
    assert bad.returncode != 0 and "field label not supported: spec.nodeName" in bad.stderr
    bad = kubectl("get", "nodes", "--field-selector", "metadata.namespace=default", check=False)
    assert bad.returncode != 0 and "field label not supported: metadata.namespace" in bad.stderr

    assert 'node "n1" deleted' in kubectl("delete", "node", "n1").stdout
    assert names() == ["n2"]
    assert kubectl("get", "node", "n1", check=False).returncode != 0


def test_kubectl_watches_nodes(kubectl, fk, tmp_path):
    w = Watcher(kubectl, tmp_path, fk, "nodes")
    table_path = tmp_path / "nodes-table.out"
    with open(table_path, "w") as out:  # the human form: `kubectl get nodes -w`
        table = subprocess.Popen(kubectl.base + ["get", "nodes", "-w", "--request-timeout=60s"], stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        fk.wait_for_watch("nodes", count=2)
        apply_node(kubectl, tmp_path, "n1")
        kubectl("label", "node", "n1", "workersd.io/probe=yes")
        kubectl("delete", "node", "n1")
        evs = w.wait(lambda evs: any(e["type"] == "DELETED" for e in evs))
        deadline = time.time() + 10
        while time.time() < deadline and table_path.read_text().count("\nn1 ") < 3:
            time.sleep(0.1)
    finally:
        w.stop()
        table.terminate()
        table.wait(timeout=10)
    lines = table_path.read_text().splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"], lines
    assert [l.split()[:3] for l in lines[1:]] == [["n1", "Ready", "worker"]] * 3, lines
    assert summary(evs) == [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    assert evs[1]["object"]["metadata"]["labels"]["workersd.io/probe"] == "yes"


def test_kubectl_node_validation_and_update_rules(kubectl, fk, tmp_path):
    # ValidateNodeName = NameIsDNSSubdomain
    bad = kubectl("create", "-f", "-", check=False, input=json.dumps(make_node("Node_1")))
    assert bad.returncode != 0 and "a lowercase RFC 1123 subdomain" in bad.stderr, bad.stderr
    dotted = "node-1.zone-a.example"  # a subdomain, not a label: fine for a Node
    kubectl("create", "-f", "-", input=json.dumps(make_node(dotted)))
    # validateNodeTaints: effect required / supported, unique by key and effect; the causes
    # are under metadata.taints (upstream builds the path from "metadata")
    for taints, text in (([{"key": "k", "effect": "Sometimes"}], 'metadata.taints[0].effect: Unsupported value: "Sometimes"'),
                         ([{"key": "k"}], "metadata.taints[0].effect: Required value"),
                         ([{"key": "k", "effect": "NoSchedule"}] * 2, "metadata.taints[1]: Duplicate value")):
        bad = kubectl("create", "-f", "-", check=False, input=json.dumps(make_node("t1", taints=taints)))
        assert bad.returncode != 0 and text in bad.stderr, bad.stderr
    bad = apply_node(kubectl, tmp_path, "c1", cidr="10.0.1.0/33", check=False)
    assert bad.returncode != 0 and 'spec.podCIDRs[0]: Invalid value: "10.0.1.0/33"' in bad.stderr, bad.stderr
    assert kubectl("get", "nodes", "-o", "name").stdout.split() == [f"node/{dotted}"]

    apply_node(kubectl, tmp_path, "n1")
    # ValidateNodeUpdate: podCIDRs are immutable once set, and so is a providerID
    bad = kubectl("patch", "node", "n1", "-p", '{"spec":{"podCIDR":"10.0.9.0/24"}}', check=False)
    assert bad.returncode != 0 and "spec.podCIDRs: Forbidden: node updates may not change podCIDR" in bad.stderr
    kubectl("patch", "node", "n1", "-p", '{"spec":{"providerID":"fake://n1"}}')
    bad = kubectl("patch", "node", "n1", "-p", '{"spec":{"providerID":"fake://other"}}', check=False)
    assert bad.returncode != 0 and "spec.providerID: Forbidden" in bad.stderr
    # taints are mutable (what kubectl taint does)
    kubectl("taint", "node", "n1", "workersd.io/drain=yes:NoExecute")
    assert kubectl.json("get", "node", "n1")["spec"]["taints"] == [
        {"key": "workersd.io/drain", "value": "yes", "effect": "NoExecute"}]

    # strategy.go PrepareForUpdate: the main resource ignores status ...
    kubectl("patch", "node", "n1", "--type", "merge", "-p", '{"status":{"conditions":[{"type":"Ready","status":"False"}]}}')
    assert kubectl("get", "nodes", "n1").stdout.split("\n")[1].split()[1] == "Ready"
    # ... and the status subresource ignores spec but takes status and metadata (the kubelet)
    node = kubectl.json("get", "node", "n1")
    node["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    node["spec"]["unschedulable"] = True
    node["metadata"]["labels"]["from-status"] = "yes"
    r = http(fk, "PUT", "/api/v1/nodes/n1/status", node)
    assert r.status_code == 200, r.text
    got = kubectl.json("get", "node", "n1")
    assert "unschedulable" not in got["spec"] and got["metadata"]["labels"]["from-status"] == "yes"
    assert kubectl("get", "nodes", "n1").stdout.split("\n")[1].split()[1] == "NotReady"
    # a stale resourceVersion is a conflict like everywhere else
    r = http(fk, "PUT", "/api/v1/nodes/n1", node)
    assert r.status_code == 409 and r.json()["reason"] == "Conflict", r.text


def test_kubectl_pods_by_node_field_selector_list_and_watch(kubectl, fk, tmp_path):
    ensure_ns(fk, "a")
    ensure_ns(fk, "b")
    fk.create_node("n1", internal_ip="127.0.1.1")
    fk.create_node("n2", internal_ip="127.0.2.1")
    fk.create_pod("a", "p1", node_name="n1", ip="127.0.1.2")
    fk.create_pod("b", "p2", node_name="n1", ip="127.0.1.3")
    fk.create_pod("a", "p3", node_name="n2", ip="127.0.2.2")
    fk.create_pod("a", "unbound")

    def names(*sel):
        return sorted(p["metadata"]["name"] for p in kubectl.json("get", "pods", "-A", *sel)["items"])

    assert names("--field-selector", "spec.nodeName=n1") == ["p1", "p2"]
    assert names("--field-selector", "spec.nodeName=n2,status.phase=Running") == ["p3"]
    assert names("--field-selector", "spec.nodeName=") == ["unbound"]
    wide = kubectl("get", "pods", "-n", "a", "-o", "wide").stdout
    assert any(l.split()[0] == "p1" and "127.0.1.2" in l.split() and "n1" in l.split() for l in wide.splitlines())

    w = Watcher(kubectl, tmp_path, fk, "pods", "-A", "--field-selector", "spec.nodeName=n1")
    try:
        w.wait(lambda evs: len(evs) >= 2)  # the initial ADDEDs
        fk.create_pod("a", "p4", node_name="n2")  # another node: never seen
        fk.create_pod("a", "p5", node_name="n1", ip="127.0.1.4")  # ADDED, then its status MODIFIED
        fk.set_pod_status("a", "unbound", nodeName="n1")  # bound later: starts matching -> ADDED
        kubectl("delete", "pod", "p1", "-n", "a")
        evs = w.wait(lambda evs: any(e["type"] == "DELETED" for e in evs))
    finally:
        w.stop()
    assert sorted(summary(evs[:2])) == [("ADDED", "p1"), ("ADDED", "p2")]
    assert summary(evs[2:]) == [("ADDED", "p5"), ("MODIFIED", "p5"), ("ADDED", "unbound"), ("DELETED", "p1")]


def test_deleting_a_node_leaves_its_pods_until_the_pod_gc_pass(kubectl, fk, tmp_path):
    ensure_ns(fk, "a")
    fk.create_node("n1")
    fk.create_node("n2")
    fk.create_pod("a", "on-n1", node_name="n1", ip="127.0.1.2")
    fk.create_pod("a", "done-n1", node_name="n1")
    fk.set_pod_status("a", "done-n1", phase="Succeeded")
    fk.create_pod("a", "on-n2", node_name="n2", ip="127.0.2.2")
    fk.create_pod("a", "unbound")
    kubectl("delete", "node", "n1")
    # no controller runs: the pods of a deleted Node stay (upstream: until the pod GC runs)
    assert len(kubectl.json("get", "pods", "-n", "a")["items"]) == 4

    w = Watcher(kubectl, tmp_path, fk, "pods", "-n", "a", "--field-selector", "spec.nodeName=n1")
    try:
        w.wait(lambda evs: len(evs) >= 2)
        assert fk.podgc() == ["a/done-n1", "a/on-n1"]
        evs = w.wait(lambda evs: sum(e["type"] == "DELETED" for e in evs) >= 2)
    finally:
        w.stop()
    # gc_controller.go markFailedAndDeletePodWithCondition: Failed + DisruptionTarget, then a
    # forced delete; a pod that already finished is deleted without the status patch
    assert summary(evs[2:]) == [("DELETED", "done-n1"), ("MODIFIED", "on-n1"), ("DELETED", "on-n1")]
    st = evs[3]["object"]["status"]
    assert st["phase"] == "Failed"
    assert {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists"}.items() <= st["conditions"][-1].items()
    assert sorted(p["metadata"]["name"] for p in kubectl.json("get", "pods", "-n", "a")["items"]) == ["on-n2", "unbound"]
    assert fk.podgc() == []


def test_seeded_nodes_and_http_watch_of_nodes(fk):
    fk.bulk([make_node("s1"), make_node("s2", ready=False, unschedulable=True)])
    r = http(fk, "GET", "/api/v1/nodes", fieldSelector="spec.unschedulable=true")
    assert r.status_code == 200 and r.json()["kind"] == "NodeList", r.text
    assert [n["metadata"]["name"] for n in r.json()["items"]] == ["s2"]
    rv = r.json()["metadata"]["resourceVersion"]
    fk.delete_node("s1")
    from test_fake_kube import watch
    evs = watch(fk, "/api/v1/nodes", resourceVersion=rv, timeout_seconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("DELETED", "s1")]
    assert http(fk, "GET", "/api/v1/namespaces/default/nodes").status_code == 404
