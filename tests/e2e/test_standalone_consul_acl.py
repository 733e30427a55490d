"""Consul ACL: the token from --consul-token-file (or env CONSUL_HTTP_TOKEN) is used and
never leaks.

The Consul double requires a token on every /v1 request. One workersd gets it through
--consul-token-file and registers; one gets it through CONSUL_HTTP_TOKEN and registers
too; one has no token and one a wrong token: their Consul sink fails (403), counted in
workersd_sink_errors_total{sink="consul",kind="forbidden"}, and /readyz stays 503. All
run with WORKERSD_LOG=debug; the token appears in no log line, /metrics or HTTP SD.
"""

import secrets
import time

from harness import (
    ConsulDouble,
    Gunicorn,
    Workersd,
    free_port_range,
    http_get,
    targets_yaml,
    wait_until,
    write_atomic,
)

SERVICE = "acl"


def test_acl_token_used_for_writes_and_never_leaked(procs):
    token = f"e2e-{secrets.token_hex(16)}"
    wrong = f"e2e-{secrets.token_hex(16)}"
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=2).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 ports")
    consul = ConsulDouble(procs, acl_token=token).start()
    targets = procs.path("targets.yaml")
    entry = {"service": SERVICE, "address": "127.0.0.2", "ports": (first, last)}
    write_atomic(targets, targets_yaml([entry]))

    def workersd(node, **kwargs):
        env = {"WORKERSD_LOG": "debug", **kwargs.pop("env", {})}
        return Workersd(
            procs,
            targets_file=targets,
            consul_addr=consul.url,
            env=env,
            extra_args=["--consul-node", node, "--consul-resync-interval", "1s"],
            **kwargs,
        )

    with_file = workersd("workersd-token-file", consul_token=token).start()
    with_env = workersd("workersd-token-env", env={"CONSUL_HTTP_TOKEN": token}).start()
    without = workersd("workersd-no-token").start(wait_ready=False)
    wrong_token = workersd("workersd-wrong-token", consul_token=wrong).start(wait_ready=False)

    for wd, node in ((with_file, "workersd-token-file"), (with_env, "workersd-token-env")):
        wait_until(
            lambda node=node: consul.owned_ports(SERVICE, node) == ports,
            message=lambda node=node: f"{node} registered {ports}",
        )
        assert wd.readyz() == 200
        assert wd.metric("workersd_sink_errors_total", {"sink": "consul"}) in (None, 0)

    for wd in (without, wrong_token):
        wait_until(
            lambda wd=wd: (
                wd.metric("workersd_sink_errors_total", {"sink": "consul", "kind": "forbidden"})
                or 0
            )
            >= 2,
            message="repeated forbidden sink errors",
        )
    # Stays unready (checked over a few resyncs), alive, and wrote nothing.
    for _ in range(8):
        for wd in (without, wrong_token):
            assert wd.readyz() == 503
            assert wd.alive()
        time.sleep(0.25)
    assert "consul not yet synced" in http_get(without.readyz_url).text
    assert consul.owned_entries(SERVICE, "workersd-no-token") == []
    assert consul.owned_entries(SERVICE, "workersd-wrong-token") == []
    assert "403" in without.logs() or "denied" in without.logs().lower()
    stats = consul.stats()
    assert stats["acl_denied"] >= 4, stats

    # The token is nowhere: logs (debug level), /metrics, HTTP SD, for every instance.
    for wd in (with_file, with_env, without, wrong_token):
        for name, text in (
            ("log", wd.logs()),
            ("/metrics", wd.metrics_text()),
            ("HTTP SD", str(wd.http_sd())),
        ):
            for secret in (token, wrong):
                assert secret not in text, f"token leaked into {wd.proc.name}'s {name}"
                assert secret[4:20] not in text, f"token part leaked: {wd.proc.name}'s {name}"
    assert "token=true" in with_file.logs()
