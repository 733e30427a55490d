"""The Prometheus runner end to end: file_sd targets pointing at worker ports."""

import json

import pytest
from harness import Gunicorn, Prometheus, free_port_range

pytestmark = pytest.mark.harness  # no workersd code runs here (see TESTING.md)


def test_prometheus_scrapes_worker_ports_from_file_sd(procs):
    first, last = free_port_range("127.0.0.3", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.3", metrics_ports=(first, last), workers=2).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 metrics ports")

    sd_file = procs.path("file_sd", "workers.json")

    def write_targets(target_ports):
        tmp = sd_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                [{"targets": [f"{g.address}:{p}" for p in target_ports], "labels": {"pod": "a"}}]
            )
        )
        tmp.replace(sd_file)

    write_targets(ports[:1])
    prom = Prometheus(
        procs,
        {
            "scrape_configs": [
                {"job_name": "workers", "file_sd_configs": [{"files": [str(sd_file)]}]}
            ]
        },
    ).start()

    prom.wait_for_targets(
        lambda ts: [t["scrapeUrl"] for t in ts if t["health"] == "up"] == [g.metrics_url(ports[0])],
        what="exactly the first worker port up",
    )
    assert prom.targets()[0]["labels"]["pod"] == "a"

    g.send_requests(40, concurrency=4)
    direct = g.per_worker_values()
    assert sum(direct.values()) == 40

    # One target: Prometheus sees exactly that worker's share.
    prom.wait_for_value(
        'sum(request_processing_seconds_count{job="workers"})',
        lambda v: v == direct[ports[0]],
        what=f"first worker's count {direct[ports[0]]}",
    )

    # file_sd change is picked up (refresh_interval 1s): now all of it.
    write_targets(ports)
    prom.wait_for_targets(
        lambda ts: sorted(t["scrapeUrl"] for t in ts if t["health"] == "up")
        == [g.metrics_url(p) for p in ports],
        what="both worker ports up",
    )
    total = prom.wait_for_value(
        'sum(request_processing_seconds_count{job="workers"})',
        lambda v: v == 40,
        what="sum over both workers == 40",
    )
    assert total == 40
    assert prom.query_value('count(up{job="workers"} == 1)') == 2
