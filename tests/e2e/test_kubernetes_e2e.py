"""`workersd kubernetes` end to end, reached through a kubeconfig.

The API server is tests/support/fake_kube (real paths, watches, 410 Gone, Leases, Events,
the WorkerMetrics CRD); "pods" are real gunicorn processes of examples/gunicorn bound to
127.0.0.x, and each pod object's podIP is that address. workersd (the real binary) publishes
to the Consul double; VictoriaMetrics discovers the workers through consul_sd_configs with
README.md's relabel rules; Debian's kubectl reads the same API server. Loopback only, every
wait bounded.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time

import pytest
import yaml

from harness import (
    REPO_ROOT,
    ConsulDouble,
    FakeKube,
    Gunicorn,
    Kube,
    VictoriaMetrics,
    Workersd,
    http_get,
    http_request,
    kubectl_bin,
    parse_metric,
    wait_until,
)

SERVICE = "clever"  # README's example service (its consul_sd_configs select it)
CLUSTER = "e2e"
OWNER = f"workersd-{CLUSTER}"  # node name and owner id follow --cluster-name
NS = "shop"  # the `cluster` fixture's namespace
COUNT = "request_processing_seconds_count"
WM_PATH = "/apis/workersd.io/v1alpha1/namespaces/{ns}/workermetrics"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/default/leases/workersd"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def ports_annotations(g: Gunicorn, container: str | None = "web", **extra) -> dict:
    key = f"workersd.io/ports.{container}" if container else "workersd.io/ports"
    return {"workersd.io/service": SERVICE, key: f"{g.metrics_first}-{g.metrics_last}", **extra}


def kube_workersd(
    procs, fk, consul, identity="wd-1", leader_election=True, lease_duration="15s", **flags
) -> Workersd:
    """`workersd kubernetes` with KUBECONFIG pointing at the fake API server; `flags` are
    more workersd flags (Workersd's keyword form)."""
    if leader_election:
        lease = {"lease_namespace": "default", "lease_duration": lease_duration}
    else:
        lease = {"leader_election": "false"}
    return Workersd(
        procs,
        mode="kubernetes",
        consul_addr=consul.url,
        env={"KUBECONFIG": fk.kubeconfig},
        cluster_name=CLUSTER,
        identity=identity,
        **lease,
        **flags,
    )


def published(consul: ConsulDouble) -> list[dict]:
    """workersd's entries (this cluster's owner) of SERVICE in the Consul double."""
    return [
        e
        for e in consul.catalog_service(SERVICE)
        if (e.get("ServiceMeta") or {}).get("workersd-owner") == OWNER
    ]


def endpoints(entries) -> set[tuple[str, str, int]]:
    """{(k8s-pod, address, port)} of catalog entries."""
    return {(e["ServiceMeta"]["k8s-pod"], e["ServiceAddress"], e["ServicePort"]) for e in entries}


def expected(pod: str, g: Gunicorn) -> set[tuple[str, str, int]]:
    return {(pod, g.address, p) for p in g.listening_metrics_ports()}


def wait_published(consul, want: set, timeout=30, what="") -> list[dict]:
    last: list = []

    def check():
        nonlocal last
        last = published(consul)
        return endpoints(last) == want and len(last) == len(want) and last

    return wait_until(
        check,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"{what or 'Consul entries'} == {sorted(want)}; now {sorted(endpoints(last))}",
    )


def readyz(w: Workersd) -> tuple[int, str]:
    r = http_get(w.readyz_url, timeout=5)
    return r.status_code, r.text


def metric(w: Workersd, name: str, labels=None) -> float | None:
    return parse_metric(w.metrics_text(), name, labels)


def consul_stats_reset(consul: ConsulDouble) -> None:
    r = http_request("POST", f"{consul.control_url}/control/reset-stats", timeout=5)
    assert r.status_code // 100 == 2, r.text


def deregistrations(stats: dict) -> dict:
    """Every way a Consul entry could have been removed, from the double's statistics."""
    txn = (stats.get("txn") or {}).get("ops_applied_by_verb") or {}
    out = {k: v for k, v in txn.items() if k.startswith("Service.delete") or k.startswith("Node.delete")}
    for route, n in (stats.get("requests") or {}).items():
        if "deregister" in route:
            out[route] = n
    return out


class CatalogMonitor:
    """Polls the Consul double every ~100 ms in a thread (bounded by max_seconds) and records
    how many of workersd's entries each pod had."""

    def __init__(self, consul: ConsulDouble, interval=0.1, max_seconds=90.0):
        self.consul = consul
        self.interval = interval
        self.max_seconds = max_seconds
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                per_pod: dict[str, int] = {}
                for e in published(self.consul):
                    pod = e["ServiceMeta"]["k8s-pod"]
                    per_pod[pod] = per_pod.get(pod, 0) + 1
                self.samples.append((time.monotonic(), per_pod))
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def min_count(self, pod: str) -> int:
        assert self.samples, f"no catalog samples; errors: {self.errors}"
        return min(per_pod.get(pod, 0) for _, per_pod in self.samples)


def readme_consul_job(server: str) -> dict:
    """README's consul_sd_configs job, verbatim except the server, plus a k8s_pod label."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = lines.index("### consul_sd_configs (Prometheus, VictoriaMetrics)")
    begin = lines.index("```yaml", start)
    end = lines.index("```", begin + 1)
    (job,) = yaml.safe_load("\n".join(lines[begin + 1 : end]))["scrape_configs"]
    (sd,) = job["consul_sd_configs"]
    assert sd["services"] == [SERVICE], sd
    sd["server"] = server
    job["relabel_configs"].append(
        {"source_labels": ["__meta_consul_service_metadata_k8s_pod"], "target_label": "k8s_pod"}
    )
    return job


def kubectl(fk: FakeKube, tmp_path, *args, timeout=60):
    """Debian's kubectl against the fake API server: parsed JSON with -o json, else stdout."""
    binary = kubectl_bin()
    if not binary:
        pytest.fail(
            "Debian's kubectl (kubernetes-client) is not installed: run "
            "`bash tests/support/install_kubectl.sh` (or set KUBECTL=/path/to/kubectl)"
        )
    # A fresh discovery cache per call: the CRD applied by one call must be seen by the next.
    cache = tempfile.mkdtemp(prefix="kcache-", dir=tmp_path)
    argv = [binary, "--kubeconfig", fk.kubeconfig, "--cache-dir", cache, *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout) if "json" in args else p.stdout


def condition(wm: dict, type_: str) -> dict | None:
    for c in (wm.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


# --------------------------------------------------------------------------
# 1 + 7: annotations and WorkerMetrics -> Consul -> VictoriaMetrics; kubectl sees the same pods
# --------------------------------------------------------------------------


def test_kubernetes_pods_publish_every_worker_to_consul_and_victoria_metrics(procs, cluster, tmp_path):
    fk, consul, kube = cluster
    a = Gunicorn(procs, address="127.0.0.2", workers=3).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    # web-a opts in by annotations; web-b by a WorkerMetrics matching its labels.
    kube.add_pod(
        "web-a",
        "127.0.0.2",
        labels={"app": "a"},
        annotations=ports_annotations(a, **{"workersd.io/meta.team": "web"}),
        node="node-1",
    )
    # README: "apply the CRD (`kubectl apply -f crds/workermetrics.yaml`)"; the fake server's
    # built-in CRD is this same file, so the apply is a no-op update.
    out = kubectl(fk, tmp_path, "apply", "-f", str(REPO_ROOT / "crds" / "workermetrics.yaml"))
    assert "workermetrics.workersd.io" in out, out
    kube.add_wm(
        "web-b",
        {
            "selector": {"matchLabels": {"app": "b"}},
            "service": SERVICE,
            "containers": [{"name": "web", "ports": f"{b.metrics_first}-{b.metrics_last}"}],
            "meta": {"team": "web"},
        },
    )
    kube.add_pod("web-b", "127.0.0.3", labels={"app": "b"}, node="node-2")
    # Not opted in at all: never published.
    kube.add_pod("plain", "127.0.0.4", labels={"app": "plain"})

    w = kube_workersd(procs, fk, consul).start()
    # /readyz 200 means every pod was probed and Consul holds the result.
    want = expected("web-a", a) | expected("web-b", b)
    assert len(want) == 5
    entries = published(consul)
    assert endpoints(entries) == want and len(entries) == 5, sorted(endpoints(entries))
    assert len({e["ServiceID"] for e in entries}) == 5
    for e in entries:
        meta = e["ServiceMeta"]
        pod = meta["k8s-pod"]
        assert e["Node"] == OWNER and e["ServiceName"] == SERVICE
        assert meta["external-source"] == "workersd"
        assert meta["k8s-namespace"] == NS
        assert meta["k8s-container"] == "web"
        assert meta["k8s-node"] == {"web-a": "node-1", "web-b": "node-2"}[pod]
        assert meta["worker-port"] == str(e["ServicePort"])
        assert meta["metrics-path"] == "/metrics"
        assert meta["team"] == "web"
    # The HTTP SD endpoint publishes the same workers.
    assert w.http_sd_targets() == sorted(f"{addr}:{port}" for _, addr, port in want)

    # kubectl (a real client) lists the same pods, with the IPs workersd published.
    pods = kubectl(fk, tmp_path, "get", "pods", "-n", NS, "-o", "json")["items"]
    by_name = {p["metadata"]["name"]: p["status"].get("podIP") for p in pods}
    assert by_name == {"web-a": "127.0.0.2", "web-b": "127.0.0.3", "plain": "127.0.0.4"}
    published_pods = {(pod, addr) for pod, addr, _ in endpoints(entries)}
    assert published_pods == {(n, by_name[n]) for n in ("web-a", "web-b")}
    wms = kubectl(fk, tmp_path, "get", "workermetrics", "-n", NS, "-o", "json")["items"]
    assert [wm["metadata"]["name"] for wm in wms] == ["web-b"]

    # The WorkerMetrics status reports what was published for its pod.
    def wm_ready():
        wm = kube.wm("web-b")
        st = wm.get("status") or {}
        ready = condition(wm, "Ready")
        return (
            ready
            and ready["status"] == "True"
            and st.get("observedGeneration") == wm["metadata"]["generation"]
            and st.get("matchedPods") == 1
            and st.get("liveEndpoints") == 2
            and wm
        )

    wm = wait_until(wm_ready, timeout=15, message=lambda: f"web-b status: {kube.wm('web-b').get('status')}")
    assert condition(wm, "InvalidSpec")["status"] == "False"
    table = kubectl(fk, tmp_path, "get", "wm", "-n", NS)
    assert table.split("\n")[1].split()[:4] == ["web-b", SERVICE, "1", "2"], table

    # VictoriaMetrics discovers the workers through Consul with README's relabels.
    vm = VictoriaMetrics(procs, {"scrape_configs": [readme_consul_job(consul.addr)]}).start()
    vm.wait_for_targets(
        lambda ts: sorted(t["scrapeUrl"] for t in ts if t.get("health") == "up")
        == sorted(f"http://{addr}:{port}/metrics" for _, addr, port in want),
        timeout=30,
        what="the 5 workers scraped up",
    )
    a.send_requests(30, concurrency=6)
    b.send_requests(20, concurrency=4)
    query = f'sum by (k8s_pod) ({COUNT}{{job="clever-workers"}})'

    last = {}

    def check():
        nonlocal last
        last = {labels.get("k8s_pod"): value for labels, value in vm.query(query)}
        return last == {"web-a": 30.0, "web-b": 20.0}

    wait_until(check, timeout=30, interval=0.5, message=lambda: f"per-pod sums {last}")
    print(f"\nper-pod request sums in VictoriaMetrics: {last}")


# --------------------------------------------------------------------------
# 2: deletion (and termination) removes a pod's entries within 1 s
# --------------------------------------------------------------------------


def test_kubernetes_deleted_and_terminating_pods_lose_entries_within_a_second(procs, cluster):
    fk, consul, kube = cluster
    keep = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    gone = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    ending = Gunicorn(procs, address="127.0.0.4", workers=2).start()
    for name, g in (("keep", keep), ("gone", gone), ("ending", ending)):
        kube.add_pod(name, g.address, annotations=ports_annotations(g))
    kube_workersd(procs, fk, consul).start()
    want = expected("keep", keep) | expected("gone", gone) | expected("ending", ending)
    wait_published(consul, want, timeout=10)
    keep_before = {e["ServiceID"]: e["ModifyIndex"] for e in published(consul) if e["ServiceMeta"]["k8s-pod"] == "keep"}

    latencies = {}
    for name, action in (
        ("gone", lambda: kube.delete_pod("gone")),
        # Graceful deletion: deletionTimestamp set, the pod object still exists.
        ("ending", lambda: fk.terminate_pod(NS, "ending", grace_period_seconds=None)),
    ):
        t0 = time.monotonic()
        action()
        wait_until(
            lambda: name not in {pod for pod, _, _ in endpoints(published(consul))},
            timeout=10,
            interval=0.02,
            message=f"{name}'s entries removed",
        )
        latencies[name] = time.monotonic() - t0
    print(f"\nentries removed after DELETE: {latencies['gone'] * 1000:.0f} ms; "
          f"after graceful termination started: {latencies['ending'] * 1000:.0f} ms")
    assert latencies["gone"] <= 1.0, latencies
    assert latencies["ending"] <= 1.0, latencies
    # The terminating pod still exists in the API, yet is no longer published.
    assert {p["metadata"]["name"] for p in kube.pods()} == {"keep", "ending"}
    # The other pod's entries were not touched (same IDs, no rewrite).
    after = {e["ServiceID"]: e["ModifyIndex"] for e in published(consul)}
    assert after == keep_before


# --------------------------------------------------------------------------
# 3: invalid declarations: Events, metrics, status; valid ones unaffected
# --------------------------------------------------------------------------


def test_kubernetes_invalid_declarations_are_reported_and_isolated(procs, cluster):
    fk, consul, kube = cluster
    good = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    wm_g = Gunicorn(procs, address="127.0.0.3", workers=3).start()
    kube.add_pod("good", good.address, annotations=ports_annotations(good))
    kube.add_pod(
        "bad",
        "127.0.0.4",
        annotations={
            "workersd.io/service": SERVICE,
            "workersd.io/ports": "9020-9011",  # reversed
            "workersd.io/prots.web": "9011",  # typo
        },
    )
    kube.add_pod("managed", wm_g.address, labels={"app": "managed"})
    kube.add_wm(
        "managed",
        {
            "selector": {"matchLabels": {"app": "managed"}},
            "service": "Bad_Name",
            "containers": [{"name": "web", "ports": "9020-9011"}],
        },
    )
    w = kube_workersd(procs, fk, consul).start()
    # Only the good pod is published; the bad pod and the invalid resource change nothing.
    wait_published(consul, expected("good", good), timeout=10)

    # A Warning Event on the bad pod naming each bad annotation.
    def bad_events():
        evs = [e for e in kube.events("bad") if e.get("reason") == "InvalidWorkerMetrics"]
        return evs

    (event,) = wait_until(bad_events, timeout=15, message="Warning Event on pod bad")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Pod" and event["involvedObject"]["name"] == "bad"
    assert "metadata.annotations[workersd.io/ports]" in event["message"], event["message"]
    assert "reversed" in event["message"], event["message"]
    assert "metadata.annotations[workersd.io/prots.web]" in event["message"], event["message"]
    assert not kube.events("good")

    assert metric(w, "workersd_invalid_objects", {"kind": "pod"}) == 1
    assert metric(w, "workersd_invalid_objects", {"kind": "workermetrics"}) == 1

    # The invalid WorkerMetrics: InvalidSpec=True naming the fields, Ready=False, an Event.
    def invalid_status():
        wm = kube.wm("managed")
        c = condition(wm, "InvalidSpec")
        return c and c["status"] == "True" and wm

    wm = wait_until(invalid_status, timeout=15, message=lambda: f"status {kube.wm('managed').get('status')}")
    message = condition(wm, "InvalidSpec")["message"]
    assert "spec.service" in message and "spec.containers[0].ports" in message, message
    assert condition(wm, "Ready")["status"] == "False"
    assert wm["status"]["observedGeneration"] == wm["metadata"]["generation"] == 1
    assert wm["status"]["matchedPods"] == 0
    (wm_event,) = wait_until(
        lambda: [e for e in kube.events("managed") if e.get("reason") == "InvalidSpec"],
        timeout=15,
        message="Warning Event on WorkerMetrics managed",
    )
    assert wm_event["type"] == "Warning" and wm_event["involvedObject"]["kind"] == "WorkerMetrics"
    assert "spec.containers[0].ports" in wm_event["message"]

    # Fixing the spec (generation 2) makes it Ready and publishes its pod.
    kube.patch_wm(
        "managed",
        {
            "spec": {
                "service": SERVICE,
                "containers": [{"name": "web", "ports": f"{wm_g.metrics_first}-{wm_g.metrics_last}"}],
            }
        },
    )
    want = expected("good", good) | expected("managed", wm_g)
    wait_published(consul, want, timeout=15, what="good + managed entries")

    def fixed():
        wm = kube.wm("managed")
        st = wm.get("status") or {}
        ready = condition(wm, "Ready")
        return (
            ready
            and ready["status"] == "True"
            and condition(wm, "InvalidSpec")["status"] == "False"
            and st.get("observedGeneration") == wm["metadata"]["generation"]
            and st.get("matchedPods") == 1
            and st.get("liveEndpoints") == 3
            and wm
        )

    wm = wait_until(fixed, timeout=15, message=lambda: f"status {kube.wm('managed')}")
    assert wm["metadata"]["generation"] == 2
    assert metric(w, "workersd_invalid_objects", {"kind": "workermetrics"}) == 0
    # The still-bad pod is still refused, and reported once (no Event per resolution).
    assert metric(w, "workersd_invalid_objects", {"kind": "pod"}) == 1
    assert len(bad_events()) == 1
    assert endpoints(published(consul)) == want


def test_kubernetes_entry_refused_by_consul_is_reported_on_its_pod(procs, cluster):
    """Consul refuses one service's writes: the other pod is published, the refused pod gets a
    Warning Event naming its service IDs, and once Consul accepts them they are published."""
    fk, consul, kube = cluster
    other = "billing"
    good = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    held = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    consul.refuse_service_writes([other])
    kube.add_pod("good", good.address, annotations=ports_annotations(good))
    kube.add_pod(
        "held", held.address, annotations=ports_annotations(held, **{"workersd.io/service": other})
    )
    w = kube_workersd(procs, fk, consul).start()
    wait_published(consul, expected("good", good), timeout=15)

    def refused_events():
        return [e for e in kube.events("held") if e.get("reason") == "ConsulRefusedEntry"]

    # A worker found live later is refused later, a changed problem with an Event of its own.
    event = wait_until(refused_events, timeout=20, message="ConsulRefusedEntry Event on pod held")[0]
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Pod" and event["involvedObject"]["name"] == "held"
    assert event.get("action") == "Register", event
    assert "injected refusal" in event["message"], event["message"]
    assert not [e for e in kube.events("good") if e.get("reason") == "ConsulRefusedEntry"]
    assert not consul.catalog_service(other)

    # Consul accepts them again: published once the first retry delay runs out (10-20 s).
    consul.refuse_service_writes([])
    want = {("held", held.address, p) for p in held.listening_metrics_ports()}
    entries = wait_until(
        lambda: (
            (es := [e for e in consul.catalog_service(other) if e["ServiceMeta"].get("workersd-owner") == OWNER])
            and endpoints(es) == want
            and es
        ),
        timeout=45,
        interval=0.2,
        message=f"{other} entries == {sorted(want)}",
    )
    # The Events named every refused entry by its service ID.
    notes = [e["message"] for e in refused_events()]
    for e in entries:
        assert any(e["ServiceID"] in note for note in notes), (e["ServiceID"], notes)
    wait_until(
        lambda: metric(w, "workersd_sink_quarantined_operations", {"sink": "consul"}) == 0,
        timeout=10,
        message="no quarantined operations left",
    )
    assert endpoints(published(consul)) == expected("good", good)
    # One Event per distinct problem: entries accepted one at a time change the problem (a
    # new Event naming those still held), never one Event per entry or per pass.
    assert 1 <= len(refused_events()) <= len(entries), refused_events()


# --------------------------------------------------------------------------
# 4: a watch dropped with 410 Gone loses no deletion
# --------------------------------------------------------------------------


def test_kubernetes_relist_after_410_gone_applies_missed_deletion(procs):
    # No bookmarks: workersd's last resourceVersion is its last pod event, older than the
    # compaction horizon, so its re-watch gets 410 Gone and it must re-list.
    fk = FakeKube(procs, bookmark_interval=3600).start()
    consul = ConsulDouble(procs).start()
    kube = Kube(fk, NS)
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_pod("stays", a.address, annotations=ports_annotations(a))
    kube.add_pod("vanishes", b.address, annotations=ports_annotations(b))
    w = kube_workersd(procs, fk, consul).start()
    wait_published(consul, expected("stays", a) | expected("vanishes", b), timeout=10)
    lists_before = fk.requests()["byVerb"].get("list pods", 0)
    assert lists_before == 1

    # The re-list is slow (1.5 s): the deletion happens while workersd is re-listing.
    fk.add_fault("/api/v1/pods", code=200, count=1, method="GET", verb="list", delay=1.5)
    assert fk.drop_watches() >= 2  # pods and workermetrics: connections reset mid-stream
    fk.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "bump"}})  # moves the revision
    fk.compact()  # every resourceVersion workersd holds is now too old: 410 Gone
    t0 = time.monotonic()
    kube.delete_pod("vanishes")
    wait_published(consul, expected("stays", a), timeout=30, what="only 'stays' after the re-list")
    print(f"\nmissed deletion applied {time.monotonic() - t0:.2f} s after the watches were dropped")

    reqs = fk.requests()["byVerb"]
    assert reqs.get("list pods", 0) >= 2, reqs  # it re-listed ...
    assert "too old resource version" in w.logs(), "workersd never got 410 Gone"
    # ... and watches again: a later deletion arrives through the new watch.
    fk.wait_for_watch("pods", timeout=20)
    b2 = Gunicorn(procs, address="127.0.0.5", workers=2).start()
    kube.add_pod("late", b2.address, annotations=ports_annotations(b2))
    wait_published(consul, expected("stays", a) | expected("late", b2), timeout=15)
    kube.delete_pod("late")
    wait_published(consul, expected("stays", a), timeout=5)
    assert readyz(w)[0] == 200


