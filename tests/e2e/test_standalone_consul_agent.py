"""Agent registration (`workersd standalone --consul-registration agent`) end to end.

The Consul double runs a local agent (node host-1) with upstream's semantics (TTL checks,
anti-entropy to the catalog, the critical-service reaper, serf node failure), its reaper
minimum lowered for the test (the double's documented test-only override). Real gunicorn
workers on 127.0.0.2; VictoriaMetrics discovers them through consul_sd_configs with README's
agent-mode job, which keeps only passing instances.
"""

from __future__ import annotations

import threading
import time

import yaml

from harness import REPO_ROOT, ConsulDouble, Gunicorn, VictoriaMetrics, Workersd, targets_yaml, wait_until, write_atomic

SERVICE = "clever"
TTL = 3  # --consul-check-ttl, seconds
REAP = 3  # --consul-deregister-critical-after, and the double's lowered minimum


def readme_agent_job(server: str) -> dict:
    """README's agent-mode consul_sd job (the block after "With agent registration")."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("With agent registration (`--consul-registration agent`", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (job,) = yaml.safe_load(block)["scrape_configs"]
    (sd,) = job["consul_sd_configs"]
    assert sd["services"] == [SERVICE], sd
    assert {"source_labels": ["__meta_consul_health"], "regex": "passing", "action": "keep"} in job["relabel_configs"]
    sd["server"] = server
    return job


def health(consul: ConsulDouble) -> dict[int, str]:
    """Port → aggregated health of workersd's instances (the worst of its checks, serfHealth included)."""
    out = {}
    for entry in consul.health_service(SERVICE):
        statuses = {c["Status"] for c in entry["Checks"]}
        worst = next(s for s in ("critical", "warning", "passing") if s in statuses or s == "passing")
        out[entry["Service"]["Port"]] = worst
    return out


def agent_ports(consul: ConsulDouble) -> set[int]:
    """Ports of the local agent's own services (its local state, not the catalog)."""
    return {s["Port"] for s in consul.api_get("/v1/agent/services").json().values() if s["Service"] == SERVICE}


def scraped_up(vm: VictoriaMetrics) -> set[int]:
    return {int(t["scrapeUrl"].split(":")[2].split("/")[0]) for t in vm.targets() if t.get("health") == "up"}


class HealthMonitor:
    """Polls health every 100 ms in a thread; records any non-passing sample."""

    def __init__(self, consul: ConsulDouble):
        self.consul, self.bad, self.samples = consul, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                h = health(self.consul)
                self.samples += 1
                if any(s != "passing" for s in h.values()):
                    self.bad.append(h)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.bad.append(repr(exc))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def test_agent_registration_follows_workers_and_dies_with_workersd_or_the_host(procs):
    g = Gunicorn(procs, address="127.0.0.2", workers=4).start()
    consul = ConsulDouble(procs, extra_args=[
        "--agent", "--node-name", "host-1",
        "--agent-check-deregister-interval-min", f"{REAP}s",
        "--agent-check-reap-interval", "200ms",
        "--agent-check-update-interval", "0s",
    ]).start()
    targets = procs.path("targets.yaml")
    write_atomic(targets, targets_yaml([{"service": SERVICE, "address": g.address,
                                         "ports": (g.metrics_first, g.metrics_last)}]))

    def workersd():
        return Workersd(procs, targets=targets, consul_addr=consul.url, consul_registration="agent",
                        consul_check_ttl=f"{TTL}s", consul_deregister_critical_after=f"{REAP}s",
                        consul_resync_interval="1s")

    w = workersd().start()
    live = set(g.listening_metrics_ports())
    assert len(live) == 4
    # Registered with the agent, synced to the catalog under its node, passing.
    wait_until(lambda: health(consul) == {p: "passing" for p in live}, timeout=10, interval=0.1,
               message=lambda: f"health {health(consul)}")
    assert {e["Node"] for e in consul.catalog_service(SERVICE)} == {"host-1"}
    vm = VictoriaMetrics(procs, {"scrape_configs": [readme_agent_job(consul.addr)]}).start()
    wait_until(lambda: scraped_up(vm) == live, timeout=30, interval=0.5,
               message=lambda: f"VictoriaMetrics scrapes {scraped_up(vm)}")

    # Scale-down: the gone worker's service is deregistered at once, as in catalog mode.
    g.scale_down()
    wait_until(lambda: len(g.listening_metrics_ports()) == 3, timeout=15, message="3 workers")
    live = set(g.listening_metrics_ports())
    wait_until(lambda: set(health(consul)) == live, timeout=10, interval=0.1,
               message=lambda: f"health {health(consul)} != {live}")

    # workersd restarted within the TTL: no entry flaps, nothing is deregistered.
    consul.reset_stats()
    with HealthMonitor(consul) as monitor:
        w.kill()
        w = workersd().start()
        time.sleep(TTL + 1)
    assert monitor.samples > 10 and not monitor.bad, monitor.bad[:3]
    requests = consul.stats()["requests"]
    assert not [r for r in requests if "deregister" in r], requests
    assert health(consul) == {p: "passing" for p in live}

    # The agent restarts: API registrations are restored (critical until passed again, or
    # kept passing if their TTL had not run out); restarted with -dev it has lost them all
    # and workersd registers them again within a resync interval (1 s).
    consul.agent_restart()
    wait_until(lambda: health(consul) == {p: "passing" for p in live}, timeout=TTL + 5, interval=0.1,
               message=lambda: f"health after an agent restart {health(consul)}")
    consul.agent_restart(dev=True)
    assert agent_ports(consul) == set()
    wait_until(lambda: agent_ports(consul) == live, timeout=10, interval=0.1,
               message=lambda: f"the agent's services after a -dev restart: {agent_ports(consul)}")
    consul.agent_full_sync()  # the catalog follows the agent's local state
    assert health(consul) == {p: "passing" for p in live}

    # workersd killed for good: critical after the TTL (VictoriaMetrics drops them), gone
    # after the reap delay.
    w.kill()
    killed = time.monotonic()
    wait_until(lambda: health(consul) == {p: "critical" for p in live}, timeout=TTL + 5, interval=0.1,
               message=lambda: f"health {health(consul)}")
    assert time.monotonic() - killed >= TTL - 0.5
    wait_until(lambda: not scraped_up(vm), timeout=15, interval=0.5,
               message=lambda: f"VictoriaMetrics still scrapes {scraped_up(vm)}")
    wait_until(lambda: not consul.health_service(SERVICE), timeout=REAP + 10, interval=0.2,
               message="reaped by the agent")
    assert consul.catalog_service(SERVICE) == []

    # Back: registered again; then the host fails: every entry critical at once.
    w = workersd().start()
    wait_until(lambda: health(consul) == {p: "passing" for p in live}, timeout=10, interval=0.1,
               message=lambda: f"health {health(consul)}")
    wait_until(lambda: scraped_up(vm) == live, timeout=30, interval=0.5,
               message=lambda: f"VictoriaMetrics scrapes {scraped_up(vm)}")
    consul.agent_fail()
    assert health(consul) == {p: "critical" for p in live}
    wait_until(lambda: not scraped_up(vm), timeout=15, interval=0.5,
               message=lambda: f"VictoriaMetrics still scrapes {scraped_up(vm)} after the node failed")
    consul.agent_recover()
    wait_until(lambda: scraped_up(vm) == live, timeout=30, interval=0.5,
               message=lambda: f"VictoriaMetrics scrapes {scraped_up(vm)} after recovery")
