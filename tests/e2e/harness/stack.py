"""Stacks several tests start the same way, built from the runners."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from .consul import ConsulDouble
from .files import targets_yaml, write_atomic
from .gunicorn import Gunicorn
from .kube import FakeKube
from .processes import ProcessManager
from .workersd import Workersd

WM_PATH = "/apis/workersd.io/v1alpha1/namespaces/{ns}/workermetrics"


class ConsulStack(NamedTuple):
    gunicorn: Gunicorn
    consul: ConsulDouble
    workersd: Workersd


def start_consul_stack(
    procs: ProcessManager,
    service: str,
    node: str,
    workers: int = 4,
    gunicorn: Mapping[str, Any] | None = None,
    **workersd_flags: Any,
) -> ConsulStack:
    """gunicorn on 127.0.0.2 (a free 10-port metrics range), the Consul double, a targets
    file (procs.path("targets.yaml")) declaring that range as `service`, and `workersd
    standalone` publishing it under Consul node `node` with a 1 s resync; started, ready.
    `gunicorn` holds more Gunicorn keywords; `workersd_flags` more workersd flags."""
    g = Gunicorn(procs, address="127.0.0.2", workers=workers, **(gunicorn or {})).start()
    consul = ConsulDouble(procs).start()
    targets = procs.path("targets.yaml")
    entry = {"service": service, "address": g.address, "ports": (g.metrics_first, g.metrics_last)}
    write_atomic(targets, targets_yaml([entry]))
    flags = {"consul_resync_interval": "1s", **workersd_flags}
    wd = Workersd(
        procs, targets=targets, consul_addr=consul.url, consul_node=node, **flags
    ).start()
    return ConsulStack(g, consul, wd)


class Kube:
    """Pods and WorkerMetrics of one namespace (created here) on the fake API server."""

    def __init__(self, fk: FakeKube, ns: str):
        self.fk = fk
        self.ns = ns
        fk.ok("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})

    def add_pod(self, name, ip, *, labels=None, annotations=None, node="node-1", containers=("web",)):
        """A pod; with `ip` it is Running on that podIP, every container running (like a kubelet)."""
        meta = {"name": name, "namespace": self.ns, "labels": labels or {}}
        if annotations:
            meta["annotations"] = annotations
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": c, "image": "clever:1"} for c in containers]},
        }
        self.fk.ok("POST", f"/api/v1/namespaces/{self.ns}/pods", body)
        if ip:
            self.fk.set_pod_status(self.ns, name, podIP=ip, phase="Running", running=True, ready=True)

    def delete_pod(self, name):
        return self.fk.ok("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{name}")

    def pods(self):
        return self.fk.ok("GET", f"/api/v1/namespaces/{self.ns}/pods")["items"]

    def add_wm(self, name, spec):
        body = {
            "apiVersion": "workersd.io/v1alpha1",
            "kind": "WorkerMetrics",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        }
        return self.fk.ok("POST", WM_PATH.format(ns=self.ns), body)

    def patch_wm(self, name, patch):
        return self.fk.ok(
            "PATCH",
            f"{WM_PATH.format(ns=self.ns)}/{name}",
            patch,
            content_type="application/merge-patch+json",
        )

    def wm(self, name):
        return self.fk.ok("GET", f"{WM_PATH.format(ns=self.ns)}/{name}")

    def events(self, name):
        """core/v1 Events about object `name` (how kubectl lists them)."""
        return self.fk.ok(
            "GET",
            f"/api/v1/namespaces/{self.ns}/events",
            query={"fieldSelector": f"involvedObject.name={name}"},
        )["items"]


def start_cluster(procs: ProcessManager, ns: str = "shop") -> tuple[FakeKube, ConsulDouble, Kube]:
    """The fake API server, the Consul double, and a Kube helper for namespace `ns`."""
    fk = FakeKube(procs).start()
    consul = ConsulDouble(procs).start()
    return fk, consul, Kube(fk, ns)
