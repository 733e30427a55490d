"""Consul outages and data loss: workersd keeps probing and converges when Consul returns.

1. The Consul double goes down (API socket closed, connections refused) while gunicorn
   scales down twice and up once, stays down a few seconds, then comes back EMPTY (its
   catalog lost), or with its old catalog (2 entries stale by now). workersd must converge
   to exactly the live endpoints: no stale entry, none missing, no duplicate IDs, node
   re-created; its /metrics counts the Consul errors and the
   process stays alive.
2. Consul wipes its catalog while up (no error for workersd to notice): README promises a
   re-fill within one --consul-resync-interval.
"""

import time

import pytest
from harness import wait_until

SERVICE = "outage"
NODE = "workersd-e2e-outage"
RESYNC = 1.0


def exact(consul, ports):
    """The catalog holds exactly one well-formed entry per live port, and nothing else."""
    entries = consul.catalog_service(SERVICE)
    ids = [e["ServiceID"] for e in entries]
    return (
        sorted(e["ServicePort"] for e in entries) == ports
        and len(set(ids)) == len(ids)
        and ids == [f"{NODE}:{SERVICE}:127.0.0.2:{p}" for p in sorted(ports)]
        and all(e["ServiceMeta"].get("workersd-owner") == NODE for e in entries)
        and all(e["NodeMeta"] == {"external-source": "workersd"} for e in entries)
    )


def consul_errors(wd):
    return wd.metric("workersd_sink_errors_total", {"sink": "consul"}) or 0


@pytest.mark.parametrize("comes_back", ["empty", "with-old-catalog"])
def test_outage_with_changes_then_consul_returns_converges_exactly(consul_stack, comes_back):
    g, consul, wd = consul_stack(SERVICE, NODE, consul_resync_interval=f"{RESYNC:g}s")
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports")
    wait_until(lambda: exact(consul, ports), message=lambda: f"entries for {ports}")
    assert consul_errors(wd) == 0

    consul.down()
    down_at = time.monotonic()
    g.scale_down()
    g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports (TTOU while down)")
    g.scale_down()
    g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 ports (2nd TTOU while down)")
    g.scale_up()
    live = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports (TTIN while down)")
    # Probing goes on while Consul is down: HTTP SD already follows.
    wait_until(
        lambda: wd.http_sd_targets() == [f"127.0.0.2:{p}" for p in live],
        message=lambda: f"HTTP SD follows to {live} while Consul is down",
    )
    wait_until(lambda: consul_errors(wd) >= 2, message="Consul errors counted while down")
    time.sleep(max(0.0, 4.0 - (time.monotonic() - down_at)))  # down >= 4 s
    errors_while_down = consul_errors(wd)
    assert wd.alive()

    consul.up(empty=comes_back == "empty")
    up_at = time.monotonic()
    if comes_back == "empty":
        assert consul.catalog_services() == {}
    else:  # the old catalog: 4 entries, 2 of them stale by now
        assert sorted(e["ServicePort"] for e in consul.catalog_service(SERVICE)) == ports
    # Backoff is capped at 30 s; after a ~4-6 s outage the next retry comes within ~7 s.
    wait_until(
        lambda: exact(consul, live),
        timeout=40,
        interval=0.1,
        message=lambda: f"exactly {live} after Consul came back {comes_back}, now "
        f"{[(e['ServiceID'], e['ServicePort']) for e in consul.catalog_service(SERVICE)]}",
    )
    converged = time.monotonic() - up_at
    print(
        f"outage {up_at - down_at:.1f}s; converged {converged:.2f}s after Consul came back "
        f"{comes_back}; consul sink errors {errors_while_down:.0f}"
    )

    # The node was re-created and holds exactly the live entries; it stays exact.
    node = consul.node_services(NODE)
    assert node["Node"]["Meta"] == {"external-source": "workersd"}
    assert sorted(s["Port"] for s in node["Services"]) == live
    for _ in range(int(2.5 * RESYNC / 0.25)):
        assert exact(consul, live), consul.catalog_service(SERVICE)
        time.sleep(0.25)
    assert consul_errors(wd) >= errors_while_down > 0
    assert wd.alive()
    assert wd.readyz() == 200


def test_wipe_while_up_is_refilled_within_one_resync_interval(consul_stack):
    g, consul, wd = consul_stack(SERVICE, NODE, workers=3, consul_resync_interval=f"{RESYNC:g}s")
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports")
    wait_until(lambda: exact(consul, ports), message=lambda: f"entries for {ports}")
    refill = []
    for _ in range(3):
        consul.wipe()
        wiped_at = time.monotonic()
        wait_until(
            lambda: exact(consul, ports),
            timeout=30,
            interval=0.05,
            message=lambda: f"re-filled with {ports}",
        )
        refill.append(time.monotonic() - wiped_at)
        time.sleep(0.37)  # vary the phase against the resync timer
    print("re-filled after wipe in " + ", ".join(f"{t:.2f}s" for t in refill))
    # One resync interval, plus the write and the test's polling.
    assert max(refill) <= RESYNC + 1.0, refill
    assert consul_errors(wd) == 0, "a wiped catalog is not an error"
    assert wd.alive()
