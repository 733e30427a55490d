"""Node-local mode (`workersd kubernetes --node-name`, the chart's DaemonSet) end to end.

Three "nodes" n1, n2, n3 (Node objects on the fake API server), each with one gunicorn "pod"
on 127.0.<k>.2 and its own workersd instance. Each instance publishes its node's workers
under its own Consul node; the instance holding the Lease is the janitor, which retires the
Consul node of a deleted Node. Helpers are those of test_kubernetes_e2e.py.
"""

from __future__ import annotations

import time

from harness import Gunicorn, VictoriaMetrics, wait_until
from test_kubernetes_e2e import (
    CLUSTER,
    COUNT,
    LEASE_PATH,
    SERVICE,
    deregistrations,
    expected,
    kube_workersd,
    metric,
    ports_annotations,
    readme_consul_job,
)

NODES = {"n1": "127.0.1.2", "n2": "127.0.2.2", "n3": "127.0.3.2"}
LEASE = 3  # seconds; a standby janitor reads the Lease every 2 leases: a killed one is replaced within ~4
TAKEOVER = 5 * LEASE + 10  # bound on a janitor sweep after a change, a takeover included


def consul_node(node: str) -> str:
    return f"workersd-{CLUSTER}_{node}"


def add_node(fk, name: str) -> None:
    fk.ok("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


def on_node(consul, node: str) -> set[tuple[str, str, int]]:
    """{(k8s-pod, address, port)} of the entries under `node`'s Consul node."""
    reply = consul.node_services(consul_node(node)) or {}
    return {
        (s["Meta"]["k8s-pod"], s["Address"], s["Port"])
        for s in reply.get("Services") or []
        if s["Service"] == SERVICE
    }


def consul_nodes(consul) -> set[str]:
    return {n["Node"] for n in consul.api_get("/v1/catalog/nodes").json()}


def node_lists(consul) -> int:
    """How often the janitor listed Consul's nodes (once per sweep)."""
    return consul.stats()["requests"].get("GET /v1/catalog/nodes", 0)


def janitor_sweeps_once_more(fk, consul, trigger_node: str) -> None:
    """A Node change makes the janitor sweep; wait until it did."""
    before = node_lists(consul)
    add_node(fk, trigger_node)
    wait_until(lambda: node_lists(consul) > before, timeout=TAKEOVER, interval=0.1,
               message="a janitor sweep after a Node change")


def test_node_local_instances_publish_their_node_and_the_janitor_retires_deleted_nodes(procs, cluster):
    fk, consul, kube = cluster
    for node in NODES:
        add_node(fk, node)
    guns = {node: Gunicorn(procs, address=ip, workers=2).start() for node, ip in NODES.items()}
    for node, g in guns.items():
        kube.add_pod(f"web-{node}", g.address, annotations=ports_annotations(g), node=node)
    want = {node: expected(f"web-{node}", g) for node, g in guns.items()}
    assert all(len(w) == 2 for w in want.values()), want

    def instance(node):
        return kube_workersd(procs, fk, consul, identity=f"wd-{node}", node_name=node,
                             lease_duration=f"{LEASE}s")

    # n2's instance starts first and becomes the janitor, so deleting n2 below (its instance
    # dying with it) also exercises a janitor takeover.
    wds = {"n2": instance("n2").start()}
    wait_until(lambda: (fk.ok("GET", LEASE_PATH).get("spec") or {}).get("holderIdentity") == "wd-n2",
               timeout=15, interval=0.1, message="wd-n2 holds the Lease")
    wds.update({node: instance(node).start() for node in ("n1", "n3")})
    # /readyz 200: each instance probed its pods and Consul holds them, under its own node only.
    for node, w in wds.items():
        assert on_node(consul, node) == want[node], node
        assert w.http_sd_targets() == sorted(f"{a}:{p}" for _, a, p in want[node]), node
    owners = {e["ServiceMeta"]["workersd-owner"] for e in consul.catalog_service(SERVICE)}
    assert owners == {consul_node(n) for n in NODES}

    # consul_sd (README's job) finds every worker of every node: the sum is exact.
    vm = VictoriaMetrics(procs, {"scrape_configs": [readme_consul_job(consul.addr)]}).start()
    all_urls = sorted(f"http://{a}:{p}/metrics" for w in want.values() for _, a, p in w)
    vm.wait_for_targets(
        lambda ts: sorted(t["scrapeUrl"] for t in ts if t.get("health") == "up") == all_urls,
        timeout=30, what="the 6 workers of 3 nodes scraped up",
    )
    for node, count in zip(NODES, (10, 20, 30)):
        guns[node].send_requests(count, concurrency=4)
    vm.wait_for_value(f'sum({COUNT}{{job="clever-workers"}})', lambda v: v == 60.0, timeout=30,
                      what="the sum over the three nodes")

    # An instance killed on a node that still exists: its entries stay, whoever sweeps.
    wds["n3"].kill()
    janitor_sweeps_once_more(fk, consul, "n4")
    assert on_node(consul, "n3") == want["n3"]
    # Restarted: it adopts them and deregisters nothing.
    consul.reset_stats()
    wds["n3"] = instance("n3").start()
    assert on_node(consul, "n3") == want["n3"]
    assert deregistrations(consul.stats()) == {}

    # n2's Node object is deleted (its instance, the janitor, goes with it): a standby takes
    # the Lease, and n2's entries and Consul node are removed, once; nothing of n1 or n3 is
    # touched.
    wds["n2"].kill()
    consul.reset_stats()
    fk.ok("DELETE", "/api/v1/nodes/n2")
    wait_until(lambda: consul_node("n2") not in consul_nodes(consul), timeout=TAKEOVER,
               interval=0.1, message="n2's Consul node retired")
    assert on_node(consul, "n2") == set()
    removed = deregistrations(consul.stats())
    assert removed == {"Service.delete-cas": 2, "PUT /v1/catalog/deregister": 1}, removed
    janitor_sweeps_once_more(fk, consul, "n5")
    assert deregistrations(consul.stats()) == removed
    for node in ("n1", "n3"):
        assert on_node(consul, node) == want[node], node
    vm.wait_for_targets(
        lambda ts: sorted(t["scrapeUrl"] for t in ts if t.get("health") == "up")
        == sorted(f"http://{a}:{p}/metrics" for n in ("n1", "n3") for _, a, p in want[n]),
        timeout=30, what="only the workers of n1 and n3",
    )


def test_node_local_instances_report_an_invalid_workermetrics_once_through_the_janitor(procs, cluster):
    """Every instance sees every WorkerMetrics; only the janitor writes its Events, so N
    instances never write N Events about one object."""
    fk, consul, kube = cluster
    for node in NODES:
        add_node(fk, node)
    wds = [
        kube_workersd(procs, fk, consul, identity=f"wd-{node}", node_name=node,
                      lease_duration=f"{LEASE}s").start()
        for node in NODES
    ]
    kube.add_wm("bad", {
        "selector": {"matchLabels": {"app": "bad"}},
        "service": "Bad_Name",
        "containers": [{"name": "web", "ports": "9020-9011"}],
    })
    # Every instance has resolved it as invalid...
    wait_until(lambda: all(metric(w, "workersd_invalid_objects", {"kind": "workermetrics"}) == 1
                           for w in wds), timeout=15, interval=0.1,
               message="all three instances found the WorkerMetrics invalid")

    def invalid_spec_events():
        return [e for e in kube.events("bad") if e.get("reason") == "InvalidSpec"]

    (event,) = wait_until(invalid_spec_events, timeout=15, message="the InvalidSpec Event")
    # ...and the others' Event tasks, which write at once after a resolution, had time to.
    time.sleep(2)
    assert len(invalid_spec_events()) == 1, invalid_spec_events()
    janitor = fk.ok("GET", LEASE_PATH)["spec"]["holderIdentity"]
    assert event["reportingInstance"] == janitor, (event, janitor)
    # workersd_leading says the same (what the WorkersdNoLeader alert reads).
    leading = {node: metric(w, "workersd_leading", {"role": "janitor"}) for node, w in zip(NODES, wds)}
    assert leading == {node: 1.0 if f"wd-{node}" == janitor else 0.0 for node in NODES}, leading
    assert "spec.service" in event["message"], event["message"]
