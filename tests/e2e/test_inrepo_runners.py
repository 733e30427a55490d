"""Smoke tests of the runners for the in-repo binaries (workersd, consul-double).

They prove the harness drives the binaries; the scenario tests build on them.
Skipped when a binary is missing, failed instead under scripts/test-all
(E2E_REQUIRE_BINARIES=1), which builds them first.
"""

import pytest
import requests
from harness import (
    ConsulDouble,
    Gunicorn,
    VictoriaMetrics,
    Workersd,
    free_port_range,
    wait_until,
)


def _targets_yaml(service, address, first, last):
    return (
        "targets:\n"
        f"  - service: {service}\n"
        f"    address: {address}\n"
        f"    ports: {first}-{last}\n"
    )


def test_workersd_http_sd_follows_workers_and_vm_counts_all(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=3).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 metrics ports")

    targets = procs.path("targets.yaml")
    targets.write_text(_targets_yaml("smoke", "127.0.0.2", first, last))
    wd = Workersd(procs, targets=targets).start()
    assert wd.readyz() == 200

    expected = [f"127.0.0.2:{p}" for p in ports]
    wait_until(
        lambda: wd.http_sd_targets() == expected,
        message=lambda: f"http_sd == {expected}, now {wd.http_sd()}",
    )
    assert "workersd_" in wd.metrics_text()

    vm = VictoriaMetrics(
        procs,
        {"scrape_configs": [{"job_name": "smoke", "http_sd_configs": [{"url": wd.http_sd_url}]}]},
    ).start()
    vm.wait_for_targets(
        lambda ts: sorted(t["scrapeUrl"] for t in ts if t["health"] == "up")
        == [g.metrics_url(p) for p in ports],
        what="VM scrapes the 3 worker ports found via workersd",
    )
    g.send_requests(60, concurrency=6)
    vm.wait_for_value(
        'sum(request_processing_seconds_count{job="smoke"})', lambda v: v == 60, what="VM sum == 60"
    )

    # A worker leaves: workersd drops its port.
    g.scale_down()
    left = g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 ports after TTOU")
    wait_until(
        lambda: wd.http_sd_targets() == [f"127.0.0.2:{p}" for p in left],
        message=lambda: f"http_sd follows TTOU to {left}, now {wd.http_sd()}",
    )


@pytest.mark.harness
def test_consul_double_runner_controls(procs):
    consul = ConsulDouble(procs).start()
    assert "web" not in consul.catalog_services()
    consul.register(
        {"Node": "vm-1", "Address": "127.0.0.9", "Service": {"ID": "web-1", "Service": "web", "Port": 8080}}
    )
    assert [e["ServicePort"] for e in consul.catalog_service("web")] == [8080]

    # down: connections refused; up: the same catalog is served again.
    consul.down()
    with pytest.raises(requests.RequestException):
        consul.catalog_services()
    consul.up()
    wait_until(lambda: "web" in consul.catalog_services(), message="API back after up, catalog kept")
    # wipe: every registration is gone (a lost Consul data directory).
    consul.wipe()
    assert "web" not in consul.catalog_services()
    assert consul.catalog_service("web") == []
