"""Start a fake_nomad server as a subprocess and drive it (stdlib only).

    from fake_nomad.client import FakeNomad, port_range     # with tests/support on sys.path

    with FakeNomad(tmp_path) as fn:
        fn.url                      # NOMAD_ADDR (http://127.0.0.1:PORT)
        fn.node_id                  # the agent's own node (stats.client.node_id of /v1/agent/self)
        a = fn.run_alloc("web", "app", "gunicorn", meta={"workersd_service": "web"},
                         ip="127.0.0.5", ports=port_range("w", 8000, 4))
        fn.set_task_state(a["ID"], "gunicorn", "dead"); fn.set_client_status(a["ID"], "failed")
        fn.stop_alloc(a["ID"]); fn.gc_alloc(a["ID"])
        fn.agent_down(); fn.agent_up(); fn.servers_lost()
        fn.wait_for_waiter("/v1/node/")    # until a client blocks on a node's allocations
        fn.requests()

Every wait is bounded; stop() (or leaving the with block) kills the process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_PY = Path(__file__).resolve().parent / "server.py"

# Never send loopback traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def port_range(prefix: str, first: int, count: int, *, to=0) -> list:
    """Static ports labelled <prefix>0..<prefix>N-1 on first..first+count-1 (a reserved range)."""
    return [{"label": f"{prefix}{i}", "value": first + i, "to": to} for i in range(count)]


class FakeNomad:
    def __init__(self, workdir=None, *, acl=False, management_tokens=(), region="global",
                 datacenter="dc1", node_id=None, node_name="fake-node", node_ip="127.0.0.1",
                 log_requests=False, python=sys.executable, host="127.0.0.1", port=0,
                 tls_cert=None, tls_key=None, tls_client_ca=None):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fake-nomad-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.workdir / "fake-nomad.url"
        self.log_path = self.workdir / "fake-nomad.log"
        args = [python, str(SERVER_PY), "--listen", f"{host}:{port}", "--ready-file", str(self.ready_file),
                "--region", region, "--datacenter", datacenter, "--node-name", node_name,
                "--node-ip", node_ip]
        if node_id:
            args += ["--node-id", node_id]
        if acl:
            args.append("--acl")
        for t in management_tokens:
            args += ["--management-token", t]
        if log_requests:
            args.append("--log-requests")
        if tls_cert:
            args += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        if tls_client_ca:
            args += ["--tls-client-ca", str(tls_client_ca)]
        self.args = args
        self.proc = None
        self.url = None
        self.control_url = None
        self.node_id = None

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout=20.0):
        if self.ready_file.exists():
            self.ready_file.unlink()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake_nomad exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready_file.exists():
                lines = self.ready_file.read_text().split()
                if len(lines) == 2:
                    self.url, self.control_url = lines
                    self.node_id = self.state()["agent_node_id"]
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake_nomad not ready within {timeout}s: {self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- control API ----------------------------------------------------------

    def control(self, method, path, body=None, timeout=10.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.control_url}/_control/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"control {method} {path} -> {e.code}: {e.read()!r}") from None

    def state(self):
        return self.control("GET", "state")

    def run_alloc(self, job, group, task, node=None, *, meta=None, group_meta=None, task_meta=None,
                  tasks=None, ip="127.0.0.1", ports=None, dynamic_ports=None, mode="host",
                  address=None, namespace="default", status="running", index=0, alloc_id=None,
                  job_type="service"):
        """Place an allocation of job/group on node (default: the agent's node) and report it
        running. meta is the job's meta, group_meta the group's, task_meta {task: meta} (or a
        dict of strings for the single task). ports: static (reserved) ports, [{"label",
        "value", "to"}] or {label: value}; dynamic_ports likewise. mode "bridge" needs address
        (the alloc's own IP, NetworkStatus.Address); ip is the host IP the ports are on."""
        tasks = list(tasks or [task])
        if task_meta and all(isinstance(v, str) for v in task_meta.values()):
            task_meta = {task: task_meta}
        network = None
        if ports is not None or dynamic_ports is not None or mode == "bridge":
            network = {"mode": mode, "ip": ip, "reserved": _ports(ports), "dynamic": _ports(dynamic_ports)}
            if address is not None:
                network["address"] = address
        spec = {"job": job, "group": group, "tasks": tasks, "node_id": node or self.node_id,
                "namespace": namespace, "client_status": status, "index": index, "job_type": job_type,
                "meta": {"job": meta, "group": group_meta, "tasks": task_meta or {}}, "network": network}
        if alloc_id:
            spec["id"] = alloc_id
        return self.control("POST", "allocs", spec)

    def update_alloc(self, alloc_id, **fields):
        """fields: client_status, task_states {task: state}, desired_status, meta, network."""
        return self.control("POST", f"allocs/{alloc_id}", fields)

    def set_client_status(self, alloc_id, status):
        """pending | running | complete | failed (tasks follow: pending/running/dead); lost."""
        if status == "lost":
            return self.control("POST", f"allocs/{alloc_id}/lost", {})
        return self.update_alloc(alloc_id, client_status=status)

    def set_task_state(self, alloc_id, task, state):
        """One task's State (pending | running | dead); ClientStatus stays."""
        return self.update_alloc(alloc_id, task_states={task: state})

    def set_meta(self, alloc_id, meta=None, group_meta=None, task_meta=None):
        """An in-place job update: new meta, Job.Version + 1, same allocation."""
        return self.update_alloc(alloc_id, meta={"job": meta, "group": group_meta, "tasks": task_meta or {}})

    def stop_alloc(self, alloc_id, client_status="complete"):
        return self.control("POST", f"allocs/{alloc_id}/stop", {"client_status": client_status})

    def gc_alloc(self, alloc_id):
        return self.control("DELETE", f"allocs/{alloc_id}")

    def add_node(self, name, ip="127.0.0.1", node_id=None, status="ready"):
        return self.control("POST", "nodes", {"name": name, "ip": ip, "id": node_id, "status": status})

    def add_namespace(self, name):
        return self.control("POST", "namespaces", {"name": name})

    def add_token(self, secret, policy=None, type="client"):
        """policy: {"node": "read", "agent": "read", "namespaces": {"default": "read"}}."""
        return self.control("POST", "acl/tokens", {"secret": secret, "type": type, "policy": policy or {}})

    def agent_down(self):
        """The agent process is gone: connections refused, in-flight requests cut."""
        return self.control("POST", "agent", {"mode": "down"})

    def agent_up(self):
        return self.control("POST", "agent", {"mode": "up"})

    def servers_lost(self):
        """The agent lives but reaches no server: RPC-backed endpoints answer 500 "no servers"."""
        return self.control("POST", "agent", {"mode": "no-servers"})

    def set_latency(self, seconds, path_prefix="/"):
        return self.control("POST", "latency", {"seconds": seconds, "path_prefix": path_prefix})

    def requests(self, path_prefix=""):
        return [r for r in self.control("GET", "requests")["requests"] if r["path"].startswith(path_prefix)]

    def clear_requests(self):
        return self.control("DELETE", "requests")

    def waiters(self):
        return self.control("GET", "waiters")

    def wait_for_waiter(self, path_prefix, timeout=10.0):
        """Until a blocking query on a path under path_prefix is parked."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.startswith(path_prefix) for p in self.waiters()):
                return
            time.sleep(0.02)
        raise TimeoutError(f"no blocking query under {path_prefix} within {timeout}s")


def _ports(ports):
    if ports is None:
        return []
    if isinstance(ports, dict):
        return [{"label": k, "value": v, "to": 0} for k, v in ports.items()]
    return [dict(p) for p in ports]
