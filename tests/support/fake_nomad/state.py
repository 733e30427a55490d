"""In-memory state of the fake Nomad agent: Raft-like index, nodes, allocations, agent mode.

Every write takes the next index (like a Raft apply), updates the object's ModifyIndex and
the table index ("allocs" or "nodes"), and wakes blocking queries (they re-run and return
only if their answer's index passed the one they wait on, as nomad/rpc.go blockingRPC does).
"""

from __future__ import annotations

import threading
import time
import uuid

TERMINAL_CLIENT = ("complete", "failed", "lost")
CLIENT_REPORTED = ("pending", "running", "complete", "failed")


def now_ns() -> int:
    return time.time_ns()


class NotFound(Exception):
    pass


class Store:
    def __init__(self, *, region="global", datacenter="dc1", node_id=None, node_name="fake-node",
                 node_ip="127.0.0.1"):
        self.cond = threading.Condition()
        self.index = 10  # a fresh cluster has applied a few Raft entries already
        self.table = {"allocs": 0, "nodes": 0}
        self.region = region
        self.datacenter = datacenter
        self.nodes: dict[str, dict] = {}
        self.allocs: dict[str, dict] = {}
        self.namespaces = {"default"}
        self.tokens: dict[str, dict] = {}
        self.mode = "up"  # up | no-servers | down
        self.generation = 0  # bumped when the agent goes down or loses its servers: cuts waiters
        self.latency = {}  # path prefix -> seconds
        self.requests: list[dict] = []
        self.waiters: dict[str, int] = {}
        self.agent_node_id = self.add_node(node_id or str(uuid.uuid4()), node_name, node_ip)["id"]

    # -- index -----------------------------------------------------------------

    def _bump(self, table: str) -> int:
        self.index += 1
        self.table[table] = self.index
        self.cond.notify_all()
        return self.index

    # -- nodes -----------------------------------------------------------------

    def add_node(self, node_id, name, ip, *, datacenter=None, status="ready", meta=None):
        with self.cond:
            idx = self._bump("nodes")
            n = self.nodes.get(node_id)
            if n is None:
                n = {"id": node_id, "create_index": idx}
                self.nodes[node_id] = n
            n.update({"name": name, "ip": ip, "datacenter": datacenter or self.datacenter,
                      "status": status, "meta": meta or {}, "version": "1.9.3",
                      "status_updated_at": int(time.time()), "modify_index": idx})
            return dict(n)

    # -- allocations -----------------------------------------------------------

    def add_alloc(self, spec: dict) -> dict:
        """spec: job, group, tasks, node_id, namespace, meta{job,group,tasks}, network, client_status."""
        with self.cond:
            node_id = spec.get("node_id") or self.agent_node_id
            if node_id not in self.nodes:
                raise NotFound(f"node {node_id} not found")
            ns = spec.get("namespace", "default")
            if ns not in self.namespaces:
                raise NotFound(f'namespace "{ns}" not found')
            idx = self._bump("allocs")
            t = now_ns()
            a = {
                "id": spec.get("id") or str(uuid.uuid4()), "eval_id": str(uuid.uuid4()),
                "namespace": ns, "region": self.region, "job": spec["job"], "group": spec["group"],
                "tasks": list(spec["tasks"]), "node_id": node_id, "index": int(spec.get("index", 0)),
                "meta": spec.get("meta") or {}, "network": spec.get("network"),
                "job_type": spec.get("job_type", "service"),
                "job_version": int(spec.get("job_version", 0)), "job_create_index": idx,
                "job_modify_index": idx, "desired_status": "run", "client_status": "pending",
                "task_states": {}, "create_index": idx, "modify_index": idx,
                "alloc_modify_index": idx, "create_time": t, "modify_time": t,
            }
            self.allocs[a["id"]] = a
            status = spec.get("client_status", "running")
            if status != "pending":
                self._client_update(a, status, spec.get("task_states"))
            else:
                a["task_states"] = {task: {"state": "pending", "events": [_event("Received", t)]}
                                    for task in a["tasks"]}
            return dict(a)

    def _client_update(self, a, status, task_states=None):
        """What a client's Node.UpdateAlloc does: ClientStatus and TaskStates, a new ModifyIndex."""
        if status not in CLIENT_REPORTED:
            # "lost" and "unknown" are set by the servers, not reported by a client.
            raise ValueError(f"client status must be one of {CLIENT_REPORTED}, not {status!r}")
        bad = {t: st for t, st in (task_states or {}).items() if st not in ("pending", "running", "dead")}
        if bad:
            raise ValueError(f"task states must be pending, running or dead: {bad}")
        t = now_ns()
        states = {}
        for task in a["tasks"]:
            old = a["task_states"].get(task, {})
            want = (task_states or {}).get(task) or _task_state_for(status)
            ts = dict(old)
            ts["state"] = want
            ts.setdefault("events", [_event("Received", t)])
            if want == "running" and not ts.get("started_at"):
                ts["started_at"] = t
                ts["events"] = ts["events"] + [_event("Started", t)]
            if want == "dead" and not ts.get("finished_at"):
                ts["finished_at"] = t
                ts["failed"] = status == "failed"
                ts["events"] = ts["events"] + [_event("Terminated", t)]
            states[task] = ts
        a["task_states"] = states
        a["client_status"] = status
        a["modify_index"] = self._bump("allocs")
        a["modify_time"] = t

    def update_alloc(self, alloc_id, *, client_status=None, task_states=None, desired_status=None,
                     meta=None, network=None, client_description=None):
        with self.cond:
            a = self.allocs.get(alloc_id)
            if a is None:
                raise NotFound(f"alloc {alloc_id} not found")
            server_side = False
            if meta is not None:
                # An in-place job update: a new job version, the alloc keeps its ID.
                a["meta"] = meta
                a["job_version"] += 1
                server_side = True
            if network is not None:
                a["network"] = network
                server_side = True
            if desired_status is not None:
                a["desired_status"] = desired_status
                server_side = True
            if client_description is not None:
                a["client_description"] = client_description
            if server_side:
                idx = self._bump("allocs")
                a["modify_index"] = a["alloc_modify_index"] = idx
                if meta is not None:
                    a["job_modify_index"] = idx
                a["modify_time"] = now_ns()
            if client_status is not None or task_states is not None:
                self._client_update(a, client_status or a["client_status"], task_states)
            elif not server_side:
                a["modify_index"] = self._bump("allocs")
            return dict(a)

    def stop_alloc(self, alloc_id, client_status="complete"):
        """The scheduler marks it stop (one index), then the client reports its tasks dead (another)."""
        self.update_alloc(alloc_id, desired_status="stop")
        return self.update_alloc(alloc_id, client_status=client_status)

    def lose_alloc(self, alloc_id):
        """The server marks an alloc of a down node lost: desired stop, client status lost."""
        with self.cond:
            a = self.allocs.get(alloc_id)
            if a is None:
                raise NotFound(f"alloc {alloc_id} not found")
            a["desired_status"] = "stop"
            a["client_status"] = "lost"
            idx = self._bump("allocs")
            a["modify_index"] = a["alloc_modify_index"] = idx
            a["modify_time"] = now_ns()
            return dict(a)

    def gc_alloc(self, alloc_id):
        """Garbage collection deletes the alloc: only the table index moves."""
        with self.cond:
            if self.allocs.pop(alloc_id, None) is None:
                raise NotFound(f"alloc {alloc_id} not found")
            self._bump("allocs")

    # -- queries (callers hold self.cond) ----------------------------------------

    def node_allocs(self, node_id):
        """Node.GetAllocs: the node's allocs by ID and the reply index (nomad/node_endpoint.go)."""
        # The allocs "node" index is (NodeID, TerminalStatus()): live allocs first, each part by ID
        # (nomad/state/schema.go).
        allocs = sorted((a for a in self.allocs.values() if a["node_id"] == node_id),
                        key=lambda a: (terminal(a), a["id"]))
        if allocs:
            return allocs, max(a["modify_index"] for a in allocs)
        return [], self.table["allocs"] or 1

    def node_name(self, node_id):
        n = self.nodes.get(node_id)
        return n["name"] if n else ""


def terminal(a) -> bool:
    """Allocation.TerminalStatus (nomad/structs/alloc.go): desired stop/evict or client terminal."""
    return a["desired_status"] in ("stop", "evict") or a["client_status"] in TERMINAL_CLIENT


def _task_state_for(client_status):
    return {"pending": "pending", "running": "running"}.get(client_status, "dead")


def _event(kind, t):
    display = {"Received": "Task received by client", "Started": "Task started by client",
               "Terminated": "Exit Code: 0"}.get(kind, kind)
    return {"type": kind, "time": t, "display": display}
