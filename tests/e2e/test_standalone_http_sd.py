"""The seed scenario without Consul: workersd's built-in HTTP SD endpoint and Prometheus.

Debian's Prometheus 2.42 discovers the 4 gunicorn workers through README.md's
`http_sd_configs` job (taken verbatim from the README, only the URL points at this
workersd) and counts all 100 requests; a naive job on the app port's /metrics in the
same Prometheus does not. Prometheus applies discovered target changes only every ~5 s,
so the waits are generous.
"""

import time

from harness import (
    Gunicorn,
    Prometheus,
    Workersd,
    free_port_range,
    readme_yaml_block,
    targets_yaml,
    wait_until,
    write_atomic,
)

SERVICE = "clever"
N_REQUESTS = 100


def readme_http_sd_job(http_sd_url: str, job_name: str) -> dict:
    (job,) = readme_yaml_block("### http_sd_configs")["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith(f"/targets?service={SERVICE}"), sd
    sd["url"] = f"{http_sd_url}?service={SERVICE}"
    job["job_name"] = job_name
    return job


def test_prometheus_http_sd(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 metrics ports")

    # A second service in the same file: README's ?service= filter must keep it out.
    other_first, other_last = free_port_range("127.0.0.3", 10, preferred_first=19011)
    other = Gunicorn(
        procs, address="127.0.0.3", metrics_ports=(other_first, other_last), workers=1
    ).start()
    (other_port,) = other.wait_for_metrics_ports(lambda p: len(p) == 1, what="1 other port")

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
                },
                {"service": "other", "address": "127.0.0.3", "ports": (other_first, other_last)},
            ]
        ),
    )
    wd = Workersd(procs, targets=targets).start()  # no --consul-addr: HTTP SD only
    expected = [f"127.0.0.2:{p}" for p in ports]
    wait_until(
        lambda: wd.http_sd_targets() == sorted(expected + [f"127.0.0.3:{other_port}"]),
        message=lambda: f"HTTP SD lists {expected} + other, now {wd.http_sd()}",
    )
    (group,) = [grp for grp in wd.http_sd() if grp["labels"]["__meta_workersd_service"] == SERVICE]
    assert sorted(group["targets"]) == expected
    assert group["labels"]["__metrics_path__"] == "/metrics"
    assert group["labels"]["__scheme__"] == "http"
    assert group["labels"]["__meta_workersd_address"] == "127.0.0.2"
    assert group["labels"]["__meta_workersd_tags"] == ",gunicorn,"
    assert group["labels"]["__meta_workersd_meta_team"] == "web"
    # No Consul sink at all: not a single Consul request.
    assert wd.metric("workersd_sink_requests_total", {"sink": "consul"}) is None

    prom = Prometheus(
        procs,
        {
            "scrape_configs": [
                readme_http_sd_job(wd.http_sd_url, "workers"),
                {
                    "job_name": "naive",
                    "static_configs": [{"targets": [f"{g.address}:{g.app_port}"]}],
                },
            ]
        },
    ).start()

    worker_urls = [g.metrics_url(p) for p in ports]

    def discovered():
        ts = prom.targets()
        workers = [t for t in ts if t["labels"].get("job") == "workers"]
        naive = [t for t in ts if t["labels"].get("job") == "naive" and t["health"] == "up"]
        ok = (
            sorted(t["scrapeUrl"] for t in workers) == worker_urls
            and all(t["health"] == "up" for t in workers)
            and len(naive) == 1
        )
        return ok and workers

    # refresh_interval 5s (README) + Prometheus' ~5 s target-update batching.
    workers = wait_until(
        discovered, timeout=45, message=lambda: f"Prometheus scrapes exactly {worker_urls}"
    )
    for t in workers:
        assert t["labels"]["service"] == SERVICE, t["labels"]
        assert t["labels"]["team"] == "web", t["labels"]  # README's labelmap of meta
    prom.wait_for_value(
        'count(request_processing_seconds_count{job="workers"})',
        lambda v: v == 4,
        what="4 per-worker series",
    )

    g.send_requests(N_REQUESTS, concurrency=N_REQUESTS)
    sent_at = time.time()
    direct = g.per_worker_values()
    assert sum(direct.values()) == N_REQUESTS, direct

    total = prom.wait_for_value(
        'sum(request_processing_seconds_count{job="workers"})',
        lambda v: v == N_REQUESTS,
        what=f"Prometheus per-worker sum == {N_REQUESTS}",
    )
    assert total == N_REQUESTS
    prom.wait_for_value(
        'sum(request_processing_seconds_count{job="naive"})',
        lambda v: v is not None and v > 0,
        what="a naive scrape that hit a busy worker",
    )
    window = max(3, int(time.time() - sent_at) + 3)
    naive_max = prom.query_value(
        f'max_over_time(request_processing_seconds_count{{job="naive"}}[{window}s])'
    )
    print(f"per-worker sum {total:.0f}, naive max {naive_max:.0f} (per worker {direct})")
    assert naive_max is not None and 0 < naive_max < N_REQUESTS, naive_max
    # The other service never leaked into the clever job.
    assert other.metrics_url(other_port) not in [t["scrapeUrl"] for t in prom.targets()]