# --------------------------------------------------------------------------
# 5: two instances with leader election: one writes, the standby takes over
# --------------------------------------------------------------------------


def test_kubernetes_leader_election_standby_takes_over(procs, cluster):
    fk, consul, kube = cluster
    lease = 3
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    kube.add_pod("web-b", b.address, annotations=ports_annotations(b))

    leader = kube_workersd(procs, fk, consul, identity="wd-a", lease_duration=f"{lease}s").start()
    standby = kube_workersd(procs, fk, consul, identity="wd-b", lease_duration=f"{lease}s")
    standby.start(wait_ready=False)
    want = expected("web-a", a) | expected("web-b", b)
    wait_published(consul, want, timeout=10)

    def standing_by():
        code, text = readyz(standby)
        return code == 503 and "standing by" in text and (code, text)

    wait_until(standing_by, timeout=20, message="standby /readyz 503 standing by")
    assert http_get(f"{standby.listen_url}/healthz").status_code == 200
    assert readyz(leader)[0] == 200
    assert fk.ok("GET", LEASE_PATH)["spec"]["holderIdentity"] == "wd-a"
    time.sleep(2 * lease / 3 + 0.5)  # a few of the standby's lease polls
    # Only the leader works: the standby neither watches, probes nor writes.
    assert standing_by()
    # Nor does it serve targets: an empty list from a standby would make Prometheus drop
    # every worker, so it refuses while the leader serves the full list.
    r = http_get(standby.http_sd_url, timeout=5)
    assert r.status_code == 503 and "standing by" in r.text, (r.status_code, r.text)
    assert http_get(leader.http_sd_url, timeout=5).status_code == 200
    assert len(fk.watches("pods")) == 1
    assert not metric(standby, "workersd_probes_total")
    assert not metric(standby, "workersd_sink_requests_total")
    assert metric(leader, "workersd_sink_requests_total", {"op": "txn"}) >= 1

    with CatalogMonitor(consul) as monitor:
        t0 = time.monotonic()
        leader.kill()  # crash: SIGKILL, the lease is not released
        holder = wait_until(
            lambda: (fk.ok("GET", LEASE_PATH)["spec"].get("holderIdentity") == "wd-b") and time.monotonic(),
            timeout=lease + 10,
            interval=0.05,
            message="wd-b holds the lease",
        )
        takeover = holder - t0
        wait_until(lambda: readyz(standby)[0] == 200, timeout=20, interval=0.05, message="new leader ready")
        ready = time.monotonic() - t0
        time.sleep(0.5)
    print(f"\ntakeover after SIGKILL of the leader: lease acquired {takeover:.2f} s, "
          f"/readyz 200 {ready:.2f} s (lease duration {lease} s)")
    # The holder renews every lease/3; a standby polls every lease/3 and takes over once
    # `lease` has passed since the last renewal.
    assert takeover <= lease + 2, takeover
    assert ready <= lease + 5, ready
    spec = fk.ok("GET", LEASE_PATH)["spec"]
    assert spec["leaseTransitions"] == 1 and spec["leaseDurationSeconds"] == lease
    # Consul stayed correct throughout: no entry ever dropped.
    assert not monitor.errors, monitor.errors
    assert monitor.min_count("web-a") == 2 and monitor.min_count("web-b") == 2, monitor.samples[:5]
    assert endpoints(published(consul)) == want

    # The new leader keeps Consul in step with the workers.
    a.scale_up()
    grown = a.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 workers on web-a")
    wait_published(consul, expected("web-a", a) | expected("web-b", b), timeout=15, what="scaled-up web-a")
    assert len(grown) == 3
    b.scale_down()
    b.wait_for_metrics_ports(lambda p: len(p) == 1, what="1 worker on web-b")
    wait_published(consul, expected("web-a", a) | expected("web-b", b), timeout=15, what="scaled-down web-b")
    assert len(published(consul)) == 4


