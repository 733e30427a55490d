"""Leader election of `workersd kubernetes` against the fake API server, when the API server
is slow: the lease must be renewed on its own, whatever else the process waits for.

Helpers (kube_workersd, ...) are those of test_kubernetes_e2e.py; `cluster` is a conftest fixture.
"""

from __future__ import annotations

import time

from harness import Gunicorn, wait_until
from test_kubernetes_e2e import (
    LEASE_PATH,
    expected,
    kube_workersd,
    ports_annotations,
    readyz,
    wait_published,
)


def lease_spec(fk) -> dict:
    return fk.ok("GET", LEASE_PATH)["spec"]


def test_kubernetes_slow_initial_list_keeps_the_lease(procs, cluster):
    """A list slower than the whole lease (normal on a big cluster) must not cost the lease:
    renewal runs from the moment the lease is held, during the initial sync."""
    fk, consul, kube = cluster
    lease = 3
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    # Every list (pods and WorkerMetrics) answers after two lease durations; watches start late too.
    list_latency = 2 * lease
    fk.set_latency(list=list_latency, page=0.5, watch=1.0)

    w = kube_workersd(procs, fk, consul, identity="wd-a", lease_duration=f"{lease}s")
    t0 = time.monotonic()
    w.start(wait_ready=False)
    wait_until(lambda: lease_spec(fk).get("holderIdentity") == "wd-a", timeout=20, interval=0.1,
               message="wd-a holds the lease")
    first_renew = lease_spec(fk)["renewTime"]

    # While the lists are still pending, the lease keeps being renewed.
    renewed = wait_until(
        lambda: readyz(w)[0] != 200 and lease_spec(fk)["renewTime"] != first_renew and time.monotonic(),
        timeout=lease,
        interval=0.1,
        message="the lease renewed during the initial sync",
    )
    assert w.alive(), w.logs()

    wait_until(lambda: readyz(w)[0] == 200, timeout=list_latency + 20, interval=0.1,
               message="workersd ready after the slow initial sync")
    ready = time.monotonic() - t0
    print(f"\nlease renewed {renewed - t0:.2f} s after start; ready after {ready:.2f} s "
          f"(lists take {list_latency} s, lease {lease} s)")
    assert ready >= list_latency, "the lists were not slow: the test proves nothing"
    wait_published(consul, expected("web-a", a), timeout=15)

    # Still the leader, still renewing, never exited: watch it for two more lease durations.
    last = lease_spec(fk)["renewTime"]
    deadline = time.monotonic() + 2 * lease
    renewals = 0
    while time.monotonic() < deadline:
        assert w.alive(), f"workersd exited:\n{w.logs()[-3000:]}"
        spec = lease_spec(fk)
        assert spec["holderIdentity"] == "wd-a", spec
        if spec["renewTime"] != last:
            renewals += 1
            last = spec["renewTime"]
        time.sleep(0.1)
    assert renewals >= 2, renewals
    assert lease_spec(fk).get("leaseTransitions", 0) == 0
    assert "could not renew" not in w.logs()


def is_ready(w) -> bool:
    try:
        return readyz(w)[0] == 200
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def lease_writes(fk) -> list[tuple[float, str | None]]:
    """(wall time, holder) of every write of the Lease, oldest first (the fake's write log)."""
    return [(w["time"], (w["object"].get("spec") or {}).get("holderIdentity"))
            for w in fk.writes("leases") if w["key"].endswith("/workersd")]


def test_kubernetes_leaders_never_overlap_when_renewal_hangs(procs, cluster):
    """The old leader must have stopped before the new one's takeover write, and the takeover
    comes a whole lease after the old holder's last write (client-go's observed-time rule)."""
    fk, consul, kube = cluster
    lease = 3
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    leader = kube_workersd(procs, fk, consul, identity="wd-a", lease_duration=f"{lease}s").start()
    standby = kube_workersd(procs, fk, consul, identity="wd-b", lease_duration=f"{lease}s")
    standby.start(wait_ready=False)
    wait_until(lambda: readyz(standby)[0] == 503, timeout=20, message="standby up")
    wait_published(consul, expected("web-a", a), timeout=10)

    # The leader's next renewal (a PUT; the standby only GETs while it waits) hangs 25 s.
    fk.add_fault(LEASE_PATH, code=200, count=1, method="PUT", delay=25)
    stopped = None
    deadline = time.monotonic() + 3 * lease + 10
    while time.monotonic() < deadline:
        if stopped is None and not leader.alive():
            stopped = time.time()  # wall clock, as the fake's write log
        if stopped is not None and lease_spec(fk).get("holderIdentity") == "wd-b":
            break
        time.sleep(0.02)
    assert stopped is not None, "the old leader never stepped down"
    writes = lease_writes(fk)
    takeover = next(t for t, holder in writes if holder == "wd-b")
    last_a = max(t for t, holder in writes if holder == "wd-a" and t < takeover)
    print(f"\nold leader's last write -> its exit {stopped - last_a:.2f} s; -> takeover {takeover - last_a:.2f} s "
          f"(lease {lease} s)")
    assert stopped < takeover, (
        f"two leaders for {stopped - takeover:.2f} s: the old leader exited after the takeover write")
    assert takeover - last_a >= lease - 0.05, "taken over before the lease expired"
    wait_until(lambda: readyz(standby)[0] == 200, timeout=15, message="new leader ready")


def test_kubernetes_two_instances_starting_at_once_elect_one_leader(procs, cluster):
    """Both find no Lease and create it; the apiserver lets one create win (the other gets 409
    AlreadyExists) and only that one ever leads."""
    fk, consul, kube = cluster
    lease = 3
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    fk.reset_requests()
    # Each create of the Lease is held 1 s before the server handles it, so both instances'
    # creates are in flight at once: one wins, the other gets 409 AlreadyExists.
    fk.add_fault("/apis/coordination.k8s.io/v1/namespaces/default/leases", code=200, count=2,
                 method="POST", delay=1.0)
    pair = [kube_workersd(procs, fk, consul, identity=i, lease_duration=f"{lease}s") for i in ("wd-a", "wd-b")]
    for w in pair:
        w.start(wait_ready=False)
    wait_published(consul, expected("web-a", a), timeout=20)
    creates = fk.requests()["byVerb"].get("create leases.coordination.k8s.io", 0)
    # Watch both for three lease durations: exactly one is ready at any time, always the same.
    ready_ones = set()
    t_end = time.monotonic() + 3 * lease
    while time.monotonic() < t_end:
        ready = {w for w in pair if is_ready(w)}
        assert len(ready) <= 1, "two instances ready (leading) at once"
        ready_ones |= ready
        time.sleep(0.05)
    assert len(ready_ones) == 1, "the leader changed: " + "\n".join(w.logs()[-1500:] for w in pair)
    (winner,) = ready_ones
    holders = {holder for _, holder in lease_writes(fk)}
    assert len(holders) == 1, f"the lease changed hands: {holders}"
    assert len(fk.watches("pods")) == 1, "only the leader watches"
    assert all(w.alive() for w in pair)
    added = [w for w in fk.writes("leases") if w["type"] == "ADDED"]
    print(f"\n{creates} create(s) of the Lease, {len(added)} stored; leader {holders}")
    assert creates == 2 and len(added) == 1, "both created the Lease at once; one got 409"
