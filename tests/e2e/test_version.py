"""`workersd --version` and `workersd_build_info` name the commit the binary was built from."""

from __future__ import annotations

import subprocess

from harness import REPO_ROOT, Workersd, parse_metric, targets_yaml, workersd_bin, write_atomic


def test_version_and_build_info_name_the_checkout_commit(procs):
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([str(workersd_bin()), "--version"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip().endswith(f"(commit {commit})"), out
    targets = procs.path("targets.yaml")
    write_atomic(targets, targets_yaml([{"service": "clever", "address": "127.0.0.2", "ports": (19011, 19012)}]))
    w = Workersd(procs, targets=targets).start()
    text = w.metrics_text()
    assert parse_metric(text, "workersd_build_info", {"commit": commit}) == 1.0
    assert parse_metric(text, "workersd_ready") == 1.0
    assert parse_metric(text, "process_open_fds") > 0
