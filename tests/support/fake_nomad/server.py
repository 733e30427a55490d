#!/usr/bin/env python3
"""Fake Nomad client agent HTTP API for tests (see CONTRACT.md).

    python3 tests/support/fake_nomad/server.py --listen 127.0.0.1:0 --ready-file /tmp/fn.url

The ready file gets two lines once listening: the API URL (NOMAD_ADDR) and the control URL.
The API listener can be taken down (connections refused) and brought back on the same port;
the control listener stays up.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from api import CUT, Api  # noqa: E402
from shapes import alloc_json  # noqa: E402
from state import NotFound, Store  # noqa: E402


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, app):
        self.app = app
        self.conns: set = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-nomad"

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            # The TLS handshake runs here, on the connection's thread, not in the accept loop.
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self):
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args):
        if self.server.app.log_requests:
            sys.stderr.write("fake_nomad: " + (fmt % args) + "\n")

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _dispatch(self):
        self.server.app.dispatch(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class App:
    def __init__(self, args):
        self.store = Store(region=args.region, datacenter=args.datacenter, node_id=args.node_id,
                           node_name=args.node_name, node_ip=args.node_ip)
        for secret in args.management_token:
            self.store.tokens[secret] = {"type": "management", "policy": {}}
        self.api = Api(self.store, acl_enabled=args.acl)
        self.log_requests = args.log_requests
        self.host = args.host
        self.port = args.port
        self.api_server = None
        self.api_thread = None
        self.tls = None
        if args.tls_cert:
            # tls { http = true } (and verify_https_client with a client CA): TLS 1.2 at least,
            # a client certificate signed by the CA required (helper/tlsutil/config.go).
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls.load_cert_chain(args.tls_cert, args.tls_key)
            if args.tls_client_ca:
                self.tls.verify_mode = ssl.CERT_REQUIRED
                self.tls.load_verify_locations(args.tls_client_ca)
        self.lifecycle = threading.Lock()

    # -- API listener -------------------------------------------------------------

    def start_api(self):
        self.api_server = _Server((self.host, self.port), _Handler, self)
        if self.tls is not None:
            self.api_server.socket = self.tls.wrap_socket(self.api_server.socket, server_side=True,
                                                          do_handshake_on_connect=False)
        self.port = self.api_server.server_address[1]
        self.api_thread = threading.Thread(target=self.api_server.serve_forever, daemon=True)
        self.api_thread.start()

    def stop_api(self):
        srv, self.api_server = self.api_server, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        # A dead agent's open connections (idle keep-alives included) go with it.
        with srv.conns_lock:
            conns = list(srv.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_mode(self, mode):
        with self.lifecycle:
            s = self.store
            with s.cond:
                old, s.mode = s.mode, mode
                if mode != "up":
                    s.generation += 1  # in-flight blocking queries end (cut or "no servers")
                s.cond.notify_all()
            if mode == "down" and old != "down":
                self.stop_api()
            elif mode != "down" and old == "down":
                self.start_api()

    # -- dispatch -------------------------------------------------------------------

    def dispatch(self, h):
        url = urlsplit(h.path)
        path = url.path
        if path.startswith("/_control/"):
            return self.control(h, path, url.query)
        start = time.monotonic()
        for prefix, secs in list(self.store.latency.items()):
            if path.startswith(prefix) and secs > 0:
                time.sleep(secs)
                break
        h._body()
        result = self.api.handle(h.command, path, url.query, h.headers)
        rec = {"method": h.command, "path": path, "query": url.query,
               "token": bool(h.headers.get("X-Nomad-Token") or h.headers.get("Authorization")),
               "start": time.time() - (time.monotonic() - start)}
        if result is CUT:
            rec.update(status=0, duration=time.monotonic() - start)
            self._record(rec)
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        status, headers, body = result
        rec.update(status=status, duration=time.monotonic() - start)
        self._record(rec)
        # handlers.CompressHandler wraps the whole mux (command/agent/http.go NewHTTPServers):
        # Vary always, the body compressed when the client lists gzip or deflate.
        headers = dict(headers, Vary="Accept-Encoding")
        encoding = _pick_encoding(h.headers.get("Accept-Encoding", ""))
        if encoding:
            headers["Content-Encoding"] = encoding
            body = _compress(encoding, body)
        h._send(status, headers, body)

    def _record(self, rec):
        with self.store.cond:
            self.store.requests.append(rec)

    # -- control ----------------------------------------------------------------------

    def control(self, h, path, query):
        raw = h._body()
        try:
            body = json.loads(raw) if raw else {}
            code, obj = self._control(h.command, path[len("/_control/"):].strip("/").split("/"), body)
        except NotFound as e:
            code, obj = 404, {"error": str(e)}
        except (KeyError, ValueError, TypeError) as e:
            code, obj = 400, {"error": f"{type(e).__name__}: {e}"}
        h._send(code, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _alloc_out(self, a):
        with self.store.cond:
            return alloc_json(a, self.store.node_name(a["node_id"]))

    def _control(self, method, parts, body):
        s = self.store
        head = parts[0]
        if head == "state" and method == "GET":
            with s.cond:
                return 200, {"index": s.index, "tables": dict(s.table), "agent_node_id": s.agent_node_id,
                             "mode": s.mode, "allocs": sorted(s.allocs), "nodes": sorted(s.nodes),
                             "namespaces": sorted(s.namespaces)}
        if head == "allocs":
            if len(parts) == 1 and method == "POST":
                return 200, self._alloc_out(s.add_alloc(body))
            alloc_id = parts[1]
            action = parts[2] if len(parts) > 2 else ""
            if method == "DELETE" and not action:
                s.gc_alloc(alloc_id)
                return 200, {}
            if method == "POST" and action == "stop":
                return 200, self._alloc_out(s.stop_alloc(alloc_id, body.get("client_status", "complete")))
            if method == "POST" and action == "lost":
                return 200, self._alloc_out(s.lose_alloc(alloc_id))
            if method == "POST" and not action and body.get("client_status") == "lost":
                return 200, self._alloc_out(s.lose_alloc(alloc_id))
            if method == "POST" and not action:
                a = s.update_alloc(alloc_id, client_status=body.get("client_status"),
                                   task_states=body.get("task_states"),
                                   desired_status=body.get("desired_status"), meta=body.get("meta"),
                                   network=body.get("network"),
                                   client_description=body.get("client_description"))
                return 200, self._alloc_out(a)
        if head == "nodes" and method == "POST":
            return 200, s.add_node(body.get("id") or str(uuid.uuid4()), body["name"], body.get("ip", "127.0.0.1"),
                                   datacenter=body.get("datacenter"), status=body.get("status", "ready"),
                                   meta=body.get("meta"))
        if head == "namespaces" and method == "POST":
            with s.cond:
                s.namespaces.add(body["name"])
            return 200, {}
        if head == "acl" and parts[1:] == ["tokens"] and method == "POST":
            with s.cond:
                s.tokens[body.get("secret", "")] = {"type": body.get("type", "client"),
                                                   "policy": body.get("policy") or {}}
            return 200, {}
        if head == "agent" and method == "POST":
            mode = body["mode"]
            if mode not in ("up", "no-servers", "down"):
                raise ValueError(f"mode must be up, no-servers or down, not {mode!r}")
            self.set_mode(mode)
            return 200, {"mode": mode}
        if head == "latency" and method == "POST":
            with s.cond:
                if float(body.get("seconds", 0)) > 0:
                    s.latency[body.get("path_prefix", "/")] = float(body["seconds"])
                else:
                    s.latency.pop(body.get("path_prefix", "/"), None)
            return 200, dict(s.latency)
        if head == "requests":
            with s.cond:
                if method == "DELETE":
                    s.requests.clear()
                    return 200, {}
                return 200, {"requests": list(s.requests)}
        if head == "waiters" and method == "GET":
            with s.cond:
                return 200, {k: v for k, v in s.waiters.items() if v}
        return 404, {"error": f"no control route {method} /_control/{'/'.join(parts)}"}


def _pick_encoding(accept_encoding: str):
    """gorilla/handlers CompressHandler: the first of the listed tokens that is exactly "gzip"
    or "deflate" (no q-values parsed)."""
    for part in accept_encoding.split(","):
        token = part.strip()
        if token in ("gzip", "deflate"):
            return token
    return None


def _compress(encoding, body):
    if encoding == "gzip":
        return gzip.compress(body)
    c = zlib.compressobj(wbits=-15)  # compress/flate: raw deflate
    return c.compress(body) + c.flush()


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fake_nomad", description="Fake Nomad client agent HTTP API (see CONTRACT.md)")
    p.add_argument("--listen", default="127.0.0.1:0", help="API HOST:PORT (loopback; port 0 picks a free one)")
    p.add_argument("--control-listen", default=None, help="control HOST:PORT (default: same host, free port)")
    p.add_argument("--ready-file", help="write '<api url>\\n<control url>\\n' here once listening")
    p.add_argument("--region", default="global")
    p.add_argument("--datacenter", default="dc1")
    p.add_argument("--node-id", default=None, help="the agent's own node ID (default: a random UUID)")
    p.add_argument("--node-name", default="fake-node")
    p.add_argument("--node-ip", default="127.0.0.1")
    p.add_argument("--acl", action="store_true", help="enable ACLs (tokens via --management-token, /_control/acl/tokens)")
    p.add_argument("--management-token", action="append", default=[], help="a management token's secret (repeatable)")
    p.add_argument("--tls-cert", help="serve the API over HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", help="verify_https_client: require client certificates signed by this CA")
    p.add_argument("--log-requests", action="store_true", help="access log on stderr")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    args.host, args.port = host or "127.0.0.1", int(port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.host.startswith("127."):
        p.error("--listen must be a loopback address")

    app = App(args)
    app.start_api()
    chost, _, cport = (args.control_listen or f"{args.host}:0").rpartition(":")
    control = _Server((chost, int(cport)), _Handler, app)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    api_url = f"{'https' if app.tls else 'http'}://{args.host}:{app.port}"
    control_url = f"http://{chost}:{control.server_address[1]}"
    if args.ready_file:
        _write_atomic(args.ready_file, f"{api_url}\n{control_url}\n")
    print(f"fake_nomad listening on {api_url} (control {control_url})", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    app.set_mode("down")
    control.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