# --------------------------------------------------------------------------
# 6: restart safety
# --------------------------------------------------------------------------


def test_kubernetes_restart_never_drops_entries_and_catches_up_on_deletions(procs, cluster):
    fk, consul, kube = cluster
    a = Gunicorn(procs, address="127.0.0.2", workers=3).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    kube.add_pod("web-b", b.address, annotations=ports_annotations(b))
    w = kube_workersd(procs, fk, consul, leader_election=False).start()
    want_a, want_b = expected("web-a", a), expected("web-b", b)
    wait_published(consul, want_a | want_b, timeout=10)
    ids_before = {e["ServiceID"] for e in published(consul)}

    # Plain restart: nothing is deregistered, the count never drops.
    consul_stats_reset(consul)
    with CatalogMonitor(consul) as monitor:
        time.sleep(0.3)
        assert w.stop() == 0  # SIGTERM: clean exit, entries left in place
        time.sleep(1.0)
        t0 = time.monotonic()
        w.start()
        restart_ready = time.monotonic() - t0
        time.sleep(2.5)  # a few probe rounds of the new instance
    stats = consul.stats()
    print(f"\nrestarted instance ready in {restart_ready:.2f} s; {len(monitor.samples)} catalog polls")
    assert not monitor.errors, monitor.errors
    assert len(monitor.samples) >= 20
    assert monitor.min_count("web-a") == 3 and monitor.min_count("web-b") == 2
    assert deregistrations(stats) == {}, stats
    # Nothing changed, so the new instance wrote nothing at all (it read, then found Consul right).
    assert stats["txn"]["ops_applied"] == 0 and stats.get("catalog_writes", 0) == 0, stats
    assert {e["ServiceID"] for e in published(consul)} == ids_before

    # A pod deleted while workersd is down loses its entries once it is back; the other
    # pod's entries never drop.
    consul_stats_reset(consul)
    with CatalogMonitor(consul) as monitor:
        assert w.stop() == 0
        kube.delete_pod("web-b")
        time.sleep(1.0)
        assert endpoints(published(consul)) == want_a | want_b  # nobody removes them meanwhile
        t0 = time.monotonic()
        w.start()
        wait_published(consul, want_a, timeout=15, what="web-b's entries removed after restart")
        caught_up = time.monotonic() - t0
        time.sleep(0.3)
    print(f"deletion made while down applied {caught_up:.2f} s after restart")
    assert monitor.min_count("web-a") == 3
    assert deregistrations(consul.stats()).get("Service.delete-cas") == 2
    assert readyz(w)[0] == 200


