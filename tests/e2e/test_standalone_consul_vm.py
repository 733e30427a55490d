"""The seed scenario: gunicorn -> workersd -> Consul -> VictoriaMetrics, counting every request.

gunicorn (examples/gunicorn, as is) runs 4 workers on 127.0.0.2; workersd (standalone)
publishes each worker's metrics port to the Consul double; VictoriaMetrics discovers them
through `consul_sd_configs` with README.md's relabel rules taken verbatim from the README.
After 100 concurrent requests the per-worker job sums to exactly 100, while a naive job
scraping the app port's load-balanced /metrics in the same VM sees less.

A foreign entry of the same service name (another tool's, pointing at the naive app-port
/metrics) is registered too: without README's `keep external-source=workersd` rule VM would
scrape it under the same job and the sum would be off.
"""

import time

from harness import (
    ConsulDouble,
    Gunicorn,
    VictoriaMetrics,
    Workersd,
    free_port_range,
    readme_yaml_block,
    targets_yaml,
    wait_until,
    write_atomic,
)

SERVICE = "clever"  # README's example service name (its consul_sd_configs select it)
NODE = "workersd-e2e-seed"
N_REQUESTS = 100


def readme_consul_job(server: str, job_name: str) -> dict:
    """README's consul_sd_configs job, with only the server address and job name changed."""
    (job,) = readme_yaml_block("### consul_sd_configs")["scrape_configs"]
    (sd,) = job["consul_sd_configs"]
    assert sd["services"] == [SERVICE], sd
    sd["server"] = server
    job["job_name"] = job_name
    return job


def test_seed_scenario(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 metrics ports")

    consul = ConsulDouble(procs).start()
    # Another tool's entry for the same service: the naive app port. Must be dropped by
    # README's keep rule, and must never be touched by workersd.
    consul.register(
        {
            "Node": "legacy-host",
            "Address": "127.0.0.2",
            "NodeMeta": {"owner": "legacy-tool"},
            "Service": {
                "ID": "legacy-clever",
                "Service": SERVICE,
                "Address": g.address,
                "Port": g.app_port,
                "Tags": ["legacy"],
                "Meta": {"team": "web"},
            },
        }
    )
    (foreign_before,) = consul.catalog_service(SERVICE)

    targets = procs.path("targets.yaml")
    write_atomic(
        targets,
        targets_yaml(
            [
                {
                    "service": SERVICE,
                    "address": "127.0.0.2",
                    "ports": (first, last),
                    "tags": ["gunicorn"],
                    "meta": {"team": "web"},
                }
            ]
        ),
    )
    wd = Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start()

    # -- the Consul entries' shape ------------------------------------------------
    wait_until(
        lambda: consul.owned_ports(SERVICE, NODE) == ports,
        message=lambda: f"Consul entries for {ports}, now {consul.catalog_service(SERVICE)}",
    )
    entries = consul.owned_entries(SERVICE, NODE)
    assert len(entries) == 4
    for e in entries:
        port = e["ServicePort"]
        assert e["ServiceID"] == f"{NODE}:{SERVICE}:127.0.0.2:{port}", e
        assert e["ServiceName"] == SERVICE
        assert e["ServiceAddress"] == "127.0.0.2", "the address is always the target's own"
        assert e["ServiceTags"] == ["gunicorn"]
        assert e["ServiceMeta"] == {
            "external-source": "workersd",
            "workersd-owner": NODE,
            "metrics-path": "/metrics",
            "metrics-scheme": "http",
            "worker-port": str(port),
            "team": "web",
        }, e
        assert e["Node"] == NODE
        assert e["NodeMeta"] == {"external-source": "workersd"}, e
        assert e["Address"] == "127.0.0.1", "--consul-node-address default"
    all_entries = consul.catalog_service(SERVICE)
    assert len(all_entries) == 5
    assert len({(e["Node"], e["ServiceID"]) for e in all_entries}) == 5
    assert [e for e in all_entries if e["Node"] == "legacy-host"] == [foreign_before]
    assert sorted(s["ID"] for s in consul.node_services(NODE)["Services"]) == sorted(
        e["ServiceID"] for e in entries
    )

    # -- VictoriaMetrics: README's consul_sd_configs + a naive job -------------------
    workers_job = readme_consul_job(consul.addr, "workers")
    vm = VictoriaMetrics(
        procs,
        {
            "scrape_configs": [
                workers_job,
                {
                    "job_name": "naive",
                    "static_configs": [{"targets": [f"{g.address}:{g.app_port}"]}],
                },
            ]
        },
    ).start()

    worker_urls = [g.metrics_url(p) for p in ports]

    def discovered():
        ts = vm.targets()
        workers = sorted(t["scrapeUrl"] for t in ts if t["labels"].get("job") == "workers")
        up = sorted(
            t["scrapeUrl"]
            for t in ts
            if t["labels"].get("job") == "workers" and t.get("health") == "up"
        )
        naive_up = [t for t in ts if t["labels"].get("job") == "naive" and t["health"] == "up"]
        return workers == worker_urls and up == worker_urls and len(naive_up) == 1 and ts

    ts = wait_until(discovered, message=lambda: f"VM scrapes exactly {worker_urls} + naive")
    for t in ts:
        if t["labels"]["job"] == "workers":
            # README's relabel rules: service and team labels.
            assert t["labels"]["service"] == SERVICE, t["labels"]
            assert t["labels"]["team"] == "web", t["labels"]

    # Every series is ingested and queryable before the traffic.
    vm.wait_for_value(
        'count(request_processing_seconds_count{job="workers"})',
        lambda v: v == 4,
        what="4 per-worker series",
    )
    vm.wait_for_value(
        'sum(request_processing_seconds_count{job="naive"})', lambda v: v == 0, what="naive == 0"
    )

    g.send_requests(N_REQUESTS, concurrency=N_REQUESTS)
    sent_at = time.time()
    direct = g.per_worker_values()
    assert sorted(direct) == ports
    assert sum(direct.values()) == N_REQUESTS, direct
    assert len([v for v in direct.values() if v > 0]) >= 2, f"no spread: {direct}"

    total = vm.wait_for_value(
        'sum(request_processing_seconds_count{job="workers"})',
        lambda v: v == N_REQUESTS,
        what=f"VM per-worker sum == {N_REQUESTS}",
    )
    assert total == N_REQUESTS
    assert vm.query_value('count(up{job="workers"} == 1)') == 4

    # The naive job in the same VM: one worker per scrape, never all requests.
    vm.wait_for_value(
        'sum(request_processing_seconds_count{job="naive"})',
        lambda v: v is not None and v > 0,
        what="a naive scrape that hit a busy worker",
    )
    window = max(3, int(time.time() - sent_at) + 3)
    naive_max = vm.query_value(
        f'max_over_time(request_processing_seconds_count{{job="naive"}}[{window}s])'
    )
    print(f"per-worker sum {total:.0f}, naive max {naive_max:.0f} (per worker {direct})")
    assert naive_max is not None and 0 < naive_max < N_REQUESTS, naive_max
    assert naive_max <= max(direct.values())

    # workersd never touched the other tool's entry.
    assert [e for e in consul.catalog_service(SERVICE) if e["Node"] == "legacy-host"] == [
        foreign_before
    ]
    assert wd.alive()
