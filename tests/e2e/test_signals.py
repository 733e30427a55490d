"""SIGHUP re-reads the targets file (the usual reload signal) instead of killing workersd."""

import signal

from harness import Workersd, wait_until


def test_sighup_reloads_and_keeps_running(procs):
    targets = procs.path("targets.yaml")
    targets.write_text("targets:\n  - {service: a, address: 127.0.0.9, ports: 19911-19912}\n")
    wd = Workersd(procs, targets=targets).start()
    wd.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: re-reading the targets file" in wd.logs(), message="SIGHUP logged")
    wait_until(lambda: wd.metric("workersd_config_reloads_total", {"result": "ok"}) == 1,
               message=lambda: f"one ok reload, now {wd.metric('workersd_config_reloads_total')}")
    assert wd.proc.alive() and wd.readyz() == 200