# --------------------------------------------------------------------------
# 5b: a leader whose lease renewal hangs must stop leading within the lease duration
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Pod lifecycle: pod IP + running container, per-container ranges
# --------------------------------------------------------------------------


def container_status(name: str, running: bool, restarts: int = 0) -> dict:
    state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}} if running else {
        "waiting": {"reason": "CrashLoopBackOff"}
    }
    return {"name": name, "image": "clever:1", "imageID": "", "ready": running,
            "restartCount": restarts, "state": state}


def test_kubernetes_pod_lifecycle_and_per_container_ranges(procs, cluster):
    fk, consul, kube = cluster
    # Two containers of one pod share its IP; each has its own worker port range.
    web = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    side = Gunicorn(procs, address="127.0.0.2", workers=1).start()
    assert not set(web.metrics_port_range) & set(side.metrics_port_range)
    kube.add_pod(
        "p",
        None,  # Pending: no IP yet
        containers=("web", "sidecar"),
        annotations={
            "workersd.io/service": SERVICE,
            "workersd.io/ports.web": f"{web.metrics_first}-{web.metrics_last}",
            "workersd.io/ports.sidecar": f"{side.metrics_first}-{side.metrics_last}",
        },
    )
    w = kube_workersd(procs, fk, consul).start()
    # Ready: every target was probed once and Consul holds the result. The pod (no IP,
    # nothing running) gave no target, so that result is an empty catalog.
    assert readyz(w)[0] == 200
    assert metric(w, "workersd_targets") == 0
    assert published(consul) == []

    def by_container():
        out: dict[str, set[int]] = {}
        for e in published(consul):
            assert e["ServiceAddress"] == "127.0.0.2"
            out.setdefault(e["ServiceMeta"]["k8s-container"], set()).add(e["ServicePort"])
        return out

    def wait_containers(want: dict, what: str, timeout=10.0, after=None) -> float:
        """Seconds from after() (a pod status change) until Consul shows `want`."""
        t0 = time.monotonic()
        if after:
            after()
        last = {}

        def check():
            nonlocal last
            last = by_container()
            return last == want

        wait_until(check, timeout=timeout, interval=0.05, message=lambda: f"{what}: {want}; now {last}")
        return time.monotonic() - t0

    web_ports = set(web.listening_metrics_ports())
    side_ports = set(side.listening_metrics_ports())
    # Scheduled and running, the sidecar still crash-looping: only web's range is probed.
    appeared = wait_containers(
        {"web": web_ports},
        "web's workers once the pod runs",
        after=lambda: fk.set_pod_status(
            NS, "p", podIP="127.0.0.2", phase="Running",
            containerStatuses=[container_status("web", True), container_status("sidecar", False)],
        ),
    )
    sidecar = wait_containers(
        {"web": web_ports, "sidecar": side_ports},
        "sidecar's worker once it runs",
        after=lambda: fk.set_pod_status(
            NS, "p", containerStatuses=[container_status("web", True), container_status("sidecar", True, 1)]
        ),
    )
    web_down = wait_containers(
        {"sidecar": side_ports},
        "web's entries gone when it stops running",
        after=lambda: fk.set_pod_status(
            NS, "p",
            containerStatuses=[container_status("web", False, 1), container_status("sidecar", True, 1)],
        ),
    )
    print(f"\npod running -> published {appeared:.2f} s; sidecar running -> published {sidecar:.2f} s; "
          f"web stopped -> removed {web_down:.2f} s")
    # "A new pod, a pod IP change or a container restart triggers an immediate probe."
    assert appeared <= 2.0 and sidecar <= 2.0, (appeared, sidecar)
    assert web_down <= 1.0, web_down
    done = wait_containers({}, "every entry gone once the pod Succeeded",
                           after=lambda: fk.set_pod_status(NS, "p", phase="Succeeded"))
    assert done <= 1.0, done
    assert readyz(w)[0] == 200


