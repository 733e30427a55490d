"""Consul ACL, as a real Consul enforces it: the token from --consul-token-file (or env
CONSUL_HTTP_TOKEN) is used, travels in the X-Consul-Token header only, and never leaks;
tokens the policy does not allow to write are reported as `forbidden`, saying which.

The Consul double runs its real ACL model (default policy deny; see its CONTRACT.md):
- a writer token (node:write on workersd-*, service:write on everything): two workersd
  instances register with it, one through --consul-token-file, one through CONSUL_HTTP_TOKEN;
- no token (the anonymous token: empty reads, each write refused in a 409);
- an unknown token (403 "ACL not found");
- a read-only token (409, one "Permission denied" per operation);
- a token with node:write but only service:read.
The last four fail with workersd_sink_errors_total{sink="consul",kind="forbidden"}, a log
line naming what is missing, /readyz 503, and nothing registered. All run with
WORKERSD_LOG=debug; no token appears in any log line, /metrics or HTTP SD.
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


def _rules(node: str | None, service: str | None) -> dict:
    rules = {}
    if node:
        rules["node_prefix"] = {"": {"policy": node}}
    if service:
        rules["service_prefix"] = {"": {"policy": service}}
    return rules


def test_acl_tokens_as_a_real_consul_enforces_them(procs):
    root = f"e2e-{secrets.token_hex(16)}"
    writer = f"e2e-{secrets.token_hex(16)}"
    reader = f"e2e-{secrets.token_hex(16)}"
    no_service_write = f"e2e-{secrets.token_hex(16)}"
    unknown = f"e2e-{secrets.token_hex(16)}"
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=2).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 ports")
    consul = ConsulDouble(
        procs,
        acl_token=root,
        acl_config={
            "default_policy": "deny",
            "tokens": [
                {"secret_id": root, "management": True},
                {
                    "secret_id": writer,
                    "rules": {
                        "node_prefix": {"workersd-": {"policy": "write"}},
                        "service_prefix": {"": {"policy": "write"}},
                    },
                },
                {"secret_id": reader, "rules": _rules("read", "read")},
                {"secret_id": no_service_write, "rules": _rules("write", "read")},
            ],
        },
    ).start()
    targets = procs.path("targets.yaml")
    entry = {"service": SERVICE, "address": "127.0.0.2", "ports": (first, last)}
    write_atomic(targets, targets_yaml([entry]))

    def workersd(node, **kwargs):
        env = {"WORKERSD_LOG": "debug", **kwargs.pop("env", {})}
        return Workersd(
            procs,
            targets=targets,
            consul_addr=consul.url,
            env=env,
            consul_node=node,
            consul_resync_interval="1s",
            **kwargs,
        )

    with_file = workersd("workersd-token-file", consul_token=writer).start()
    with_env = workersd("workersd-token-env", env={"CONSUL_HTTP_TOKEN": writer}).start()
    refused = {
        # node name -> (workersd, what its log must say)
        "workersd-no-token": (
            workersd("workersd-no-token").start(wait_ready=False),
            "anonymous token (no token was sent) lacks 'node:write'",
        ),
        "workersd-unknown-token": (
            workersd("workersd-unknown-token", consul_token=unknown).start(wait_ready=False),
            "ACL not found",
        ),
        "workersd-read-only": (
            workersd("workersd-read-only", consul_token=reader).start(wait_ready=False),
            "lacks 'node:write' on \"workersd-read-only\", 'service:write' on \"acl\"",
        ),
        "workersd-no-service-write": (
            workersd("workersd-no-service-write", consul_token=no_service_write).start(
                wait_ready=False
            ),
            "lacks 'service:write' on \"acl\"",
        ),
    }

    for wd, node in ((with_file, "workersd-token-file"), (with_env, "workersd-token-env")):
        wait_until(
            lambda node=node: consul.owned_ports(SERVICE, node) == ports,
            message=lambda node=node: f"{node} registered {ports}",
        )
        assert wd.readyz() == 200
        assert wd.metric("workersd_sink_errors_total", {"sink": "consul"}) in (None, 0)

    for node, (wd, why) in refused.items():
        wait_until(
            lambda wd=wd: (
                wd.metric("workersd_sink_errors_total", {"sink": "consul", "kind": "forbidden"})
                or 0
            )
            >= 2,
            message=f"{node}: repeated forbidden sink errors",
        )
        assert why in wd.logs(), f"{node}: the log names the cause ({why!r})"
    # Stays unready (checked over a few resyncs), alive, and wrote nothing.
    for _ in range(8):
        for wd, _why in refused.values():
            assert wd.readyz() == 503
            assert wd.alive()
        time.sleep(0.25)
    assert "consul not yet synced" in http_get(refused["workersd-no-token"][0].readyz_url).text
    for node in refused:
        assert consul.owned_entries(SERVICE, node) == []
        services = consul.node_services(node)
        if node == "workersd-no-service-write":
            # node:write alone: the node may be created, never a service on it.
            assert not services["Services"], services
        else:
            assert services == {"Node": None, "Services": None}
    stats = consul.stats()
    assert stats["acl_denied"] >= 2, stats
    assert stats["acl_permission_denied"] >= 6, stats
    # The token went in the header, never in a URL.
    assert "query" not in stats["token_sources"], stats["token_sources"]

    # No token is anywhere: logs (debug level), /metrics, HTTP SD, for every instance.
    instances = [with_file, with_env] + [wd for wd, _why in refused.values()]
    for wd in instances:
        for name, text in (
            ("log", wd.logs()),
            ("/metrics", wd.metrics_text()),
            ("HTTP SD", str(wd.http_sd())),
        ):
            for secret in (root, writer, reader, no_service_write, unknown):
                assert secret not in text, f"token leaked into {wd.proc.name}'s {name}"
                assert secret[4:20] not in text, f"token part leaked: {wd.proc.name}'s {name}"
    assert "token=true" in with_file.logs()
