"""`--deregister-on-exit` (per-allocation sidecars, e.g. Nomad): SIGTERM removes this owner's
entries and nothing else; without the flag SIGTERM leaves them in place."""

import signal

from harness import ConsulDouble, Gunicorn, Workersd, free_port_range, wait_until


def _service(consul, name):
    return consul.api_get(f"/v1/catalog/service/{name}").json()


def _start(procs, consul, targets, flag, owner):
    return Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node="workersd-sidecars",
        owner_id=owner,
        deregister_on_exit=flag,
    ).start()


def test_sigterm_deregisters_only_with_the_flag_and_only_its_own(procs):
    first, last = free_port_range("127.0.0.4", 10, preferred_first=19211)
    g = Gunicorn(procs, address="127.0.0.4", metrics_ports=(first, last), workers=2).start()
    g.wait_for_metrics_ports(lambda p: len(p) == 2, what="2 metrics ports")
    consul = ConsulDouble(procs).start()
    consul.register({
        "Node": "other-node", "Address": "10.9.9.9",
        "Service": {"ID": "foreign", "Service": "sidecar", "Address": "10.9.9.9", "Port": 1},
    })
    targets = procs.path("targets.yaml")
    targets.write_text(f"targets:\n  - {{service: sidecar, address: 127.0.0.4, ports: {first}-{last}}}\n")

    keeper = _start(procs, consul, targets, flag=False, owner="alloc-a")
    leaver = _start(procs, consul, targets.parent / "targets.yaml", flag=True, owner="alloc-b")
    owners = lambda: sorted(
        (i["ServiceMeta"] or {}).get("workersd-owner", "-") for i in _service(consul, "sidecar")
    )
    wait_until(lambda: owners() == ["-", "alloc-a", "alloc-a", "alloc-b", "alloc-b"],
               message=lambda: f"both owners registered 2 workers each, now {owners()}")

    leaver.proc.send_signal(signal.SIGTERM)
    assert leaver.proc.popen.wait(timeout=15) == 0
    assert owners() == ["-", "alloc-a", "alloc-a"], "only alloc-b's entries went, at once"
    assert "deregistered this owner's entries" in leaver.logs()

    keeper.proc.send_signal(signal.SIGTERM)
    assert keeper.proc.popen.wait(timeout=15) == 0
    assert owners() == ["-", "alloc-a", "alloc-a"], "without the flag entries stay for the next instance"