# --------------------------------------------------------------------------
# The WorkerMetrics CRD is optional: annotations alone work without it
# --------------------------------------------------------------------------

CRD_FILE = REPO_ROOT / "crds" / "workermetrics.yaml"
CRD_ABSENT_LOG = "WorkerMetrics CRD is not installed"


def wm_spec(g: Gunicorn, app: str) -> dict:
    return {
        "selector": {"matchLabels": {"app": app}},
        "service": SERVICE,
        "containers": [{"name": "web", "ports": f"{g.metrics_first}-{g.metrics_last}"}],
    }


def crd_installed_metric(w: Workersd) -> float | None:
    return metric(w, "workersd_crd_installed", {"crd": "workermetrics.workersd.io"})


def test_kubernetes_without_crd_publishes_annotated_pods_and_picks_up_the_crd_later(procs, tmp_path):
    """`helm install --skip-crds`: the WorkerMetrics paths are 404. Annotated pods are published,
    /readyz is 200 naming the missing CRD, the metric says 0, the log says it once; applying
    the CRD later makes WorkerMetrics work without a restart."""
    fk = FakeKube(procs, extra_args=["--no-workermetrics-crd"]).start()
    consul = ConsulDouble(procs).start()
    kube = Kube(fk, NS)
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    kube.add_pod("web-b", b.address, labels={"app": "b"})
    assert fk.api("GET", WM_PATH.format(ns=NS)).status == 404

    w = kube_workersd(procs, fk, consul).start(wait_ready=False)
    wait_published(consul, expected("web-a", a), timeout=30, what="annotated pod without the CRD")
    code, body = wait_until(lambda: readyz(w)[0] == 200 and readyz(w), timeout=30, message=lambda: readyz(w))
    assert "WorkerMetrics CRD" in body, body
    assert crd_installed_metric(w) == 0
    # Logged once, not at every retry of the list: wait for more than one retry first.
    wm_lists = "GET /apis/workersd.io/v1alpha1/workermetrics"  # 404s are counted by path only
    wait_until(lambda: fk.requests()["byPath"].get(wm_lists, 0) >= 3, timeout=30,
               message=lambda: f"retried lists of workermetrics: {fk.requests()['byPath']}")
    assert w.logs().count(CRD_ABSENT_LOG) == 1, w.logs()[-3000:]

    # The CRD appears (kubectl, a real client), then a WorkerMetrics: picked up, no restart.
    kubectl(fk, tmp_path, "apply", "-f", str(CRD_FILE))
    kube.add_wm("web-b", wm_spec(b, "b"))
    wait_published(consul, expected("web-a", a) | expected("web-b", b), timeout=30, what="after the CRD appeared")
    wait_until(lambda: crd_installed_metric(w) == 1, timeout=10, message="crd metric back to 1")
    code, body = readyz(w)
    assert code == 200 and "CRD" not in body, body
    assert w.alive()


