#!/usr/bin/env python3
"""Bounded-time chaos soak of `workersd kubernetes` (loopback only).

Two `workersd kubernetes` instances (leader election on a Lease) watch the fake
Kubernetes API server (tests/support/fake_kube) and publish to the Consul double
(testing/consul-double); the "pods" are real gunicorn processes of examples/gunicorn
bound to 127.0.0.x. A seeded RNG injects faults; after each fault (or burst) a quiet
period waits (bounded) until the invariant holds again and records how long it took.

Invariant (checked after every fault):
  * Consul holds EXACTLY the live endpoints under workersd's owner: for every existing,
    running, validly annotated pod, the metrics ports that are actually listening
    (connect test on the pod IP), with the annotated service / tags / meta.team, and
    nothing else: none stale, none missing, no duplicate service IDs;
  * foreign entries (another node; workersd's node with foreign meta) are
    byte-identical to what was registered;
  * an invalid annotation edit removes the pod's entries and a Warning Event
    (reason InvalidWorkerMetrics) naming the bad annotation appears on the pod;
  * a pod covered by a WorkerMetrics (not annotated) is published while the CRD exists;
    the "crd_removal" fault deletes the CRD (its entries must go, every annotated pod
    stays published), then re-creates it and the WorkerMetrics (its entries come back);
  * while workersd's ACL token has lost its write permission (token_loses_write), Consul
    does not change at all (every write is refused), and once it is back workersd converges;
  * one poisoned entry among many: a pod moved to the service POISON, whose writes
    the Consul double refuses per op (as Consul refuses an entry on its own), is not
    published, and every other entry still is (a txn is atomic: workersd must isolate
    the refused ops and resend the rest);
  * no "panicked" in any workersd log;
  * while the API server lists slower than the whole lease (slow_apiserver), the lease does
    not move unless its holder was restarted, and no instance exits;
  * workersd's RSS (VmRSS) stays under --rss-limit-mb and does not grow more than
    --rss-growth-mb within one process lifetime.
Once it holds, it must keep holding over a 1.2 s hold period. A break while no worker
started, stopped or moved (same ports, same worker pids) is a flap and a violation; after a
worker did change (e.g. recycled by --max-requests), a break that does not re-converge
within 10 s is a violation, one that does is counted as a transient.

Usage:
  python3 tests/soak/soak.py --duration 300 --seed 42
  python3 tests/soak/soak.py --duration 60 --seed 1 --quiet      # CI short setting

Exit code 0 iff no violation. Everything started is killed on exit (also on Ctrl-C).
Needs target/debug/workersd and target/debug/consul-double
(`cargo build --workspace --bins`; WORKERSD_BIN / CONSUL_DOUBLE_BIN override) and the
Python packages of tests/requirements.txt.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from harness import (  # noqa: E402
    ConsulDouble,
    FakeKube,
    Gunicorn,
    ProcessManager,
    Workersd,
)

CLUSTER = "soak"
OWNER = f"workersd-{CLUSTER}"  # node name and owner id follow --cluster-name
NS = "soak"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/default/leases/workersd"
SERVICES = ("clever", "clever-b")
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
CRD_NAME = "workermetrics.workersd.io"
WM_PATH = f"/apis/workersd.io/v1alpha1/namespaces/{NS}/workermetrics"
WM_TEAM = "declared"  # meta.team of the WorkerMetrics-covered pod
TEAMS = ("web", "payments", "search")
TAGSETS = ("", "gunicorn", "gunicorn,python")
MAX_REQUESTS = 15  # gunicorn --max-requests: traffic recycles workers
HOLD_S = 1.2  # after convergence, with no fault, Consul must not change
POISON = "clever-poison"  # valid for workersd; the double refuses its txn writes

FAULT_WEIGHTS = {
    "pod_create": 6,
    "pod_delete": 5,
    "scale_up": 6,
    "scale_down": 5,
    "recycle": 5,
    "annotation_valid": 6,
    "annotation_invalid": 4,
    "poisoned_entry": 3,
    "consul_outage": 3,
    "consul_wipe": 2,
    "watch_drop": 3,
    "watch_410": 3,
    "controller_kill": 3,
    "leader_handover": 3,
    "crd_removal": 2,
    "token_loses_write": 2,
    "slow_apiserver": 2,
}

# Consul runs with ACLs (default deny), as in production: the soak reads and registers
# foreign entries with a management token; workersd gets a token whose policy allows
# writing its node and every service, which the token_loses_write fault takes away for a
# while (an operator editing the policy) and gives back.
ROOT_TOKEN = "soak-root-" + os.urandom(8).hex()
WORKERSD_TOKEN = "soak-workersd-" + os.urandom(8).hex()
WRITE_RULES = {"node_prefix": {"workersd-": {"policy": "write"}},
               "service_prefix": {"": {"policy": "write"}}}
READ_RULES = {"node_prefix": {"": {"policy": "read"}},
              "service_prefix": {"": {"policy": "read"}}}


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="workersd-soak-"))
        self.procs = ProcessManager(self.workdir)
        self.pods: dict[str, dict] = {}  # name -> {g, ann, valid, token}
        self.pod_seq = 0
        self.free_ips = [f"127.0.0.{i}" for i in range(2, 60)]
        self.events = collections.Counter()
        self.conv: dict[str, list[float]] = collections.defaultdict(list)
        self.violations: list[str] = []
        self.transients: list[str] = []  # broke after convergence, re-converged within 10 s
        self.rss: dict[str, dict] = {}  # identity -> {first,last,max,pid,pid_first}
        self.foreign_baseline: list[str] = []
        self.workersd: dict[str, Workersd] = {}
        self.crd_present = True  # the fake starts with the repository's CRD
        self.wm_pod: dict | None = None  # {name, g}: covered by the WorkerMetrics, no annotations
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ output

    def log(self, msg: str, force: bool = False) -> None:
        if force or not self.args.quiet:
            print(f"[{time.monotonic() - self.t_start:7.1f}s] {msg}", flush=True)

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        print(f"[{time.monotonic() - self.t_start:7.1f}s] VIOLATION: {msg}", flush=True)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        a = self.args
        self.fk = FakeKube(self.procs).start()
        self.consul = ConsulDouble(self.procs, acl_token=ROOT_TOKEN, acl_config={
            "default_policy": "deny",
            "tokens": [{"secret_id": ROOT_TOKEN, "management": True},
                       {"secret_id": WORKERSD_TOKEN, "rules": WRITE_RULES}],
        }).start()
        self.consul.refuse_service_writes([POISON])
        self.fk.ok("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        n0 = self.rng.randint(a.min_pods + 1, a.max_pods)
        for _ in range(n0):
            self.create_pod()
        self.create_wm_pod()
        # A foreign entry on another node, registered before workersd starts.
        self.register_other_node()
        for ident in ("wd-a", "wd-b"):
            self.workersd[ident] = Workersd(
                self.procs,
                mode="kubernetes",
                consul_addr=self.consul.url,
                consul_token=WORKERSD_TOKEN,
                env={"KUBECONFIG": self.fk.kubeconfig},
                probe_interval="1s",
                extra_args=[
                    "--cluster-name", CLUSTER,
                    "--identity", ident,
                    "--lease-namespace", "default",
                    "--lease-duration", f"{a.lease}s",
                    "--consul-resync-interval", "2s",
                ],
            )
        self.workersd["wd-a"].start(wait_ready=True)
        self.workersd["wd-b"].start(wait_ready=False)
        ok, why, _ = self.wait_converged("setup", timeout=60)
        if not ok:
            raise SystemExit(f"initial convergence failed: {why}")
        # workersd created its node: now a foreign entry on that node (other tool's meta).
        self.register_same_node()
        self.snapshot_foreign()
        self.log(f"setup: {len(self.pods)} pods, foreign entries {len(self.foreign_baseline)}, "
                 f"leader {self.leader()}")

    def register_other_node(self) -> None:
        self.consul.register({
            "Node": "other-node", "Address": "127.0.0.250",
            "NodeMeta": {"external-source": "nomad"},
            "Service": {"ID": "clever-legacy", "Service": "clever", "Address": "127.0.0.250",
                        "Port": 9011, "Tags": ["legacy"], "Meta": {"team": "legacy"}},
        })
        # Same meta as workersd's but another owner (another cluster), another node.
        self.consul.register({
            "Node": "workersd-other", "Address": "127.0.0.251",
            "NodeMeta": {"external-source": "workersd"},
            "Service": {"ID": "workersd-other:clever:127.0.0.251:9011", "Service": "clever",
                        "Address": "127.0.0.251", "Port": 9011,
                        "Meta": {"external-source": "workersd", "workersd-owner": "workersd-other"}},
        })

    def register_same_node(self) -> None:
        # On workersd's own node, but not workersd's: no meta / another owner's meta.
        self.consul.register({
            "Node": OWNER, "SkipNodeUpdate": True,
            "Service": {"ID": "hand-made", "Service": "clever", "Address": "127.0.0.252",
                        "Port": 9100, "Meta": {"team": "ops"}},
        })
        self.consul.register({
            "Node": OWNER, "SkipNodeUpdate": True,
            "Service": {"ID": "workersd-intruder:clever:127.0.0.253:9011", "Service": "clever",
                        "Address": "127.0.0.253", "Port": 9011,
                        "Meta": {"external-source": "workersd", "workersd-owner": "workersd-intruder"}},
        })

    def foreign_entries(self) -> list[str]:
        out = []
        for svc in sorted(self.consul.catalog_services()):
            for e in self.consul.catalog_service(svc):
                if not self.is_owned(e):
                    out.append(json.dumps(e, sort_keys=True))
        return sorted(out)

    def snapshot_foreign(self) -> None:
        self.foreign_baseline = self.foreign_entries()

    def owned_entries(self) -> list[dict]:
        return [e for svc in sorted(self.consul.catalog_services())
                for e in self.consul.catalog_service(svc) if self.is_owned(e)]

    @staticmethod
    def is_owned(e: dict) -> bool:
        m = e.get("ServiceMeta") or {}
        return m.get("external-source") == "workersd" and m.get("workersd-owner") == OWNER

    # ------------------------------------------------------------------ pods

    def annotations(self, g: Gunicorn, service="clever", per_container=None, team=None, tags=None) -> dict:
        per_container = self.rng.random() < 0.5 if per_container is None else per_container
        key = "workersd.io/ports.web" if per_container else "workersd.io/ports"
        ann = {"workersd.io/service": service, key: f"{g.metrics_first}-{g.metrics_last}",
               "workersd.io/meta.team": team or self.rng.choice(TEAMS)}
        tags = self.rng.choice(TAGSETS) if tags is None else tags
        if tags:
            ann["workersd.io/tags"] = tags
        return ann

    def create_pod(self) -> str:
        ip = self.free_ips.pop(0)
        self.pod_seq += 1
        name = f"web-{self.pod_seq}"
        workers = self.rng.randint(1, 4)
        g = Gunicorn(self.procs, address=ip, workers=workers,
                     extra_args=["--max-requests", str(MAX_REQUESTS), "--max-requests-jitter", "3"]).start()
        ann = self.annotations(g)
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}, "annotations": ann},
                "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "clever:1"}]}}
        self.fk.ok("POST", f"/api/v1/namespaces/{NS}/pods", body)
        self.fk.set_pod_status(NS, name, podIP=ip, phase="Running", running=True, ready=True)
        self.pods[name] = {"g": g, "ann": ann, "valid": True, "token": None, "workers": workers}
        return name

    def create_wm_pod(self) -> None:
        """A pod published because a WorkerMetrics selects it (no annotations)."""
        ip = self.free_ips.pop(0)
        g = Gunicorn(self.procs, address=ip, workers=2).start()
        name = "declared-1"
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": {"app": "declared"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "clever:1"}]}}
        self.fk.ok("POST", f"/api/v1/namespaces/{NS}/pods", body)
        self.fk.set_pod_status(NS, name, podIP=ip, phase="Running", running=True, ready=True)
        self.wm_pod = {"name": name, "g": g}
        self.create_wm()

    def create_wm(self) -> None:
        g = self.wm_pod["g"]
        self.fk.ok("POST", WM_PATH, {
            "apiVersion": "workersd.io/v1alpha1", "kind": "WorkerMetrics",
            "metadata": {"name": "declared", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "declared"}}, "service": "clever",
                     "containers": [{"name": "web", "ports": f"{g.metrics_first}-{g.metrics_last}"}],
                     "meta": {"team": WM_TEAM}}})

    def crd_object(self) -> dict:
        import yaml  # tests/requirements.txt

        return yaml.safe_load((REPO_ROOT / "crds" / "workermetrics.yaml").read_text())

    def delete_pod(self, name: str) -> None:
        p = self.pods.pop(name)
        self.fk.ok("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
        p["g"].stop(timeout=5)
        self.free_ips.append(p["g"].address)

    def set_annotations(self, name: str, new: dict) -> None:
        old = self.pods[name]["ann"]
        patch = {k: None for k in old if k not in new}
        patch.update(new)
        self.fk.ok("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}",
                   {"metadata": {"annotations": patch}}, content_type="application/merge-patch+json")
        self.pods[name]["ann"] = dict(new)

    # ------------------------------------------------------------------ invariant

    def expected(self) -> set[tuple]:
        want = set()
        for name, p in self.pods.items():
            if not p["valid"] or p["ann"]["workersd.io/service"] == POISON:
                continue
            g, ann = p["g"], p["ann"]
            tags = tuple(sorted(t for t in ann.get("workersd.io/tags", "").split(",") if t))
            for port in g.listening_metrics_ports():
                want.add((ann["workersd.io/service"], name, g.address, port,
                          ann.get("workersd.io/meta.team"), tags))
        if self.wm_pod and self.crd_present:
            g = self.wm_pod["g"]
            for port in g.listening_metrics_ports():
                want.add(("clever", self.wm_pod["name"], g.address, port, WM_TEAM, ()))
        return want

    def world(self) -> set[tuple]:
        """Every listening worker as (pod, port, pid): equal sets mean nothing moved."""
        out = set()
        for name, p in self.pods.items():
            if not p["valid"] or p["ann"]["workersd.io/service"] == POISON:
                continue
            owners = p["g"].port_owners()
            out.update((name, port, owners.get(port)) for port in p["g"].listening_metrics_ports())
        return out

    def entries(self) -> tuple[list[dict], list[dict]]:
        """(owned, foreign) catalog entries."""
        owned, foreign = [], []
        for svc in sorted(self.consul.catalog_services()):
            for e in self.consul.catalog_service(svc):
                (owned if self.is_owned(e) else foreign).append(e)
        return owned, foreign

    @staticmethod
    def entry_key(e: dict) -> tuple:
        m = e["ServiceMeta"]
        return (e["ServiceName"], m.get("k8s-pod"), e["ServiceAddress"], e["ServicePort"],
                m.get("team"), tuple(sorted(e.get("ServiceTags") or [])))

    def published(self) -> set[tuple]:
        return {self.entry_key(e) for e in self.entries()[0]}

    def check(self, event_token=None) -> tuple[bool, str]:
        """(holds, why not) - one evaluation of the invariant."""
        want = self.expected()
        owned, foreign = self.entries()
        ids = [e["ServiceID"] for e in owned]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            return False, f"duplicate service IDs {dup}"
        have = set()
        for e in owned:
            have.add(self.entry_key(e))
            if e["Node"] != OWNER:
                return False, f"owned entry on node {e['Node']}: {e['ServiceID']}"
        if want != have:
            return False, (f"stale {sorted(have - want)} missing {sorted(want - have)}")
        # Re-check the listening ports: a worker that changed meanwhile is "not yet".
        if want != self.expected():
            return False, "workers changed during the check"
        # The fault must have taken effect: every gunicorn runs its intended worker count
        # (else "converged" could mean "nothing happened yet").
        for name, p in self.pods.items():
            n = len(p["g"].listening_metrics_ports())
            if n != p["workers"]:
                return False, f"gunicorn {name}: {n} metrics ports listening, {p['workers']} workers intended"
        fnow = sorted(json.dumps(e, sort_keys=True) for e in foreign)
        if self.foreign_baseline and fnow != self.foreign_baseline:
            return False, f"foreign entries changed: {sorted(set(fnow) ^ set(self.foreign_baseline))[:3]}"
        if event_token and not self.event_seen(*event_token):
            return False, f"no Warning Event on {event_token[0]} naming {event_token[1]}"
        return True, ""

    def event_seen(self, name: str, token: str) -> bool:
        evs = self.fk.ok("GET", f"/api/v1/namespaces/{NS}/events",
                         query={"fieldSelector": f"involvedObject.name={name}"})["items"]
        return any(e.get("reason") == "InvalidWorkerMetrics" and e.get("type") == "Warning"
                   and token in (e.get("message") or "") for e in evs)

    def events_on(self, name: str) -> list[str]:
        with contextlib.suppress(Exception):
            evs = self.fk.ok("GET", f"/api/v1/namespaces/{NS}/events",
                             query={"fieldSelector": f"involvedObject.name={name}"})["items"]
            return [f"{e.get('reason')}: {(e.get('message') or '')[:80]}" for e in evs]
        return []

    def wait_converged(self, kind: str, t0: float | None = None, timeout: float | None = None,
                       event_token=None) -> tuple[bool, str, float]:
        t0 = t0 if t0 is not None else time.monotonic()
        timeout = timeout or self.args.converge_timeout
        deadline = t0 + timeout
        why = "never checked"
        for _ in range(int(timeout / 0.1) + 10):
            try:
                ok, why = self.check(event_token)
            except Exception as exc:  # noqa: BLE001 - e.g. Consul still down
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if ok:
                return True, "", time.monotonic() - t0
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return False, why, time.monotonic() - t0

    def quiet(self, kind: str, t0: float, event_token=None) -> None:
        ok, why, took = self.wait_converged(kind, t0)
        if ok and event_token:
            # The entries are gone; the Warning Event naming the bad annotation must follow.
            t_ev = time.monotonic() + self.args.event_timeout
            for _ in range(int(self.args.event_timeout / 0.2) + 2):
                with contextlib.suppress(Exception):
                    if self.event_seen(*event_token):
                        self.conv[f"{kind}:event"].append(time.monotonic() - t0)
                        break
                if time.monotonic() >= t_ev:
                    self.violation(f"{kind}: no Warning Event (InvalidWorkerMetrics) on pod "
                                   f"{event_token[0]} naming {event_token[1]!r} within "
                                   f"{self.args.event_timeout:.0f}s; Events there: {self.events_on(event_token[0])}")
                    break
                time.sleep(0.2)
        if not ok:
            self.violation(f"{kind}: not converged within {self.args.converge_timeout:.0f}s: {why}")
            self.dump_state()
            # Re-baseline so one failure is reported once, and continue.
            with contextlib.suppress(Exception):
                self.snapshot_foreign()
        else:
            self.conv[kind].append(took)
            self.log(f"{kind}: converged in {took:.2f}s")
            self.hold(kind)
        self.check_logs()
        self.sample_rss()

    def check_logs(self) -> None:
        """Every workersd process ever started (restarted ones log to new files)."""
        for proc in self.procs.processes:
            if not proc.name.startswith("workersd"):
                continue
            text = proc.logs()
            if "panicked" in text:
                line = next(l for l in text.splitlines() if "panicked" in l)
                msg = f"{proc.name} (pid {proc.pid}): 'panicked' in log: {line[:300]}"
                if msg not in self.violations:
                    self.violation(msg)

    def sample_rss(self) -> None:
        for ident, w in self.workersd.items():
            if not w.alive():
                continue
            pid = w.proc.pid
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), None)
            if kb is None:
                continue
            mb = kb / 1024
            r = self.rss.setdefault(ident, {"first": mb, "max": mb, "last": mb, "pid": pid,
                                            "pid_first": mb, "samples": 0})
            if r["pid"] != pid:  # restarted: a new process lifetime
                r["pid"], r["pid_first"] = pid, mb
            r["last"], r["max"] = mb, max(r["max"], mb)
            r["samples"] += 1
            if mb > self.args.rss_limit_mb:
                self.violation(f"{ident} pid {pid}: RSS {mb:.1f} MB > limit {self.args.rss_limit_mb} MB")
            if mb - r["pid_first"] > self.args.rss_growth_mb:
                self.violation(f"{ident} pid {pid}: RSS grew {r['pid_first']:.1f} -> {mb:.1f} MB")
                r["pid_first"] = mb  # report each growth step once

    def dump_state(self) -> None:
        with contextlib.suppress(Exception):
            self.log(f"  leader={self.leader()} alive={ {i: w.alive() for i, w in self.workersd.items()} }",
                     force=True)
            for name, p in self.pods.items():
                self.log(f"  pod {name} {p['g'].address} valid={p['valid']} "
                         f"ports={p['g'].listening_metrics_ports()} ann={p['ann']}", force=True)

    # ------------------------------------------------------------------ controllers

    def leader(self) -> str | None:
        r = self.fk.api("GET", LEASE_PATH)
        return (r.json() or {}).get("spec", {}).get("holderIdentity") if r.status == 200 else None

    def restart(self, ident: str) -> None:
        w = self.workersd[ident]
        if w.alive():
            return
        w.start(wait_ready=False)

    # ------------------------------------------------------------------ faults

    def pick(self) -> str:
        n = len(self.pods)
        kinds = dict(FAULT_WEIGHTS)
        for w in self.args.weight:
            k, _, v = w.partition("=")
            if k not in FAULT_WEIGHTS:
                raise SystemExit(f"--weight: unknown fault {k!r} (one of {', '.join(FAULT_WEIGHTS)})")
            kinds[k] = float(v)
        kinds = {k: v for k, v in kinds.items() if v > 0}
        if self.args.faults:
            kinds = {k: w for k, w in kinds.items() if k in self.args.faults}
        if n >= self.args.max_pods or not self.free_ips:
            kinds.pop("pod_create", None)
        if n <= self.args.min_pods:
            kinds.pop("pod_delete", None)
        if not any(p["workers"] < 4 for p in self.pods.values()):
            kinds.pop("scale_up", None)
        if not any(p["workers"] > 1 for p in self.pods.values()):
            kinds.pop("scale_down", None)
        names = list(kinds)
        if not names:  # --faults named faults that cannot apply right now
            return "recycle"
        return self.rng.choices(names, weights=[kinds[k] for k in names])[0]

    def hold(self, kind: str) -> None:
        """No fault is injected for the hold period: Consul must keep what it converged to.
        Sampled every 0.1 s, so an entry removed and restored within the period shows."""
        settled, converged = self.world(), self.published()
        t_end = time.monotonic() + HOLD_S
        while time.monotonic() < t_end:
            time.sleep(0.1)
            try:
                now, why = self.published(), ""
            except Exception as exc:  # noqa: BLE001
                now, why = None, repr(exc)
            if now == converged:
                continue
            why = why or f"lost {sorted(converged - now)[:3]} gained {sorted(now - converged)[:3]}"
            if self.world() == settled:
                # No worker started, stopped or moved, yet Consul changed: a flap.
                self.violation(f"{kind}: flapped after convergence while no worker changed: {why}")
                self.dump_state()
                return
            # A worker changed (e.g. recycled by --max-requests as traffic ended): Consul
            # must follow it within 10 s.
            ok, why2, _ = self.wait_converged(kind, timeout=10)
            if not ok:
                self.violation(f"{kind}: invariant broke after convergence: {why} / {why2}")
            else:
                self.transients.append(f"{kind}: {why}")
                self.log(f"{kind}: transient after a worker changed ({why}); re-converged", force=True)
            return
        held, why = self.check()
        if not held:
            self.violation(f"{kind}: invariant broke at the end of the hold: {why}")

    def wait_workers(self, name: str, timeout: float = 20) -> None:
        """Bounded wait until gunicorn runs the intended worker count, so convergence time
        measures workersd, not gunicorn's fork and boot."""
        p = self.pods[name]
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end and len(p["g"].listening_metrics_ports()) != p["workers"]:
            time.sleep(0.05)

    def side_change(self) -> None:
        """A pod change made while workersd cannot see or write it (outage, kill, handover)."""
        kinds = ["annotation_valid"]
        if any(p["workers"] < 4 for p in self.pods.values()):
            kinds.append("scale_up")
        if any(p["workers"] > 1 for p in self.pods.values()):
            kinds.append("scale_down")
        if len(self.pods) > self.args.min_pods:
            kinds.append("pod_delete")
        kind = self.rng.choice(kinds)
        self.events[f"{kind} (during fault)"] += 1
        self.log("  + during the fault:")
        self.inject(kind)

    def inject(self, kind: str):
        """Inject one fault; returns (t0 for convergence, event token or None)."""
        rng = self.rng
        token = None
        names = sorted(self.pods)
        if kind == "pod_create":
            name = self.create_pod()
            self.log(f"pod_create {name} ({self.pods[name]['workers']} workers)")
        elif kind == "pod_delete":
            name = rng.choice(names)
            self.log(f"pod_delete {name}")
            self.delete_pod(name)
        elif kind == "scale_up":
            name = rng.choice([n for n in names if self.pods[n]["workers"] < 4])
            self.pods[name]["workers"] += 1
            self.pods[name]["g"].scale_up()
            self.log(f"scale_up {name} -> {self.pods[name]['workers']}")
            self.wait_workers(name)
        elif kind == "scale_down":
            name = rng.choice([n for n in names if self.pods[n]["workers"] > 1])
            self.pods[name]["workers"] -= 1
            self.pods[name]["g"].scale_down()
            self.log(f"scale_down {name} -> {self.pods[name]['workers']}")
            self.wait_workers(name)
        elif kind == "recycle":
            name = rng.choice(names)
            p = self.pods[name]
            n = (MAX_REQUESTS + 3) * p["workers"] + rng.randint(0, 10)
            self.log(f"recycle {name}: {n} requests")
            with contextlib.suppress(Exception):  # a request hitting a recycling worker may fail
                p["g"].send_requests(n, concurrency=4, timeout=10)
            # Let the last recycled workers finish booting before the quiet period.
            self.wait_workers(name)
        elif kind == "annotation_valid":
            invalid = [n for n in names if not self.pods[n]["valid"]
                       or self.pods[n]["ann"]["workersd.io/service"] == POISON]
            name = rng.choice(invalid) if invalid and rng.random() < 0.7 else rng.choice(names)
            g = self.pods[name]["g"]
            ann = self.annotations(g, service=rng.choice(SERVICES))
            self.log(f"annotation_valid {name}: {ann}")
            self.set_annotations(name, ann)
            self.pods[name]["valid"] = True
        elif kind == "annotation_invalid":
            name = rng.choice(names)
            g = self.pods[name]["g"]
            ann = dict(self.pods[name]["ann"])
            n = self.events["annotation_invalid"]
            variant = rng.choice(("typo", "reversed", "service"))
            if variant == "typo":  # an unknown workersd.io/ annotation (a typo)
                token = f"workersd.io/prots-{n}"
                ann[token] = "9011"
            elif variant == "reversed":
                key = next(k for k in ann if k.startswith("workersd.io/ports"))
                hi = 30000 + n
                ann[key] = f"{hi}-{hi - 5}"
                token = f"{hi}-{hi - 5}"
            else:  # not a DNS label
                token = f"Bad_Name_{n}"
                ann["workersd.io/service"] = token
            self.log(f"annotation_invalid {name}: {variant} ({token})")
            self.set_annotations(name, ann)
            self.pods[name]["valid"] = False
            token = (name, token)
        elif kind == "poisoned_entry":
            name = rng.choice(names)
            ann = self.annotations(self.pods[name]["g"], service=POISON)
            self.log(f"poisoned_entry {name}: its entries are refused by Consul")
            self.set_annotations(name, ann)
            self.pods[name]["valid"] = True
        elif kind == "consul_outage":
            secs = rng.uniform(1, 5)
            self.log(f"consul_outage {secs:.1f}s")
            self.consul.down()
            time.sleep(secs / 2)
            self.side_change()
            time.sleep(secs / 2)
            self.consul.up()
        elif kind == "consul_wipe":
            secs = rng.uniform(0.5, 3)
            self.log(f"consul_wipe (down {secs:.1f}s, up empty)")
            self.consul.down()
            time.sleep(secs)
            if rng.random() < 0.5:
                self.side_change()
            self.consul.up(empty=True)
            # Other tools re-register theirs; workersd's node comes back through workersd.
            self.register_other_node()
            t0 = time.monotonic()
            self.foreign_baseline = []  # not compared until re-registered below
            return t0, None
        elif kind == "watch_drop":
            mode = rng.choice(("reset", "clean"))
            dropped = self.fk.drop_watches(mode=mode)
            self.log(f"watch_drop ({mode}): {dropped} watches")
            if rng.random() < 0.5 and len(self.pods) > self.args.min_pods:
                name = rng.choice(names)
                self.log(f"  + pod_delete {name} while the watch is down")
                self.delete_pod(name)
        elif kind == "watch_410":
            # Move the revision (a resource workersd does not watch), compact: every
            # resourceVersion workersd holds is now too old; drop: the re-watch gets 410.
            self.fk.ok("POST", "/api/v1/namespaces", {"metadata": {"name": f"bump-{self.events[kind]}"}})
            self.fk.compact()
            dropped = self.fk.drop_watches()
            self.log(f"watch_410: compacted, {dropped} watches dropped")
            if len(self.pods) > self.args.min_pods and rng.random() < 0.6:
                name = rng.choice(names)
                self.log(f"  + pod_delete {name} during the re-list")
                self.delete_pod(name)
            elif self.free_ips and len(self.pods) < self.args.max_pods:
                name = self.create_pod()
                self.log(f"  + pod_create {name} during the re-list")
        elif kind == "controller_kill":
            ident = rng.choice(sorted(self.workersd))
            role = "leader" if self.leader() == ident else "standby"
            delay = rng.uniform(0, 2)
            self.log(f"controller_kill -9 {ident} ({role}), restart after {delay:.1f}s")
            self.workersd[ident].kill()
            if role == "leader":
                self.side_change()
            time.sleep(delay)
            self.restart(ident)
        elif kind == "crd_removal":
            # helm uninstall / kubectl delete crd: every WorkerMetrics goes with it and the
            # watch ends; workersd keeps publishing annotated pods and polls for the CRD.
            self.log("crd_removal: delete the WorkerMetrics CRD")
            t0 = time.monotonic()
            self.fk.ok("DELETE", f"{CRD_PATH}/{CRD_NAME}")
            self.crd_present = False
            if rng.random() < 0.5:
                self.side_change()
            self.quiet("crd_removal:absent", t0)
            self.log("crd_removal: re-create the CRD and the WorkerMetrics")
            t0 = time.monotonic()
            self.fk.ok("POST", CRD_PATH, self.crd_object())
            self.create_wm()
            self.crd_present = True
            return t0, None
        elif kind == "token_loses_write":
            # The policy loses its write rules while pods change: every write is refused
            # (409, Permission denied per op), so nothing may change in Consul, and nothing
            # live may be deregistered; once the rules are back, workersd converges.
            secs = rng.uniform(2, 5)
            before = sorted(e["ServiceID"] for e in self.owned_entries())
            denied0 = self.consul.stats().get("acl_permission_denied", 0)
            self.log(f"token_loses_write for {secs:.1f}s")
            self.consul.set_token_rules(WORKERSD_TOKEN, READ_RULES)
            self.side_change()
            t_end = time.monotonic() + secs
            while time.monotonic() < t_end:
                now = sorted(e["ServiceID"] for e in self.owned_entries())
                if now != before:
                    self.violation(f"token_loses_write: Consul changed while the token could not "
                                   f"write: {sorted(set(now) ^ set(before))[:4]}")
                    break
                time.sleep(0.2)
            refused = self.consul.stats().get("acl_permission_denied", 0) - denied0
            self.log(f"  writes refused meanwhile: {refused} operations")
            if refused:
                self.events["token_loses_write: writes refused"] += 1
            self.consul.set_token_rules(WORKERSD_TOKEN, WRITE_RULES)
            return time.monotonic(), None
        elif kind == "leader_handover":
            lead = self.leader()
            other = next(i for i in sorted(self.workersd) if i != lead)
            if not self.workersd[other].alive():
                self.restart(other)
            self.log(f"leader_handover: kill -9 leader {lead}; {other} must take over")
            t0 = time.monotonic()
            if lead in self.workersd:
                self.workersd[lead].kill()
            self.side_change()
            deadline = time.monotonic() + self.args.lease * 3 + 15
            while time.monotonic() < deadline and self.leader() != other:
                time.sleep(0.1)
            if self.leader() != other:
                self.violation(f"leader_handover: {other} did not take the lease over "
                               f"(holder {self.leader()})")
            else:
                self.conv["leader_handover:lease"].append(time.monotonic() - t0)
            if lead in self.workersd:
                self.restart(lead)  # back as a standby
            return t0, None
        elif kind == "slow_apiserver":
            # Lists slower than the whole lease (a big cluster) and late watches, for a while:
            # the watches re-list slowly, and a restarted leader's initial sync is slow. The
            # lease must stay where it is and no instance may exit.
            lease = self.args.lease
            secs = rng.uniform(1.5, 2.5) * lease
            lead = self.leader()
            restart_leader = lead in self.workersd and rng.random() < 0.5
            self.log(f"slow_apiserver: lists take {secs:.1f}s, watches start {lease / 2:.1f}s late "
                     f"for {secs + lease:.1f}s; watches dropped" + (f"; leader {lead} restarted" if restart_leader else ""))
            t0 = time.monotonic()
            self.fk.set_latency(list=secs, page=0.2, watch=lease / 2)
            try:
                self.fk.drop_watches()
                if restart_leader:
                    # SIGTERM: it leaves the lease to expire, then one instance re-acquires it
                    # and waits on a slow initial list.
                    self.workersd[lead].stop()
                    self.restart(lead)
                self.side_change()
                holder = self.leader()
                t_end = time.monotonic() + secs + lease
                while time.monotonic() < t_end:
                    now_holder = self.leader()
                    if not restart_leader and now_holder != holder:
                        self.violation(f"slow_apiserver: the lease moved from {holder} to {now_holder} "
                                       "while nothing happened to its holder")
                        break
                    holder = now_holder
                    time.sleep(0.2)
                for ident, w in self.workersd.items():
                    if not w.alive():
                        self.violation(f"slow_apiserver: {ident} exited during slow lists: {w.logs()[-500:]}")
                        self.restart(ident)
            finally:
                self.fk.set_latency(list=0, page=0, watch=0)
            return t0, None
        return time.monotonic(), token

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        a = self.args
        self.log(f"soak: seed {a.seed}, duration {a.duration}s, workdir {self.workdir}", force=True)
        self.setup()
        deadline = self.t_start + a.duration
        for i in range(a.max_faults):
            if time.monotonic() >= deadline:
                break
            kind = self.pick()
            self.events[kind] += 1
            try:
                t0, token = self.inject(kind)
            except Exception as exc:  # noqa: BLE001 - a harness action failed
                self.violation(f"{kind}: injection failed: {type(exc).__name__}: {exc}")
                continue
            self.quiet(kind, t0, event_token=token)
            if kind == "consul_wipe":
                # workersd re-created its node: the hand-made entries come back too.
                with contextlib.suppress(Exception):
                    self.register_same_node()
                    self.snapshot_foreign()
        # Final: both instances alive again, invariant holds.
        for ident in self.workersd:
            self.restart(ident)
        self.quiet("final", time.monotonic())
        return self.report()

    def report(self) -> int:
        def pct(xs, q):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]

        elapsed = time.monotonic() - self.t_start
        out = [f"\n=== workersd soak: seed {self.args.seed}, {elapsed:.0f}s, "
               f"{sum(self.events.values())} faults, nproc {os.cpu_count()}, "
               f"load {os.getloadavg()[0]:.2f} ==="]
        out.append("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())))
        out.append(f"{'convergence (s)':<24}{'n':>4}{'p50':>8}{'p99':>8}{'max':>8}")
        for kind in sorted(self.conv):
            xs = self.conv[kind]
            out.append(f"{kind:<24}{len(xs):>4}{pct(xs, .5):>8.2f}{pct(xs, .99):>8.2f}{max(xs):>8.2f}")
        for ident, r in sorted(self.rss.items()):
            out.append(f"RSS {ident}: first {r['first']:.1f} MB, last {r['last']:.1f} MB, "
                       f"max {r['max']:.1f} MB ({r['samples']} samples)")
        out.append(f"transient breaks after convergence (re-converged within 10 s): {len(self.transients)}")
        out.extend(f"  - {t}" for t in self.transients[:10])
        out.append(f"violations: {len(self.violations)}")
        out.extend(f"  - {v}" for v in self.violations)
        out.append(f"logs: {self.procs.log_dir}")
        print("\n".join(out), flush=True)
        return 1 if self.violations else 0

    def close(self) -> None:
        self.procs.stop_all(timeout=5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="seconds of fault injection")
    ap.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    ap.add_argument("--quiet", action="store_true", help="only violations and the summary")
    ap.add_argument("--min-pods", type=int, default=2)
    ap.add_argument("--max-pods", type=int, default=6)
    ap.add_argument("--lease", type=int, default=3, help="--lease-duration seconds")
    ap.add_argument("--converge-timeout", type=float, default=60)
    ap.add_argument("--event-timeout", type=float, default=15)
    ap.add_argument("--max-faults", type=int, default=10000)
    ap.add_argument("--faults", type=lambda v: set(v.split(",")), default=None,
                    help="inject only these faults (comma-separated), e.g. token_loses_write")
    ap.add_argument("--rss-limit-mb", type=float, default=200)
    ap.add_argument("--rss-growth-mb", type=float, default=40)
    ap.add_argument("--workdir", help="logs here (default: a new temp dir, kept)")
    ap.add_argument("--weight", action="append", default=[], metavar="FAULT=N",
                    help="override a fault's weight (0 disables it), e.g. --weight crd_removal=20")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    soak = Soak(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return soak.run()
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        soak.report()
        return 2
    finally:
        soak.close()


if __name__ == "__main__":
    sys.exit(main())
