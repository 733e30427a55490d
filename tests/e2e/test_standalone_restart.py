"""Restart safety (README "Restart safety"): a restarting workersd never flaps live entries.

While workersd is stopped with SIGTERM and started again with the same flags, a sampler
reads the Consul double's catalog every 100 ms: the set of entries must never shrink, and
the double's statistics must show no deregistration (no txn `Service.delete`, no
`/v1/catalog/deregister`) and, as nothing changed, no write at all.

The second target's range holds a "tarpit" port (accepts TCP, never answers), so its first
sweep after the restart takes the whole probe timeout while the first target's finishes at
once: a workersd that deregistered before *every* target was probed would drop the second
target's entries in that window.
"""

import os
import signal
import socket
import time

from harness import (
    ConsulDouble,
    Gunicorn,
    Sampler,
    Workersd,
    free_port_range,
    targets_yaml,
    wait_until,
    write_atomic,
)

SERVICE = "restart"
NODE = "workersd-e2e-restart"


def catalog_sampler(consul):
    """Samples the set of entry IDs of SERVICE every 100 ms."""
    return Sampler(
        lambda: frozenset(e["ServiceID"] for e in consul.catalog_service(SERVICE)), interval=0.1
    )


def tarpit(address, port):
    """A socket that completes TCP handshakes (kernel backlog) but never answers."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(128)
    return s


def write_targets(procs, gunicorns):
    targets = procs.path("targets.yaml")
    write_atomic(
        targets,
        targets_yaml(
            [
                {
                    "service": SERVICE,
                    "address": g.address,
                    "ports": (g.metrics_first, g.metrics_last),
                }
                for g in gunicorns
            ]
        ),
    )
    return targets


def entry_ids(gunicorn, ports):
    return {f"{NODE}:{SERVICE}:{gunicorn.address}:{p}" for p in ports}


def start_workersd(procs, consul, targets):
    return Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start()


def test_restart_keeps_entries_in_place_and_writes_nothing(procs):
    first_a, last_a = free_port_range("127.0.0.2", 10, preferred_first=19011)
    a = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first_a, last_a), workers=3).start()
    first_b, last_b = free_port_range("127.0.0.3", 10, preferred_first=19011)
    pit = tarpit("127.0.0.3", last_b)
    try:
        b = Gunicorn(procs, address="127.0.0.3", metrics_ports=(first_b, last_b), workers=2).start()
        ports_a = a.wait_for_metrics_ports(lambda p: len(p) == 3, what="a: 3 ports")
        ports_b = b.wait_for_metrics_ports(lambda p: len(p) == 3, what="b: 2 workers + tarpit")
        ports_b = [p for p in ports_b if p != last_b]
        expected = entry_ids(a, ports_a) | entry_ids(b, ports_b)

        consul = ConsulDouble(procs).start()
        targets = write_targets(procs, [a, b])
        wd = start_workersd(procs, consul, targets)
        wait_until(
            lambda: {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == expected,
            message=lambda: f"entries {sorted(expected)}",
        )
        assert wd.metric("workersd_probes_total", {"result": "timeout"}) >= 1, "tarpit probed"
        before = {e["ServiceID"]: e["ModifyIndex"] for e in consul.catalog_service(SERVICE)}
        consul.reset_stats()

        with catalog_sampler(consul) as sampler:
            # SIGTERM: a clean exit that leaves every entry in place.
            assert wd.stop() == 0, wd.proc.tail()
            assert "left in place" in wd.logs()
            time.sleep(1.5)
            assert {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == expected
            # Same flags, same ports: start again.
            restarted_at = time.monotonic()
            wd.start()
            # The tarpit makes b's first sweep last the probe timeout (1 s); then a few
            # 1 s resyncs and sweeps.
            time.sleep(4.0)
        stderr = wd.logs()

        samples = sampler.samples
        assert len(samples) >= 30, f"only {len(samples)} catalog samples"
        assert not sampler.errors(), f"catalog reads failed: {sampler.errors()[:3]}"
        shrunk = [
            (round(t - restarted_at, 2), sorted(expected - ids))
            for t, ids in samples
            if ids != expected
        ]
        assert not shrunk, f"entries changed during the restart (s after start, missing): {shrunk}"

        stats = consul.stats()
        verbs = stats["txn"]["ops_applied_by_verb"]
        print(f"restart: {len(samples)} samples, {len(expected)} entries; txn {stats['txn']}")
        assert verbs.get("Service.delete", 0) + verbs.get("Service.delete-cas", 0) == 0, stats
        assert stats["requests"].get("PUT /v1/catalog/deregister", 0) == 0, stats
        # README: "when nothing changed, nothing is written".
        assert stats["catalog_writes"] == 0, stats
        assert stats["requests"].get("PUT /v1/txn", 0) == 0, stats
        assert {e["ServiceID"]: e["ModifyIndex"] for e in consul.catalog_service(SERVICE)} == before
        assert "consul catalog updated" not in stderr

        # kill -9 one of a's workers: gunicorn respawns it onto the same (first free) port
        # and Consul ends with exactly the live endpoints again.
        victim_port = ports_a[1]
        victim = a.port_owners()[victim_port]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: a.port_owners().get(victim_port) not in (None, victim)
            and a.listening_metrics_ports() == ports_a,
            message=lambda: f"a respawned worker re-binds {victim_port}",
        )
        wait_until(
            lambda: {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == expected,
            message="entries equal the live endpoints after kill -9",
        )
        assert wd.alive()
    finally:
        pit.close()


def test_restart_after_scale_down_while_stopped_deletes_only_the_stale_entry(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports")
    consul = ConsulDouble(procs).start()
    targets = write_targets(procs, [g])
    wd = start_workersd(procs, consul, targets)
    wait_until(
        lambda: {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == entry_ids(g, ports),
        message="4 entries",
    )

    assert wd.stop() == 0
    g.scale_down()
    live = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports after TTOU")
    (gone,) = set(ports) - set(live)
    assert {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == entry_ids(g, ports)
    consul.reset_stats()

    with catalog_sampler(consul) as sampler:
        restarted_at = time.monotonic()
        wd.start()
        wait_until(
            lambda: {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == entry_ids(g, live),
            message=lambda: f"stale entry for {gone} removed after the restart",
        )
        removed_after = time.monotonic() - restarted_at
        time.sleep(2.0)
    print(f"stale entry removed {removed_after:.2f}s after the restart")

    live_ids = entry_ids(g, live)
    dropped = [
        round(t - restarted_at, 2)
        for t, ids in sampler.samples
        if isinstance(ids, BaseException) or not live_ids <= ids
    ]
    assert not dropped, f"live entries disappeared at {dropped}"
    stats = consul.stats()
    assert stats["txn"]["ops_applied_by_verb"] == {"Service.delete-cas": 1}, stats
    assert {e["ServiceID"] for e in consul.catalog_service(SERVICE)} == live_ids
