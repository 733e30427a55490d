"""Ownership: workersd changes and deletes only its own Consul entries (README "Ownership rules").

Before workersd starts, the Consul double holds, under the service name workersd will
publish:
  (a) another tool's instance on another node;
  (b) an instance under workersd's own node (--consul-node) with foreign meta (no
      workersd-owner), as an operator or another tool might add;
  (c) an instance under workersd's node with external-source=workersd but another
      workersd-owner (a second workersd sharing the node);
  (d) an instance under workersd's node holding the very ID workersd wants for a live
      worker, without workersd's owner (README: "a desired ID already held by a foreign
      entry is reported and left alone").
workersd then registers, follows a scale-down, and finally a targets-file edit removes its
target entirely. Every foreign entry must survive byte-identical (full JSON, indexes
included) and workersd's own entries must be gone.

Second test: two workersd instances (different --owner-id, on separate nodes or sharing
one) publish two gunicorns under one service name; over several 1 s resyncs, scale-downs
and a stop, neither touches the other's entries.
"""

import json
import time

import pytest
from harness import (
    ConsulDouble,
    Gunicorn,
    Workersd,
    free_port_range,
    targets_yaml,
    wait_until,
    write_atomic,
)

SERVICE = "clever"
NODE = "workersd-e2e-own"


def by_key(entries):
    return {(e["Node"], e["ServiceID"]): e for e in entries}


def canonical(entry):
    return json.dumps(entry, sort_keys=True)


def test_foreign_entries_survive_registration_scale_down_and_target_removal(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports")
    consul = ConsulDouble(procs).start()

    # The node as an earlier workersd run would have left it (NodeMeta external-source):
    # with any other NodeMeta workersd refuses to write at all (tested elsewhere).
    workersd_node = {
        "Node": NODE,
        "Address": "127.0.0.1",
        "NodeMeta": {"external-source": "workersd"},
    }
    conflict_port = ports[0]
    conflict_id = f"{NODE}:{SERVICE}:127.0.0.2:{conflict_port}"
    foreign = {
        "a": {
            "Node": "legacy-host",
            "Address": "127.0.0.5",
            "NodeMeta": {"rack": "r1"},
            "Service": {
                "ID": "clever-legacy",
                "Service": SERVICE,
                "Address": "127.0.0.2",
                "Port": g.app_port,
                "Tags": ["legacy"],
                "Meta": {"team": "web"},
            },
        },
        "b": {
            **workersd_node,
            "SkipNodeUpdate": True,
            "Service": {
                "ID": "clever-by-hand",
                "Service": SERVICE,
                "Address": "127.0.0.2",
                "Port": ports[1],
                "Meta": {"added-by": "operator"},
            },
        },
        "c": {
            **workersd_node,
            "SkipNodeUpdate": True,
            "Service": {
                "ID": f"other-owner:{SERVICE}:127.0.0.2:{ports[2]}",
                "Service": SERVICE,
                "Address": "127.0.0.2",
                "Port": ports[2],
                "Meta": {
                    "external-source": "workersd",
                    "workersd-owner": "other-owner",
                    "metrics-path": "/metrics",
                    "metrics-scheme": "http",
                    "worker-port": str(ports[2]),
                },
            },
        },
        "d": {
            **workersd_node,
            "SkipNodeUpdate": True,
            "Service": {
                "ID": conflict_id,
                "Service": SERVICE,
                "Address": "127.0.0.2",
                "Port": conflict_port,
                "Meta": {"external-source": "workersd", "team": "squatter"},
            },
        },
    }
    for key in "abcd":
        consul.register(foreign[key])
    before = by_key(consul.catalog_service(SERVICE))
    assert len(before) == 4, before
    before_json = {k: canonical(v) for k, v in before.items()}

    def assert_foreign_identical(when):
        now = by_key(consul.catalog_service(SERVICE))
        for key, text in before_json.items():
            assert key in now, f"{when}: foreign entry {key} is gone"
            assert canonical(now[key]) == text, (
                f"{when}: foreign entry {key} changed:\nbefore {text}\nafter  {canonical(now[key])}"
            )

    targets = procs.path("targets.yaml")
    write_atomic(
        targets,
        targets_yaml([{"service": SERVICE, "address": "127.0.0.2", "ports": (first, last)}]),
    )
    wd = Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start()

    # 1. Registration: every live port but the one whose ID is squatted.
    wait_until(
        lambda: consul.owned_ports(SERVICE, NODE) == ports[1:],
        message=lambda: f"own entries for {ports[1:]}, now {consul.owned_ports(SERVICE, NODE)}",
    )
    wait_until(
        lambda: "does not own" in wd.logs() and conflict_id in wd.logs(),
        message="the ID conflict is reported in the log",
    )
    time.sleep(2.5)  # a couple of 1 s resyncs (re-read + correct) over the foreign entries
    assert consul.owned_ports(SERVICE, NODE) == ports[1:]
    assert_foreign_identical("after registration")

    # 2. Scale-down: one own entry goes, nothing else.
    g.scale_down()
    live = g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 ports after TTOU")
    wait_until(
        lambda: consul.owned_ports(SERVICE, NODE) == [p for p in live if p != conflict_port],
        message=lambda: f"own entries follow TTOU to {live}, "
        f"now {consul.owned_ports(SERVICE, NODE)}",
    )
    time.sleep(2.5)
    assert_foreign_identical("after scale-down")

    # 3. The target is removed from the file: all own entries go, nothing else.
    write_atomic(targets, "targets: []\n")
    wait_until(
        lambda: consul.owned_entries(SERVICE, NODE) == [],
        message=lambda: f"own entries gone, now {consul.owned_ports(SERVICE, NODE)}",
    )
    time.sleep(2.5)
    assert_foreign_identical("after target removal")
    assert consul.owned_entries(SERVICE, NODE) == []
    after = by_key(consul.catalog_service(SERVICE))
    assert sorted(after) == sorted(before), "exactly the foreign entries remain"
    assert wd.http_sd() == []
    assert wd.metric("workersd_sink_errors_total", {"sink": "consul"}) in (None, 0)
    assert wd.alive()


def start_workersd(procs, consul, targets, node, owner):
    return Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=node,
        owner_id=owner,
        consul_resync_interval="1s",
    ).start()


