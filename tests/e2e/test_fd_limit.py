"""File-descriptor limit at start: workersd raises its soft limit to the hard one, and refuses
to start (exit 1, naming the flag) when even the hard limit cannot hold --probe-concurrency.
The limit is set on the child alone (preexec setrlimit); loopback only, bounded waits."""
import resource
import subprocess

from harness import Workersd, targets_yaml, wait_until


def limited(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def proc_soft_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def workersd(procs, concurrency):
    targets = procs.path("targets.yaml")
    targets.write_text(targets_yaml([{"service": "web", "address": "127.0.0.2", "ports": 9011}]))
    return Workersd(procs, targets=targets, probe_concurrency=concurrency)


def test_refuses_a_concurrency_the_hard_limit_cannot_hold(procs):
    wd = workersd(procs, 2000)
    result = subprocess.run(
        wd.argv(),
        preexec_fn=limited(1024, 1024),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "--probe-concurrency 2000 needs at least 2256 file descriptors" in result.stderr
    assert "the limit is 1024 (hard 1024)" in result.stderr


def test_raises_the_soft_limit_to_the_hard_one(procs):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 4096, f"this test needs a hard limit of 4096, have {hard}"
    wd = workersd(procs, 2000)
    proc = subprocess.Popen(
        wd.argv(),
        preexec_fn=limited(1024, 4096),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: proc.poll() is not None or _ready(wd), timeout=20,
                   message="workersd ready under a 1024 soft limit")
        assert proc.poll() is None, proc.stderr.read()
        assert proc_soft_limit(proc.pid) == 4096
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ready(wd):
    try:
        return wd.readyz() == 200
    except Exception:
        return False
