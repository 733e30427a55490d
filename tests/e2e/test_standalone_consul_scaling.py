"""Scaling gunicorn while workersd publishes to Consul: the catalog follows the workers.

Latency is measured from the moment the test saw a worker's metrics port close (TTOU) or
open (TTIN), polling every 20 ms, to the moment the Consul double listed exactly the
listening ports; it must stay within two probe intervals plus slack. Two regimes:

- steady: `--fast-period 100ms`, so detection relies on `--probe-interval 1s` alone
  (README: steady targets are swept every probe interval);
- fast: the default fast window (500 ms sweeps for 30 s after a change).

With held connections (the default `--liveness hold`) a worker's exit is noticed when it
closes its connection, so even at a 30 s probe interval Consul follows within about a second,
while Prometheus can still scrape every held worker.

`--max-requests` recycling (workers exiting and re-binding ports, plus a TTOU in the
middle) must end with the entries equal to exactly the listening ports, and staying so.
"""

import time
import urllib.request

import pytest
from harness import wait_until

SERVICE = "scaling"
NODE = "workersd-e2e-scaling"
PROBE_INTERVAL = 1.0
FAST_INTERVAL = 0.5
SLACK = 1.0  # sweep + Consul write + the test's own polling, on a slow 2-core machine


def start_stack(
    consul_stack,
    workers,
    gunicorn_args=(),
    work_seconds=None,
    probe_interval=PROBE_INTERVAL,
    **workersd_flags,
):
    return consul_stack(
        SERVICE,
        NODE,
        workers=workers,
        gunicorn={"extra_args": list(gunicorn_args), "work_seconds": work_seconds},
        probe_interval=f"{probe_interval:g}s",
        **workersd_flags,
    )


def consul_ports(consul):
    return consul.owned_ports(SERVICE, NODE)


def measure_follow(g, consul, change, expected_count, what):
    """Run change(); return (seconds from the port change to Consul following, ports)."""
    change()
    last_old = time.monotonic()  # start of the last poll that still saw the old port set

    def port_changed():
        nonlocal last_old
        started = time.monotonic()
        ports = g.listening_metrics_ports()
        if len(ports) == expected_count:
            return ports
        last_old = started
        return None

    ports = wait_until(
        port_changed,
        timeout=30,
        interval=0.02,
        message=lambda: f"{what}: {expected_count} listening ports",
    )
    wait_until(
        lambda: consul_ports(consul) == ports,
        timeout=30,
        interval=0.05,
        message=lambda: f"{what}: Consul follows to {ports}, now {consul_ports(consul)}",
    )
    # Upper bound: from the last poll that still saw the old set to Consul's answer.
    return time.monotonic() - last_old, ports


@pytest.mark.parametrize(
    "regime,workersd_flags,interval",
    [
        pytest.param("steady", {"fast_period": "100ms"}, PROBE_INTERVAL, id="steady"),
        pytest.param("fast", {}, FAST_INTERVAL, id="fast"),
    ],
)
def test_scale_down_and_up_follow_within_two_probe_intervals(consul_stack, regime, workersd_flags, interval):
    g, consul, wd = start_stack(consul_stack, workers=4, **workersd_flags)
    start_ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports")
    wait_until(
        lambda: consul_ports(consul) == start_ports,
        message=lambda: f"initial entries {start_ports}, now {consul_ports(consul)}",
    )
    if regime == "steady":
        # Let the start-up fast sweep and the phase-spread first slow sweep pass.
        time.sleep(2 * PROBE_INTERVAL + 0.5)

    bound = 2 * interval + SLACK
    latencies = {}
    for step, (change, count) in enumerate(
        [(g.scale_down, 3), (g.scale_down, 2), (g.scale_up, 3), (g.scale_up, 4)]
    ):
        name = f"{'TTOU' if change == g.scale_down else 'TTIN'}#{step + 1} -> {count}"
        latency, ports = measure_follow(g, consul, change, count, name)
        latencies[name] = latency
        print(f"[{regime}] {name}: ports {ports}, Consul followed in {latency:.3f}s")
        assert latency <= bound, f"{name}: Consul followed after {latency:.2f}s > {bound:.1f}s"
        # Exactly one entry per live worker, IDs unique, HTTP SD agrees.
        entries = consul.owned_entries(SERVICE, NODE)
        assert len({e["ServiceID"] for e in entries}) == len(entries) == count
        assert wd.http_sd_targets() == [f"127.0.0.2:{p}" for p in ports]
        if regime == "steady":
            # A detected change is followed by one 500 ms fast sweep, then the 1 s grid
            # resumes. Wait past that sweep, by a different amount each step, so the next
            # change lands at a different phase of the grid (0.2 s .. 0.95 s after a sweep):
            # otherwise every change would land just before a sweep and look instant.
            time.sleep(0.7 + 0.25 * step)

    summary = ", ".join(f"{k}={v:.2f}s" for k, v in latencies.items())
    print(f"[{regime}] latencies (bound {bound:.1f}s): {summary}")
    # TTIN takes the first free port again: back to the original compact set.
    assert consul_ports(consul) == start_ports
    assert wd.metric("workersd_sink_operations_total", {"sink": "consul", "op": "deregister"}) == 2
    assert wd.metric("workersd_sink_errors_total", {"sink": "consul"}) in (None, 0)