def test_kubernetes_crd_deleted_while_running_keeps_annotated_pods_published(procs, cluster, tmp_path):
    """Deleting the CRD deletes every WorkerMetrics and ends the watch: their targets go, the
    annotated pod stays published throughout; re-creating the CRD brings WorkerMetrics back."""
    fk, consul, kube = cluster
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    kube.add_pod("web-b", b.address, labels={"app": "b"})
    kube.add_wm("web-b", wm_spec(b, "b"))
    w = kube_workersd(procs, fk, consul).start()
    both = expected("web-a", a) | expected("web-b", b)
    wait_published(consul, both, timeout=15)
    assert crd_installed_metric(w) == 1

    with CatalogMonitor(consul) as mon:
        kubectl(fk, tmp_path, "delete", "crd", "workermetrics.workersd.io")
        wait_published(consul, expected("web-a", a), timeout=30, what="WorkerMetrics targets gone")
        wait_until(lambda: crd_installed_metric(w) == 0, timeout=30, message="crd metric 0")
        code, body = readyz(w)
        assert code == 200 and "WorkerMetrics CRD" in body, body

        kubectl(fk, tmp_path, "apply", "-f", str(CRD_FILE))
        kube.add_wm("web-b", wm_spec(b, "b"))
        wait_published(consul, both, timeout=30, what="WorkerMetrics targets back")
        wait_until(lambda: crd_installed_metric(w) == 1, timeout=10, message="crd metric back to 1")
    assert mon.min_count("web-a") == len(expected("web-a", a)), "the annotated pod was unpublished"
    assert w.logs().count(CRD_ABSENT_LOG) == 1, w.logs()[-3000:]
    assert w.alive()


