"""Starts the fake Kubernetes API server with N annotated, running pods and keeps it up until
stdin closes (the bench harness holds stdin). Prints one JSON line: url and kubeconfig.

usage: kube_load.py WORKDIR N PODS_PER_NAMESPACE [PODS_PER_NODE]
Pod i gets podIP 127.20.(i // 200).(1 + i % 200), the address of the sweep listeners. With
PODS_PER_NODE, the Nodes node-0, node-1, .. exist too and pod i is bound to
node-(i // PODS_PER_NODE) (spec.nodeName), as the scheduler would have bound it."""
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "support"))
from fake_kube.client import FakeKube, make_node  # noqa: E402

ANNOTATIONS = {"workersd.io/service": "bench", "workersd.io/ports": "9011-9020"}


def pod_ip(i):
    return f"127.20.{i // 200}.{1 + i % 200}"


def load_on_nodes(fk, n, per_ns, per_node):
    """Nodes, then pods in bulk (one request per namespace-and-node run of pods)."""
    nodes = (n + per_node - 1) // per_node
    fk.bulk([make_node(f"node-{k}") for k in range(nodes)])
    lo = 0
    while lo < n:
        # The largest run of pods sharing both a namespace and a node.
        hi = min(n, (lo // per_ns + 1) * per_ns, (lo // per_node + 1) * per_node)
        fk.bulk_pods(f"bench-{lo // per_ns}", hi - lo, start=lo, annotations=ANNOTATIONS, ip=pod_ip,
                     node_name=f"node-{lo // per_node}")
        lo = hi


def main():
    # The harness sends SIGTERM on exit: stop the server (a child in its own session) too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workdir, n, per_ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    per_node = int(sys.argv[4]) if len(sys.argv) > 4 else None
    fk = FakeKube(workdir, history_limit=max(10000, 2 * n)).start(timeout=60)
    try:
        if per_node:
            load_on_nodes(fk, n, per_ns, per_node)
        else:
            for ns_index, lo in enumerate(range(0, n, per_ns)):
                count = min(per_ns, n - lo)
                fk.bulk_pods(f"bench-{ns_index}", count, start=lo, annotations=ANNOTATIONS, ip=pod_ip)
        print(json.dumps({"url": fk.url, "kubeconfig": fk.kubeconfig, "pid": fk.proc.pid}), flush=True)
        sys.stdin.read()  # until the harness exits
    finally:
        fk.stop()


if __name__ == "__main__":
    main()
