"""The Nomad HTTP API routes the fake agent serves (command/agent/*_endpoint.go; see CONTRACT.md).

handle() returns (status, headers, body bytes) or CUT (the agent died under the request:
the connection is closed without an answer).
"""

from __future__ import annotations

import json
import random
import re
import time
from urllib.parse import parse_qs

from acl import TokenNotFound, resolve
from shapes import alloc_json, alloc_stub_json, node_json, node_stub_json

CUT = object()
PLAIN = "text/plain; charset=utf-8"
# nomad/structs/structs.go: MaxBlockingRPCQueryTime and DefaultBlockingRPCQueryTime, JitterFraction.
MAX_BLOCK = 300.0
DEFAULT_BLOCK = 300.0
JITTER_FRACTION = 16
_DUR = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class HttpError(Exception):
    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code
        self.msg = msg


def parse_go_duration(s: str) -> float:
    """time.ParseDuration: "300ms", "1m30s", "0"; a number without a unit is an error."""
    sign = 1.0
    if s[:1] in "+-":
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty")
    pos, total = 0, 0.0
    for m in _DUR.finditer(s):
        if m.start() != pos:
            raise ValueError(s)
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(s)
    return sign * total


def parse_go_bool(field, s):
    """strconv.ParseBool, with parseBool's error text (command/agent/http.go)."""
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise HttpError(500, f'Failed to parse value of "{field}" ({s}) as a bool: '
                         f'strconv.ParseBool: parsing "{s}": invalid syntax')


class Query:
    def __init__(self, raw_query: str, headers):
        q = parse_qs(raw_query, keep_blank_values=True)
        self.q = {k: v[0] for k, v in q.items()}
        self.token = parse_token(headers)
        self.min_index = 0
        self.wait = 0.0
        # parse() order (command/agent/http.go): stale, then per_page, then wait and index.
        if self.q.get("stale"):
            try:
                parse_go_bool("stale", self.q["stale"])
            except HttpError:
                raise HttpError(400, "Expect `true` or `false` for `stale` query string parameter") from None
        if self.q.get("per_page"):
            try:
                int(self.q["per_page"])
            except ValueError:
                raise HttpError(400, "Expect a number for `per_page` query string parameter") from None
        # parseWait (command/agent/http.go): wait first, then index; both 400 on a bad value.
        if self.q.get("wait"):
            try:
                self.wait = parse_go_duration(self.q["wait"])
            except ValueError:
                raise HttpError(400, "Invalid wait time") from None
        if self.q.get("index"):
            try:
                self.min_index = int(self.q["index"])
                if self.min_index < 0 or self.min_index >= 2**64:
                    raise ValueError
            except ValueError:
                raise HttpError(400, "Invalid index") from None

    def get(self, k, default=""):
        return self.q.get(k) or default


def parse_token(headers) -> str:
    """parseToken: X-Nomad-Token wins; else "Authorization: Bearer <token>" (scheme case-insensitive)."""
    tok = headers.get("X-Nomad-Token")
    if tok:
        return tok.strip()
    auth = headers.get("Authorization") or ""
    parts = auth.split(" ")
    if len(parts) > 1 and parts[0].lower() == "bearer":
        return " ".join(parts[1:]).strip().split(" ")[0].strip()
    return ""


def time_to_block(wait: float) -> float:
    """QueryOptions.TimeToBlock plus blockingRPC's jitter (up to a sixteenth more)."""
    t = MAX_BLOCK if wait > MAX_BLOCK else (DEFAULT_BLOCK if wait <= 0 else wait)
    return t + random.uniform(0, t / JITTER_FRACTION)


