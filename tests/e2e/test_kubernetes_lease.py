"""Leader election of `workersd kubernetes` against the fake API server, when the API server
is slow: the lease must be renewed on its own, whatever else the process waits for.

Helpers (cluster fixture, Kube, kube_workersd, ...) are those of test_kubernetes_e2e.py.
"""

from __future__ import annotations

import time

from harness import Gunicorn, wait_until
from test_kubernetes_e2e import (  # noqa: F401 - `cluster` is a fixture
    LEASE_PATH,
    cluster,
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
