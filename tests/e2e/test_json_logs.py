"""`--log-format json`: every stderr line is one JSON object whose keys are unique at every
level (a collector keeps one of two equal keys and loses the other), and a fatal error is
reported once, as a JSON line like the rest. Loopback only (the Kubernetes case uses the fake
API server, the `cluster` fixture), bounded waits."""
import json
import signal
import subprocess

from harness import Workersd, targets_yaml, wait_until
from test_kubernetes_e2e import kube_workersd


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def parse_json_lines(stderr: str) -> list[dict]:
    """Every non-empty line as a JSON object; fails on a non-JSON line or a duplicate key."""
    records = []
    for number, line in enumerate(stderr.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except ValueError as e:
            raise AssertionError(f"stderr line {number} is not a JSON object with unique keys "
                                 f"({e}): {line!r}") from None
        assert isinstance(record, dict), line
        for key in ("timestamp", "level", "target", "message"):
            assert key in record, f"line {number} has no {key!r}: {line!r}"
        records.append(record)
    return records


def test_every_line_is_json_with_unique_keys(procs):
    targets = procs.path("targets.yaml")
    targets.write_text(targets_yaml([{"service": "web", "address": "127.0.0.2", "ports": "19921-19922"}]))
    wd = Workersd(procs, targets=targets, log_format="json").start()
    wd.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: re-reading the targets file" in wd.proc.stderr(),
               message="SIGHUP logged")
    assert wd.proc.stop() == 0
    records = parse_json_lines(wd.proc.stderr())
    messages = [r["message"] for r in records]
    assert "targets file loaded" in messages, messages
    loaded = records[messages.index("targets file loaded")]
    assert loaded["fields"]["targets"] == 1, loaded
    assert any(m.startswith("shutting down") for m in messages), messages


def test_a_fatal_error_is_reported_once_as_json(procs):
    missing = procs.path("no-such-targets.yaml")
    wd = Workersd(procs, targets=missing, log_format="json")
    result = subprocess.run(wd.argv(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    records = parse_json_lines(result.stderr)
    naming = [r for r in records if str(missing) in json.dumps(r)]
    assert len(naming) == 1, result.stderr
    assert naming[0]["level"] == "ERROR", naming[0]
    assert "cannot read targets file" in json.dumps(naming[0]), naming[0]


def test_kubernetes_mode_lines_carry_the_lease_span(procs, cluster):
    """Kubernetes mode (leader election against the fake API server): the lease's events
    carry its namespace, name and identity once, in their span, not as repeated fields."""
    fk, consul, _ = cluster
    wd = kube_workersd(procs, fk, consul, identity="wd-json", log_format="json").start()
    assert wd.proc.stop() == 0
    records = parse_json_lines(wd.proc.stderr())
    leader = [r for r in records if r["message"] == "became leader"]
    assert len(leader) == 1, [r["message"] for r in records]
    span = leader[0]["span"]
    assert span["name"] == "lease", leader[0]
    assert span["fields"] == {"namespace": "default", "lease": "workersd", "identity": "wd-json"}
    assert "fields" not in leader[0], leader[0]
