"""`workersd nomad` end to end: the Nomad double (tests/support/fake_nomad, one client agent
"client-1") with allocations whose "tasks" are real gunicorn processes on 127.0.0.x, the
Consul double and VictoriaMetrics' consul_sd with README's job."""

from __future__ import annotations

import sys

import pytest

from harness import REPO_ROOT, ConsulDouble, Gunicorn, VictoriaMetrics, Workersd, wait_until
from test_kubernetes_e2e import COUNT, deregistrations, readme_consul_job

sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
from fake_nomad.client import FakeNomad, port_range  # noqa: E402

SERVICE = "clever"
OWNER = "workersd-client-1"


@pytest.fixture
def nomad(procs):
    fake = FakeNomad(procs.path("fake-nomad", "x").parent, node_name="client-1").start()
    yield fake
    fake.stop()


def host_alloc(nomad, job, g: Gunicorn, *, meta=None, group_meta=None, task_meta=None):
    """An allocation of `job` (group app, task web) in host mode on g's address, with g's
    metrics range reserved."""
    count = g.metrics_last - g.metrics_first + 1
    alloc = nomad.run_alloc(job, "app", "web", meta=meta, group_meta=group_meta, task_meta=task_meta,
                            ip=g.address, ports=port_range("w", g.metrics_first, count))
    return alloc["ID"]


def published(consul) -> dict[str, set[int]]:
    """Ports of workersd's entries by Nomad job."""
    out: dict[str, set[int]] = {}
    for e in consul.catalog_service(SERVICE):
        meta = e.get("ServiceMeta") or {}
        if meta.get("workersd-owner") == OWNER:
            out.setdefault(meta["nomad-job"], set()).add(e["ServicePort"])
    return out


def test_nomad_allocations_opted_in_by_meta_are_published_and_followed(procs, nomad):
    shop = Gunicorn(procs, address="127.0.0.2", workers=3).start()
    api = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    bad = Gunicorn(procs, address="127.0.0.4", workers=1).start()
    # Opt-in by job meta; by group + task meta; and a job whose range is written backwards.
    shop_alloc = host_alloc(nomad, "shop", shop, meta={
        "workersd_service": SERVICE, "workersd_ports": f"{shop.metrics_first}-{shop.metrics_last}"})
    host_alloc(nomad, "api", api, group_meta={"workersd_service": SERVICE},
               task_meta={"workersd_ports": f"{api.metrics_first}-{api.metrics_last}"})
    host_alloc(nomad, "bad", bad, meta={
        "workersd_service": SERVICE, "workersd_ports": f"{bad.metrics_last}-{bad.metrics_first}"})
    consul = ConsulDouble(procs).start()

    def workersd():
        return Workersd(procs, "nomad", nomad_addr=nomad.url, consul_addr=consul.url,
                        consul_resync_interval="1s", nomad_wait="10s")

    w = workersd().start()
    want = {"shop": set(shop.listening_metrics_ports()), "api": set(api.listening_metrics_ports())}
    assert published(consul) == want
    entries = [e for e in consul.catalog_service(SERVICE) if e["ServiceMeta"].get("nomad-job") == "api"]
    meta = entries[0]["ServiceMeta"]
    assert (meta["nomad-group"], meta["nomad-task"], meta["nomad-node"], meta["nomad-namespace"]) == (
        "app", "web", "client-1", "default")
    assert w.metric("workersd_invalid_objects", {"kind": "allocation"}) == 1

    # consul_sd finds every worker; the sum over the service is exact.
    vm = VictoriaMetrics(procs, {"scrape_configs": [readme_consul_job(consul.addr)]}).start()
    urls = sorted(f"http://{g.address}:{p}/metrics" for g, job in ((shop, "shop"), (api, "api")) for p in want[job])
    vm.wait_for_targets(lambda ts: sorted(t["scrapeUrl"] for t in ts if t.get("health") == "up") == urls,
                        timeout=30, what="the 5 workers scraped up")
    shop.send_requests(30, concurrency=6)
    api.send_requests(20, concurrency=4)
    vm.wait_for_value(f'sum({COUNT}{{job="clever-workers"}})', lambda v: v == 50.0, timeout=30,
                      what="the sum over both allocations")

    # A worker leaves: followed.
    api.scale_down()
    wait_until(lambda: len(api.listening_metrics_ports()) == 1, timeout=15, message="1 api worker")
    want["api"] = set(api.listening_metrics_ports())
    wait_until(lambda: published(consul) == want, timeout=10, interval=0.1,
               message=lambda: f"published {published(consul)} != {want}")

    # A restart deregisters nothing live.
    consul.reset_stats()
    w.stop()
    w = workersd().start()
    assert published(consul) == want
    assert deregistrations(consul.stats()) == {}, consul.stats()

    # The agent goes down: entries stay; meanwhile the shop allocation stops; back up, it
    # converges.
    nomad.agent_down()
    nomad.stop_alloc(shop_alloc)
    nomad.agent_up()
    del want["shop"]
    wait_until(lambda: published(consul) == want, timeout=45, interval=0.2,
               message=lambda: f"after the agent came back: {published(consul)} != {want}")


def test_nomad_token_from_a_file_and_a_refused_token_is_a_clear_start_up_error(procs):
    fake = FakeNomad(procs.path("fake-nomad-acl", "x").parent, node_name="client-1", acl=True).start()
    try:
        # What README says the token needs: agent:read, node:read, read-job.
        fake.add_token("s3cret-nomad-token", {"agent": "read", "node": "read", "namespaces": {"default": "read"}})
        g = Gunicorn(procs, address="127.0.0.5", workers=2).start()
        host_alloc(fake, "shop", g, meta={"workersd_service": SERVICE,
                                          "workersd_ports": f"{g.metrics_first}-{g.metrics_last}"})
        consul = ConsulDouble(procs).start()
        token = procs.path("nomad-token", "token")
        token.write_text("s3cret-nomad-token\n")
        w = Workersd(procs, "nomad", nomad_addr=fake.url, nomad_token_file=token, consul_addr=consul.url,
                     nomad_wait="10s").start()
        assert published(consul) == {"shop": set(g.listening_metrics_ports())}

        wrong = procs.path("nomad-token-wrong", "token")
        wrong.write_text("not-a-known-token\n")
        refused = Workersd(procs, "nomad", nomad_addr=fake.url, nomad_token_file=wrong,
                           consul_addr=consul.url).start(wait_ready=False)
        wait_until(lambda: refused.proc.returncode is not None, timeout=30, message="workersd exits")
        assert refused.proc.returncode == 1
        logs = refused.proc.logs()
        assert "cannot find this Nomad agent's node" in logs and "Nomad denied the request" in logs, logs
        for text in (logs, w.proc.logs()):
            assert "s3cret-nomad-token" not in text and "not-a-known-token" not in text
    finally:
        fake.stop()
