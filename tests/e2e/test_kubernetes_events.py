"""Warning Events of `workersd kubernetes` against the fake API server: they outlive the API
server's Event TTL while the problem lasts, and writing them never delays the catalog.

Helpers (kube_workersd, ...) are those of test_kubernetes_e2e.py; `cluster` is a conftest fixture.
"""

from __future__ import annotations

import time

from harness import Gunicorn, wait_until
from test_kubernetes_e2e import (
    SERVICE,
    expected,
    kube_workersd,
    ports_annotations,
    wait_published,
)

BAD = {"workersd.io/service": SERVICE, "workersd.io/ports": "9020-9011"}  # reversed range


def warnings(kube, pod):
    return [e for e in kube.events(pod) if e.get("reason") == "InvalidWorkerMetrics"]


def test_kubernetes_warning_events_outlive_the_event_ttl(procs, cluster):
    fk, consul, kube = cluster
    ttl = 4.0
    fk.config(eventTTLSeconds=ttl)  # kube-apiserver's --event-ttl, 1 h by default
    kube.add_pod("bad", "127.0.0.4", annotations=BAD)
    kube_workersd(procs, fk, consul, leader_election=False, event_refresh_interval="1500ms").start()
    (first,) = wait_until(lambda: warnings(kube, "bad"), timeout=15, message="Warning Event on pod bad")

    # For three TTLs the problem's Event never vanishes: its series is renewed before it expires.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 * ttl:
        current = warnings(kube, "bad")
        assert current, f"the Event expired {time.monotonic() - t0:.1f} s in while the problem persists"
        time.sleep(0.2)
    (renewed,) = warnings(kube, "bad")
    assert renewed["metadata"]["name"] == first["metadata"]["name"]
    assert renewed["series"]["count"] >= 1 + int(3 * ttl / 1.5) - 2, renewed.get("series")

    # A TTL shorter than the refresh interval: the Event expires, and is published again.
    fk.config(eventTTLSeconds=0.5)
    wait_until(lambda: not warnings(kube, "bad"), timeout=10, interval=0.05, message="the Event expired")
    fk.config(eventTTLSeconds=60)
    (again,) = wait_until(lambda: warnings(kube, "bad"), timeout=10, interval=0.05,
                          message="the Event published again")
    assert again["metadata"]["name"] != first["metadata"]["name"]
    assert "metadata.annotations[workersd.io/ports]" in again["message"], again


def test_kubernetes_slow_event_writes_never_delay_the_catalog(procs, cluster):
    fk, consul, kube = cluster
    a = Gunicorn(procs, address="127.0.0.2", workers=2).start()
    kube.add_pod("bad", "127.0.0.4", annotations=BAD)
    kube_workersd(procs, fk, consul, leader_election=False).start()
    wait_until(lambda: warnings(kube, "bad"), timeout=15, message="Warning Event on pod bad")

    # From now on every Event write hangs 20 s (an overloaded API server).
    fk.add_fault("/apis/events.k8s.io", code=200, count=100, method="POST", delay=20)
    kube.add_pod("bad-2", "127.0.0.5", annotations=BAD)
    t0 = time.monotonic()
    kube.add_pod("web-a", a.address, annotations=ports_annotations(a))
    wait_published(consul, expected("web-a", a), timeout=8, what="web-a while Event writes hang")
    print(f"\nweb-a published {time.monotonic() - t0:.2f} s after it appeared, Event writes hanging")