class Api:
    def __init__(self, store, *, acl_enabled=False):
        self.s = store
        self.acl_enabled = acl_enabled

    # -- helpers ----------------------------------------------------------------

    def _json(self, obj, index=None):
        headers = {"Content-Type": "application/json"}
        if index is not None:
            # setMeta: the agent asks its servers, the leader answers (LastContact 0).
            headers.update({"X-Nomad-Index": str(index), "X-Nomad-LastContact": "0",
                            "X-Nomad-KnownLeader": "true"})
        return 200, headers, json.dumps(obj).encode()

    def _rpc_checks(self, q):
        """What every server RPC meets first: servers reachable, then the region (forward)."""
        if self.s.mode == "no-servers":
            raise HttpError(500, "no servers")
        region = q.get("region")
        if region and region != self.s.region:
            raise HttpError(500, "No path to region")

    def _server_acl(self, q):
        """Server-side Authenticate + ResolveACL: a bogus token is "Permission denied"."""
        if not self.acl_enabled:
            return None
        try:
            return resolve(self.s.tokens, q.token)
        except TokenNotFound:
            raise HttpError(403, "Permission denied") from None

    def _block(self, q, path, compute):
        """blockingRPC: answer at once unless index > 0; else re-run on each change until the
        answer's index passes q.min_index or the (jittered) wait ends, then answer anyway."""
        s = self.s
        with s.cond:
            gen = s.generation
            obj, index = compute()
            if q.min_index == 0 or index > q.min_index:
                return obj, index
            deadline = time.monotonic() + time_to_block(q.wait)
            s.waiters[path] = s.waiters.get(path, 0) + 1
            try:
                while index <= q.min_index:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    s.cond.wait(left)
                    if s.generation != gen:
                        if s.mode == "down":
                            return CUT, 0
                        raise HttpError(500, "no servers")
                    obj, index = compute()
            finally:
                s.waiters[path] -= 1
        return obj, index

    # -- routing ----------------------------------------------------------------

    def handle(self, method, path, raw_query, headers):
        try:
            return self._route(method, path, raw_query, headers)
        except HttpError as e:
            return e.code, {"Content-Type": PLAIN}, e.msg.encode()

    def _route(self, method, path, raw_query, headers):
        route = self._match(path)
        if route is None:
            if path == "/":
                return 307, {"Location": "/ui/" + (f"?{raw_query}" if raw_query else "")}, b""
            # handleRootFallthrough: a bare 404, no body.
            return 404, {}, b""
        fn, args = route
        # Every endpoint here is GET only; the method is checked before the query is parsed.
        if method != "GET":
            raise HttpError(405, "Invalid method")
        return fn(Query(raw_query, headers), *args, path)

    def _match(self, path):
        if path == "/v1/agent/self":
            return self.agent_self, ()
        if path == "/v1/status/leader":
            return self.status_leader, ()
        if path == "/v1/nodes":
            return self.nodes, ()
        if path.startswith("/v1/node/"):
            rest = path[len("/v1/node/"):]
            if rest.endswith("/allocations"):
                return self.node_allocations, (rest[:-len("/allocations")],)
            return self.node_get, (rest,)
        if path == "/v1/allocations":
            return self.allocations, ()
        if path.startswith("/v1/allocation/"):
            tokens = path[len("/v1/allocation/"):].split("/")
            if len(tokens) == 1:
                return self.allocation_get, (tokens[0],)
            return self._not_found, ()
        return None

    def _not_found(self, q, path):
        # AllocSpecificRequest: an unknown action under /v1/allocation/:id.
        raise HttpError(404, "resource not found")

    # -- endpoints ----------------------------------------------------------------

    def agent_self(self, q, path):
        if self.acl_enabled:
            # The client agent resolves the token itself (client/acl.go), through a server RPC.
            if self.s.mode == "no-servers":
                raise HttpError(500, "failed to resolve ACL token: no servers")
            try:
                acl = resolve(self.s.tokens, q.token)
            except TokenNotFound:
                raise HttpError(403, "ACL token not found") from None
            if not acl.allow_agent_read():
                raise HttpError(403, "Permission denied")
        s = self.s
        with s.cond:
            node = s.nodes[s.agent_node_id]
            n_allocs = sum(1 for a in s.allocs.values() if a["node_id"] == s.agent_node_id)
            known = "" if s.mode == "no-servers" else "127.0.0.1:4647"
            body = {
                "config": {
                    "Region": s.region, "Datacenter": s.datacenter, "NodeName": node["name"],
                    "DataDir": "/var/lib/nomad", "LogLevel": "INFO", "BindAddr": "127.0.0.1",
                    "EnableDebug": False, "Ports": {"HTTP": 4646, "RPC": 4647, "Serf": 4648},
                    "Addresses": {"HTTP": "127.0.0.1", "RPC": "127.0.0.1", "Serf": "127.0.0.1"},
                    "Server": {"Enabled": False},
                    "Client": {"Enabled": True, "Servers": ["127.0.0.1:4647"], "NodeClass": "",
                               "NodePool": "default", "Meta": dict(node.get("meta") or {})},
                    "ACL": {"Enabled": self.acl_enabled, "TokenTTL": 30000000000,
                            "PolicyTTL": 30000000000, "RoleTTL": 30000000000, "ReplicationToken": ""},
                    "Version": {"Version": node["version"], "VersionPrerelease": "", "VersionMetadata": "",
                                "Revision": ""},
                },
                # A client-only agent has no serf member (agent_endpoint.go): a zero Member.
                "member": {"Name": "", "Addr": None, "Port": 0, "Tags": None, "Status": "none",
                           "ProtocolMin": 0, "ProtocolMax": 0, "ProtocolCur": 0,
                           "DelegateMin": 0, "DelegateMax": 0, "DelegateCur": 0},
                "stats": {
                    # client.Stats() (client/client.go): the node ID lives here and only here.
                    "client": {"node_id": s.agent_node_id, "known_servers": known,
                               "num_allocations": str(n_allocs), "last_heartbeat": "1.5s",
                               "heartbeat_ttl": "15s"},
                    "runtime": {"arch": "amd64", "version": "go1.22", "max_procs": "2",
                                "goroutines": "100", "cpu_count": "2", "kernel.name": "linux"},
                },
            }
        return self._json(body)

    def status_leader(self, q, path):
        self._rpc_checks(q)
        return self._json("127.0.0.1:4647")

    def nodes(self, q, path):
        self._rpc_checks(q)
        acl = self._server_acl(q)
        if acl is not None and not acl.allow_node_read():
            raise HttpError(403, "Permission denied")
        prefix = q.get("prefix")

        def compute():
            out = [node_stub_json(n) for n in sorted(self.s.nodes.values(), key=lambda n: n["id"])
                   if n["id"].startswith(prefix)]
            return out, self.s.table["nodes"]
        obj, index = self._block(q, path, compute)
        return CUT if obj is CUT else self._json(obj, index)

    def node_get(self, q, node_id, path):
        self._rpc_checks(q)
        acl = self._server_acl(q)
        if acl is not None and not acl.allow_node_read():
            raise HttpError(403, "Permission denied")
        if node_id == "":
            raise HttpError(500, "missing node ID")

        def compute():
            n = self.s.nodes.get(node_id)
            return (node_json(n), n["modify_index"]) if n else (None, self.s.table["nodes"])
        obj, index = self._block(q, path, compute)
        if obj is CUT:
            return CUT
        if obj is None:
            raise HttpError(404, "node not found")
        return self._json(obj, index)

    def node_allocations(self, q, node_id, path):
        self._rpc_checks(q)
        acl = self._server_acl(q)
        if acl is not None and not acl.allow_node_read():
            raise HttpError(403, "Permission denied")
        if node_id == "":
            raise HttpError(500, "missing node ID")

        def compute():
            allocs, index = self.s.node_allocs(node_id)
            # Node.GetAllocs: every namespace; allocs of a namespace without read-job are left
            # out, but their ModifyIndex still counts in the index.
            out = [alloc_json(a, self.s.node_name(a["node_id"])) for a in allocs
                   if acl is None or acl.allow_ns_op(a["namespace"], "read-job")]
            return out, index
        obj, index = self._block(q, path, compute)
        return CUT if obj is CUT else self._json(obj, index)

    def allocations(self, q, path):
        resources = parse_go_bool("resources", q.get("resources")) if q.get("resources") else False
        task_states = parse_go_bool("task_states", q.get("task_states")) if q.get("task_states") else True
        self._rpc_checks(q)
        ns = q.get("namespace", "default")
        acl = self._server_acl(q)
        if acl is not None and not acl.allow_ns_op(ns, "read-job"):
            raise HttpError(403, "Permission denied")
        prefix = q.get("prefix")

        def compute():
            allocs = [a for a in self.s.allocs.values()
                      if (ns == "*" or a["namespace"] == ns) and a["id"].startswith(prefix)
                      and (acl is None or acl.allow_ns_op(a["namespace"], "read-job"))]
            allocs.sort(key=(lambda a: a["id"]) if prefix else (lambda a: (a["create_index"], a["id"])))
            out = [alloc_stub_json(a, self.s.node_name(a["node_id"]), resources=resources,
                                   task_states=task_states) for a in allocs]
            return out, self.s.table["allocs"]
        obj, index = self._block(q, path, compute)
        return CUT if obj is CUT else self._json(obj, index)

    def allocation_get(self, q, alloc_id, path):
        self._rpc_checks(q)
        acl = self._server_acl(q)

        def compute():
            a = self.s.allocs.get(alloc_id)
            if a is None:
                return None, self.s.table["allocs"]
            if acl is not None and not acl.allow_ns_op(a["namespace"], "read-job"):
                # Alloc.GetAlloc: NewErrUnknownAllocation, which the agent answers with a 500.
                raise HttpError(500, f'Unknown allocation "{alloc_id}"')
            return alloc_json(a, self.s.node_name(a["node_id"])), a["modify_index"]
        obj, index = self._block(q, path, compute)
        if obj is CUT:
            return CUT
        if obj is None:
            raise HttpError(404, "alloc not found")
        return self._json(obj, index)
