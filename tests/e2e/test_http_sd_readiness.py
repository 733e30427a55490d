"""HTTP SD readiness: `/targets` refuses (503) until every target was probed once.

An empty or partial list served before the first complete probe would make Prometheus drop
every target it holds, so workersd answers 503 until then (Prometheus keeps its last good
list on an error). The window is made long on purpose: one port of the range accepts TCP
but never answers, so the first sweep waits the whole probe timeout on it.
"""

import socket
import time

from harness import (
    Gunicorn,
    Workersd,
    free_port_range,
    http_get,
    targets_yaml,
    write_atomic,
)

PROBE_TIMEOUT_S = 6


def test_targets_answers_503_until_the_first_complete_probe(procs):
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19311)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, first), workers=1).start()
    (live,) = g.wait_for_metrics_ports(lambda p: len(p) == 1, what="1 metrics port")

    # The next port accepts connections (the kernel completes the handshake from the
    # backlog) but nothing ever answers the request: its probe lasts the whole timeout.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.2", first + 1))
    silent.listen(16)
    try:
        targets = procs.path("targets.yaml")
        write_atomic(
            targets,
            targets_yaml([{"service": "clever", "address": "127.0.0.2", "ports": (first, first + 1)}]),
        )
        wd = Workersd(
            procs,
            targets=targets,
            probe_interval="10s",
            probe_timeout=f"{PROBE_TIMEOUT_S}s",
            full_sweep_interval="0s",
        )
        started = time.monotonic()
        wd.start(wait_ready=False)

        # Every answer before readiness is a 503 with a reason, never a (partial) list.
        refused = 0
        while True:
            try:
                # Readiness only ever turns on: read before /targets, it must still have been
                # off whenever /targets refuses (read after, it may have just turned on).
                ready_before = wd.readyz()
                r = http_get(wd.http_sd_url, timeout=2)
            except Exception:
                time.sleep(0.1)  # not listening yet
                assert wd.alive(), "workersd exited"
                assert time.monotonic() - started < 30, "workersd never listened"
                continue
            if r.status_code == 200:
                break
            assert r.status_code == 503, (r.status_code, r.text)
            assert "not yet probed" in r.text, r.text
            assert ready_before == 503, "/readyz said ready, then /targets refused"
            refused += 1
            assert time.monotonic() - started < 30, "workersd never became ready"
            time.sleep(0.2)
        waited = time.monotonic() - started
        # The silent port held the first sweep for the probe timeout: /targets must have
        # refused through most of it (a readiness set early would answer 200 at once).
        assert waited >= PROBE_TIMEOUT_S - 1, f"/targets answered 200 after {waited:.1f} s"
        assert refused >= 10, f"only {refused} refusals before readiness"
        assert wd.http_sd_targets() == [f"127.0.0.2:{live}"]
        assert wd.readyz() == 200
    finally:
        silent.close()
