"""examples/gunicorn on its own (no workersd): one metrics port per worker."""

import collections
import re

import pytest
from harness import Gunicorn, free_port_range, parse_metric, wait_until

pytestmark = pytest.mark.harness  # no workersd code runs here (see TESTING.md)

COUNT = "request_processing_seconds_count"


def _pid_of(body: str) -> int:
    m = re.search(r"served by worker pid (\d+)", body)
    assert m, f"unexpected body {body!r}"
    return int(m.group(1))


def test_every_worker_gets_own_port_and_counts_add_up(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()

    # Exactly 4 ports, and they are the first 4 of the range (first free each).
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="exactly 4 metrics ports")
    assert ports == [first, first + 1, first + 2, first + 3]
    owners = wait_until(
        lambda: len(g.port_owners()) == 4 and g.port_owners(), message="4 port log lines"
    )
    assert sorted(owners.values()) == g.worker_pids(), (owners, g.worker_pids())
    assert g.workers_without_port() == []
    assert set(g.per_worker_values().values()) == {0.0}

    bodies = g.send_requests(100, concurrency=8)

    per_worker = g.per_worker_values()
    assert sorted(per_worker) == ports
    assert sum(per_worker.values()) == 100, per_worker
    busy = [p for p, v in per_worker.items() if v > 0]
    assert len(busy) >= 2, f"requests did not spread over workers: {per_worker}"

    # Each port's count is exactly what its owning worker answered.
    served = collections.Counter(_pid_of(b) for b in bodies)
    assert {port: served.get(pid, 0) for port, pid in owners.items()} == {
        p: int(v) for p, v in per_worker.items()
    }

    # The naive load-balanced /metrics on the app port shows one worker only.
    naive_values = []
    for _ in range(8):
        value = parse_metric(g.naive_scrape(), COUNT)
        assert value is not None, "naive /metrics lacks the request counter"
        naive_values.append(value)
    assert all(v < 100 for v in naive_values), naive_values
    assert set(naive_values) <= set(per_worker.values()), (naive_values, per_worker)


def test_ttou_frees_a_port_and_ttin_takes_first_free(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    before = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 metrics ports")
    pids_before = set(g.worker_pids())
    assert len(pids_before) == 4

    g.scale_down()
    after_down = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports after TTOU")
    freed = set(before) - set(after_down)
    assert len(freed) == 1 and set(after_down) < set(before), (before, after_down)
    wait_until(lambda: len(g.worker_pids()) == 3, message="3 workers after TTOU")
    # The stopped worker's port is really free again (bindable).
    (freed_port,) = freed
    assert freed_port not in g.listening_metrics_ports()

    g.scale_up()
    after_up = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports after TTIN")
    assert after_up == before, "new worker must take the first free port"
    new_pids = set(g.worker_pids()) - pids_before
    assert len(new_pids) == 1
    assert g.port_owners()[freed_port] == new_pids.pop()

    # Growing past the original size takes the next port of the range.
    g.scale_up()
    grown = g.wait_for_metrics_ports(lambda p: len(p) == 5, what="5 ports after 2nd TTIN")
    assert grown == list(range(first, first + 5))

    # Every live worker answers on its port, each with its own registry.
    assert sorted(g.per_worker_values()) == grown


def test_max_requests_recycling_rebinds_port(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(
        procs,
        address="127.0.0.2",
        metrics_ports=(first, last),
        workers=2,
        extra_args=["--max-requests", "10", "--max-requests-jitter", "0"],
        work_seconds=0.005,
    ).start()
    g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 metrics ports")

    # 40 requests, at most 10 per worker process: >= 4 processes must serve.
    bodies = g.send_requests(40, concurrency=2)
    serving_pids = {_pid_of(b) for b in bodies}
    assert len(serving_pids) >= 4, serving_pids

    def recycled_and_settled():
        workers = g.worker_pids()
        ports = g.listening_metrics_ports()
        owners = g.port_owners()
        # A worker that has served its 10th request is about to exit: not settled.
        counts = g.per_worker_values()
        return (
            len(workers) == 2
            and ports == [first, first + 1]
            and sorted(owners.get(p, -1) for p in ports) == workers
            and sorted(counts) == ports
            and all(v < 10 for v in counts.values())
        )

    wait_until(
        recycled_and_settled,
        message=lambda: f"2 fresh workers on ports {first},{first + 1}: workers={g.worker_pids()} "
        f"ports={g.listening_metrics_ports()} owners={g.port_owners()}",
    )
    # Replacements re-bound the freed ports: never a port beyond the first two.
    assignments = g.port_assignments()
    assert {port for _, port in assignments} == {first, first + 1}, assignments
    assert len({pid for pid, _ in assignments}) >= 4, assignments
    assert g.workers_without_port() == []
    # Counters are per process: what the live workers hold is less than was sent.
    assert sum(g.per_worker_values().values()) < 40
