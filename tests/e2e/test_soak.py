"""The chaos soak (tests/soak/soak.py) at its short CI setting.

Runs the soak as a subprocess for SOAK_DURATION seconds (default 60) with seed SOAK_SEED
(default 1): random pod create/delete, worker scale up/down and recycling, valid and
invalid annotation edits, Consul outage and wipe, watch drops and 410 Gone, controller
kill -9 and leader handover, the ACL token losing its write permission for a while, each followed by a bounded wait for Consul to hold exactly
the live workers. Fails on any violation; the soak's summary (faults, convergence times,
RSS) is printed (pytest -s) and attached to a failure.

    python3 -m pytest tests/e2e/test_soak.py -s
    SOAK_DURATION=300 SOAK_SEED=42 python3 -m pytest tests/e2e/test_soak.py -s
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from harness import REPO_ROOT, consul_double_bin, require_binary, workersd_bin

DURATION = float(os.environ.get("SOAK_DURATION", "60"))
SEED = os.environ.get("SOAK_SEED", "1")


@pytest.mark.timeout(int(DURATION) + 420)
def test_chaos_soak_short(tmp_path):
    require_binary(workersd_bin(), "workersd (WORKERSD_BIN)")
    require_binary(consul_double_bin(), "consul-double (CONSUL_DOUBLE_BIN)")
    argv = [
        sys.executable,
        str(REPO_ROOT / "tests" / "soak" / "soak.py"),
        "--duration", str(DURATION),
        "--seed", SEED,
        "--quiet",
        "--workdir", str(tmp_path / "soak"),
    ]
    # The soak's own loops are bounded (converge timeout 60 s per fault); this is a backstop.
    p = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 400,
                       stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    print(p.stdout[-6000:])
    assert p.returncode == 0, f"soak exit {p.returncode}\n{p.stdout[-8000:]}\n{p.stderr[-4000:]}"
    assert "violations: 0" in p.stdout
    # A soak that injected (almost) nothing proves nothing.
    injected = re.search(r"(\d+) faults,", p.stdout)
    assert injected and int(injected.group(1)) >= 5, p.stdout[-3000:]
