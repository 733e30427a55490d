"""The motivating bug, measured by VictoriaMetrics.

Scraping the app port's /metrics (load-balanced over the workers) undercounts;
scraping every worker's own port counts every request. Also proves the
VictoriaMetrics runner end to end.
"""

import time

import pytest
from harness import Gunicorn, VictoriaMetrics, free_port_range

pytestmark = pytest.mark.harness  # no workersd code runs here (see TESTING.md)

N_REQUESTS = 100


def test_vm_per_worker_job_counts_all_requests_naive_job_does_not(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 metrics ports")

    vm = VictoriaMetrics(
        procs,
        {
            "scrape_configs": [
                {
                    "job_name": "naive",
                    "static_configs": [{"targets": [f"{g.address}:{g.app_port}"]}],
                },
                {
                    "job_name": "per-worker",
                    "static_configs": [{"targets": [f"{g.address}:{p}" for p in ports]}],
                },
            ]
        },
    ).start()
    vm.wait_for_targets(
        lambda ts: len([t for t in ts if t.get("health") == "up"]) == 5,
        what="5 healthy targets (1 naive + 4 per-worker)",
    )
    # Both jobs are ingested and queryable before traffic starts.
    vm.wait_for_value('count(request_processing_seconds_count{job="per-worker"})', lambda v: v == 4)
    vm.wait_for_value('sum(request_processing_seconds_count{job="naive"})', lambda v: v == 0)

    g.send_requests(N_REQUESTS, concurrency=8)
    sent_at = time.time()
    direct = g.per_worker_values()
    assert sum(direct.values()) == N_REQUESTS
    assert len([v for v in direct.values() if v > 0]) >= 2, direct

    per_worker = vm.wait_for_value(
        'sum(request_processing_seconds_count{job="per-worker"})',
        lambda v: v == N_REQUESTS,
        what=f"VM per-worker sum == {N_REQUESTS}",
    )
    assert per_worker == N_REQUESTS

    # The naive job sees one worker per scrape: some traffic, never all of it.
    vm.wait_for_value(
        'sum(request_processing_seconds_count{job="naive"})',
        lambda v: v is not None and v > 0,
        what="a naive scrape that hit a busy worker",
    )
    window = max(2, int(time.time() - sent_at) + 2)
    naive_max = vm.query_value(
        f'max_over_time(request_processing_seconds_count{{job="naive"}}[{window}s])'
    )
    assert naive_max is not None and 0 < naive_max < N_REQUESTS, naive_max
    assert naive_max <= max(direct.values())