def test_held_workers_exit_is_followed_at_once_at_a_30s_interval(consul_stack):
    g, consul, wd = start_stack(
        consul_stack, workers=3, fast_period="100ms", probe_interval=30
    )
    start_ports = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports")
    wait_until(
        lambda: consul_ports(consul) == start_ports
        and wd.metric("workersd_held_connections") == 3,
        message=lambda: f"3 entries and 3 held connections: {consul_ports(consul)}, "
        f"{wd.metric('workersd_held_connections')}",
    )
    # Held by workersd, each worker's prometheus_client server still answers a scrape.
    for port in start_ports:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=2) as r:
            assert r.status == 200
    live_probes = wd.metric("workersd_probes_total", {"result": "live"})

    latency, ports = measure_follow(g, consul, g.scale_down, 2, "TTOU -> 2")
    print(f"held: Consul followed a worker's exit in {latency:.3f}s at a 30 s interval")
    assert latency <= 2 * FAST_INTERVAL + SLACK, f"followed after {latency:.2f}s"
    assert wd.metric("workersd_held_connections") == 2
    # Noticing the exit took a probe of the closed port only: no live worker was reconnected.
    assert wd.metric("workersd_probes_total", {"result": "live"}) == live_probes
    assert wd.http_sd_targets() == [f"127.0.0.2:{p}" for p in ports]


def test_max_requests_recycling_converges_to_listening_ports(consul_stack):
    g, consul, wd = start_stack(
        consul_stack,
        workers=3,
        gunicorn_args=["--max-requests", "10", "--max-requests-jitter", "0"],
        work_seconds=0.005,
    )
    g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports")
    pids_before = set(g.worker_pids())

    # >= 6 worker processes serve 60 requests; a TTOU lands in the middle of the churn.
    g.send_requests(30, concurrency=3)
    g.scale_down()
    g.send_requests(30, concurrency=3)

    def settled():
        workers = g.worker_pids()
        ports = g.listening_metrics_ports()
        owners = g.port_owners()
        counts = g.per_worker_values()
        ok = (
            len(workers) == 2
            and len(ports) == 2
            and sorted(owners.get(p, -1) for p in ports) == workers
            and sorted(counts) == ports
            and all(v < 10 for v in counts.values())  # nobody is about to recycle
            and consul_ports(consul) == ports
            and wd.http_sd_targets() == [f"127.0.0.2:{p}" for p in ports]
        )
        return ok and ports

    ports = wait_until(
        settled,
        message=lambda: f"2 settled workers and Consul == listening ports: workers="
        f"{g.worker_pids()} ports={g.listening_metrics_ports()} consul={consul_ports(consul)}",
    )
    assert not pids_before & set(g.worker_pids()), "every original worker was recycled"
    assert len({pid for pid, _ in g.port_assignments()}) >= 6

    # Converged, and it stays so (no flapping, no late stale write) for > 2 probe intervals.
    deadline = time.monotonic() + 2.5
    checks = 0
    while time.monotonic() < deadline:
        entries = consul.owned_entries(SERVICE, NODE)
        assert sorted(e["ServicePort"] for e in entries) == ports, entries
        assert len({e["ServiceID"] for e in entries}) == 2
        assert g.listening_metrics_ports() == ports
        checks += 1
        time.sleep(0.1)
    assert checks >= 10
    print(f"recycled into ports {ports}; assignments {g.port_assignments()}")
