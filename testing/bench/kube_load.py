"""Starts the fake Kubernetes API server with N annotated, running pods and keeps it up until
stdin closes (the bench harness holds stdin). Prints one JSON line: url and kubeconfig.

usage: kube_load.py WORKDIR N PODS_PER_NAMESPACE
Pod i gets podIP 127.20.(i // 200).(1 + i % 200), the address of the sweep listeners."""
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "support"))
from fake_kube.client import FakeKube  # noqa: E402


def pod_ip(i):
    return f"127.20.{i // 200}.{1 + i % 200}"


def main():
    # The harness sends SIGTERM on exit: stop the server (a child in its own session) too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workdir, n, per_ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fk = FakeKube(workdir, history_limit=max(10000, 2 * n)).start(timeout=60)
    try:
        annotations = {"workersd.io/service": "bench", "workersd.io/ports": "9011-9020"}
        for ns_index, lo in enumerate(range(0, n, per_ns)):
            count = min(per_ns, n - lo)
            fk.bulk_pods(f"bench-{ns_index}", count, start=lo, annotations=annotations, ip=pod_ip)
        print(json.dumps({"url": fk.url, "kubeconfig": fk.kubeconfig, "pid": fk.proc.pid}), flush=True)
        sys.stdin.read()  # until the harness exits
    finally:
        fk.stop()


if __name__ == "__main__":
    main()