@pytest.mark.parametrize(
    "node_a,node_b",
    [
        pytest.param("workersd-a", "workersd-b", id="separate-nodes"),
        pytest.param("workersd-shared", "workersd-shared", id="shared-node"),
    ],
)
def test_two_instances_never_touch_each_others_entries(procs, node_a, node_b):
    consul = ConsulDouble(procs).start()
    side = {}
    for name, address, node in (("a", "127.0.0.2", node_a), ("b", "127.0.0.3", node_b)):
        first, last = free_port_range(address, 10, preferred_first=19011)
        g = Gunicorn(procs, address=address, metrics_ports=(first, last), workers=3).start()
        targets = procs.path(f"targets-{name}.yaml")
        entry = {"service": SERVICE, "address": address, "ports": (first, last)}
        write_atomic(targets, targets_yaml([entry]))
        side[name] = {"g": g, "targets": targets, "node": node, "owner": f"owner-{name}"}
    # Both start together (same service name, maybe the same node).
    for s in side.values():
        s["wd"] = start_workersd(procs, consul, s["targets"], s["node"], s["owner"])

    def entries_of(name):
        return consul.owned_entries(SERVICE, side[name]["owner"])

    def ports_match(name):
        return sorted(e["ServicePort"] for e in entries_of(name)) == side[name][
            "g"
        ].listening_metrics_ports()

    for name in side:
        wait_until(
            lambda name=name: ports_match(name),
            message=lambda name=name: f"{name}'s entries, now {entries_of(name)}",
        )
        for e in entries_of(name):
            assert e["Node"] == side[name]["node"]
            assert e["ServiceAddress"] == side[name]["g"].address
            assert e["ServiceID"].startswith(f"{side[name]['owner']}:{SERVICE}:")
    assert len(consul.catalog_service(SERVICE)) == 6

    # Several 1 s resyncs: each re-reads Consul and sees the other's entries.
    snapshot_b = {canonical(e) for e in entries_of("b")}
    time.sleep(3.5)
    assert {canonical(e) for e in entries_of("b")} == snapshot_b, "a rewrote b's entries"

    # a scales down: only a's entries change.
    side["a"]["g"].scale_down()
    side["a"]["g"].wait_for_metrics_ports(lambda p: len(p) == 2, what="a: 2 ports")
    wait_until(lambda: ports_match("a"), message=lambda: f"a follows TTOU, now {entries_of('a')}")
    time.sleep(2.5)
    assert {canonical(e) for e in entries_of("b")} == snapshot_b, "a's scale-down touched b"

    # b stops (SIGTERM leaves its entries), a keeps resyncing: b's entries stay.
    snapshot_a = {canonical(e) for e in entries_of("a")}
    assert side["b"]["wd"].stop() == 0
    time.sleep(3.5)
    assert {canonical(e) for e in entries_of("b")} == snapshot_b, "a removed b's entries"
    assert {canonical(e) for e in entries_of("a")} == snapshot_a
    assert len(consul.catalog_service(SERVICE)) == 5
    assert side["a"]["wd"].metric("workersd_sink_errors_total", {"sink": "consul"}) in (None, 0)


def test_refuses_to_write_under_a_node_it_did_not_create(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=2).start()
    g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 ports")
    consul = ConsulDouble(procs).start()
    # A real host's node, with its own service, happens to have the name given to workersd.
    consul.register(
        {
            "Node": NODE,
            "Address": "127.0.0.9",
            "NodeMeta": {"os": "linux"},
            "Service": {"ID": "sshd", "Service": "sshd", "Port": 22},
        }
    )
    before = canonical(consul.node_services(NODE))
    consul.reset_stats()

    targets = procs.path("targets.yaml")
    entry = {"service": SERVICE, "address": "127.0.0.2", "ports": (first, last)}
    write_atomic(targets, targets_yaml([entry]))
    wd = Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start(wait_ready=False)
    labels = {"sink": "consul", "kind": "node_not_owned"}
    wait_until(
        lambda: (wd.metric("workersd_sink_errors_total", labels) or 0) >= 2,
        message="repeated node_not_owned sink errors",
    )
    assert "choose another --consul-node" in wd.logs()
    assert wd.readyz() == 503
    assert wd.alive()
    assert canonical(consul.node_services(NODE)) == before
    assert consul.catalog_service(SERVICE) == []
    assert consul.stats()["requests"].get("PUT /v1/txn", 0) == 0, "nothing is written"
    # The HTTP SD sink is independent of Consul and still serves the workers.
    assert len(wd.http_sd_targets()) == 2