# --------------------------------------------------------------------------
# Native sidecars (Kubernetes >= 1.29): init containers with restartPolicy Always
# --------------------------------------------------------------------------


def add_sidecar_pod(kube: Kube, name: str, ip: str, *, labels=None, annotations=None):
    """A Running pod with one regular container `web` and a native sidecar `exporter`."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": kube.ns, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {
            "nodeName": "node-1",
            "initContainers": [
                {"name": "setup", "image": "busybox"},
                {"name": "exporter", "image": "exporter:1", "restartPolicy": "Always"},
            ],
            "containers": [{"name": "web", "image": "clever:1"}],
        },
    }
    kube.fk.ok("POST", f"/api/v1/namespaces/{kube.ns}/pods", body)
    kube.fk.set_pod_status(kube.ns, name, podIP=ip, phase="Running", running=True, ready=True)


def test_kubernetes_native_sidecar_ports_are_probed_while_it_runs(procs, cluster):
    """`workersd.io/ports.<sidecar>` and a WorkerMetrics `containers[].name` naming a native
    sidecar are probed while it runs (its state is in status.initContainerStatuses); a name
    matching no container or sidecar gets a Warning Event instead of silence."""
    fk, consul, kube = cluster
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()  # the "sidecar" of pod side-a
    b = Gunicorn(procs, address="127.0.0.3", workers=2).start()  # the "sidecar" of pod side-b
    add_sidecar_pod(
        kube,
        "side-a",
        a.address,
        annotations={
            "workersd.io/service": SERVICE,
            "workersd.io/ports.exporter": f"{a.metrics_first}-{a.metrics_last}",
            "workersd.io/ports.nope": "9500",
        },
    )
    add_sidecar_pod(kube, "side-b", b.address, labels={"app": "b"})
    kube.add_wm(
        "side-b",
        {
            "selector": {"matchLabels": {"app": "b"}},
            "service": SERVICE,
            "containers": [
                {"name": "exporter", "ports": f"{b.metrics_first}-{b.metrics_last}"},
                {"name": "ghost", "ports": "9600"},
            ],
        },
    )
    w = kube_workersd(procs, fk, consul).start(wait_ready=False)

    def with_container(g, pod):
        return {(p, addr, port) for p, addr, port in expected(pod, g)}

    both = with_container(a, "side-a") | with_container(b, "side-b")
    entries = wait_published(consul, both, timeout=30, what="sidecar workers")
    assert {e["ServiceMeta"]["k8s-container"] for e in entries} == {"exporter"}

    def unknown_events(pod):
        return [e for e in kube.events(pod) if e.get("reason") == "UnknownContainer"]

    (ev,) = wait_until(lambda: unknown_events("side-a"), timeout=15, message="UnknownContainer Event on side-a")
    assert ev["type"] == "Warning" and "metadata.annotations[workersd.io/ports.nope]" in ev["message"], ev
    assert "sidecars: exporter" in ev["message"], ev["message"]
    (ev,) = wait_until(lambda: unknown_events("side-b"), timeout=15, message="UnknownContainer Event on side-b")
    assert "WorkerMetrics side-b spec.containers[1].name" in ev["message"], ev["message"]

    # The sidecar of side-a stops (crash-looping): its workers are no longer published.
    stopped = [
        {"name": "setup", "image": "busybox", "imageID": "", "ready": True, "started": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
        {"name": "exporter", "image": "exporter:1", "imageID": "", "ready": False, "started": False,
         "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
    ]
    fk.set_pod_status(NS, "side-a", initContainerStatuses=stopped)
    wait_published(consul, with_container(b, "side-b"), timeout=15, what="side-a's sidecar stopped")
    fk.set_pod_status(NS, "side-a", running=True, ready=True, restartCount=1)
    wait_published(consul, both, timeout=15, what="side-a's sidecar running again")
    assert len(unknown_events("side-a")) == 1, "reported once, not on every resolution"
    assert w.alive()


# --------------------------------------------------------------------------
# Streaming lists: workersd lists and watches whether or not the WatchList gate is on
# --------------------------------------------------------------------------


@pytest.mark.parametrize("watch_list", [False, True], ids=["watchlist-off", "watchlist-on"])
def test_kubernetes_works_with_the_watchlist_gate_off_and_on(procs, watch_list):
    """A 1.30 server refuses sendInitialEvents=true with 422 unless the WatchList gate is on;
    workersd uses paged lists then watches, so it syncs either way."""
    fk = FakeKube(procs, extra_args=["--watch-list"] if watch_list else []).start()
    assert fk.ok("GET", "/_control/config")["watchList"] is watch_list
    consul = ConsulDouble(procs).start()
    kube = Kube(fk, NS)
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    w = kube_workersd(procs, fk, consul).start()
    wait_published(consul, expected("web-a", a), timeout=15)
    by_verb = fk.requests()["byVerb"]
    assert by_verb.get("list pods", 0) >= 1 and by_verb.get("watch pods", 0) >= 1, by_verb
    assert w.alive()
