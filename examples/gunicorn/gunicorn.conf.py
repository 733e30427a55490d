"""gunicorn config: one Prometheus metrics server per worker process.

Each worker starts its own metrics HTTP server on the FIRST FREE port of a
declared range, so every worker is its own scrape target. workersd probes the
range and publishes the live ports (to Consul and to its Prometheus HTTP SD
endpoint).

The server is started in the `post_worker_init` hook: in the worker process
(after fork, so each worker has its own server and registry) and after the
app is loaded. Starting it earlier, in `post_fork`, opens the port before the
app module has registered its metrics: a scrape in that window gets a
registry without them, and the worker's series blink out.

Environment:
  WORKER_METRICS_PORTS  port range, "FIRST-LAST" or a single port
                        (default "9011-9020"). Declare the same range to
                        workersd. Make it at least as large as the largest
                        worker count you scale to (TTIN) plus one for
                        --max-requests / timeout recycling overlap.
  WORKER_METRICS_ADDR   address the metrics servers listen on (default: the
                        host of gunicorn's first TCP --bind address, or
                        127.0.0.1 when gunicorn only binds unix sockets).

Ports are claimed by bind(): the kernel hands each port to one process only,
so concurrently booting workers never share a port, and a port is free again
as soon as its worker exits (TTOU, --max-requests, crash, timeout kill). A
new worker takes the lowest free port, so the live set stays compact.

If every port of the range is taken the worker logs an ERROR and keeps serving
requests, but its metrics are not exposed (it is not killed: gunicorn would
respawn it into the same situation).

Run it (from this folder):
  gunicorn -c gunicorn.conf.py --bind 127.0.0.2:8000 --workers 4 app:app
"""

import errno
import os
import socket
import threading
from socketserver import TCPServer, ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gunicorn.util import parse_address
from prometheus_client import make_wsgi_app

# Sync workers: one request at a time per process, the classic pre-fork model.
worker_class = "sync"

DEFAULT_PORTS = "9011-9020"


def parse_port_range(spec):
    """'9011-9020' -> (9011, 9020); '9011' -> (9011, 9011)."""
    text = spec.strip()
    first, sep, last = text.partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(
            f"WORKER_METRICS_PORTS={spec!r}: expected FIRST-LAST, e.g. 9011-9020"
        ) from None
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"WORKER_METRICS_PORTS={spec!r}: need 1 <= FIRST <= LAST <= 65535")
    return lo, hi


# Parsed when gunicorn loads this file, so a bad value stops gunicorn at once.
PORT_FIRST, PORT_LAST = parse_port_range(os.environ.get("WORKER_METRICS_PORTS", DEFAULT_PORTS))
PORT_COUNT = PORT_LAST - PORT_FIRST + 1


def metrics_addr(cfg):
    """WORKER_METRICS_ADDR, else the host of the first TCP bind address."""
    addr = os.environ.get("WORKER_METRICS_ADDR", "").strip()
    if addr:
        return addr
    for bind_addr in cfg.bind:
        parsed = parse_address(bind_addr)
        if isinstance(parsed, tuple):  # (host, port); unix sockets/fds are not
            return parsed[0] or "0.0.0.0"
    return "127.0.0.1"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # no access log line per scrape
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # SO_REUSEADDR: a port whose last scrape connections are in TIME_WAIT can
    # be taken at once by the next worker. NEVER SO_REUSEPORT: it would let two
    # workers bind the same port, which is exactly what must not happen.
    allow_reuse_address = True
    allow_reuse_port = False

    def server_bind(self):
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup
        # that can stall a worker's boot; the name is never used here.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


def start_metrics_server(addr, port):
    """Bind addr:port and serve this process's default registry. Raises OSError."""
    server_class = _MetricsServer6 if ":" in addr else _MetricsServer
    httpd = make_server(addr, port, make_wsgi_app(), server_class, _QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics-{port}", daemon=True)
    thread.start()
    return httpd


def on_starting(server):
    addr = metrics_addr(server.cfg)
    server.log.info(
        "worker metrics: each worker serves /metrics on the first free port of %s:%d-%d",
        addr,
        PORT_FIRST,
        PORT_LAST,
    )
    if server.cfg.workers > PORT_COUNT:
        server.log.error(
            "worker metrics: %d workers but only %d ports in %d-%d: some workers "
            "will have no metrics (raise WORKER_METRICS_PORTS)",
            server.cfg.workers,
            PORT_COUNT,
            PORT_FIRST,
            PORT_LAST,
        )


def nworkers_changed(server, new_value, old_value):
    # Called at start (old_value None, on_starting warns then) and on TTIN/TTOU.
    if old_value is not None and new_value > PORT_COUNT:
        server.log.error(
            "worker metrics: scaling to %d workers but only %d ports in %d-%d",
            new_value,
            PORT_COUNT,
            PORT_FIRST,
            PORT_LAST,
        )


def post_worker_init(worker):
    addr = metrics_addr(worker.cfg)
    pid = os.getpid()
    last_error = None
    for port in range(PORT_FIRST, PORT_LAST + 1):
        try:
            worker.metrics_server = start_metrics_server(addr, port)
        except OSError as exc:
            last_error = exc
            if exc.errno == errno.EADDRINUSE:  # another worker has it: next
                continue
            break  # bad address, permission denied...: every port would fail
        worker.log.info(
            "worker metrics: pid=%d listening on http://%s:%d/metrics",
            pid,
            f"[{addr}]" if ":" in addr else addr,
            port,
        )
        return
    worker.log.error(
        "worker metrics: pid=%d got NO metrics port in %s:%d-%d (%s); this worker "
        "serves requests but its metrics will not be scraped. Widen "
        "WORKER_METRICS_PORTS or run fewer workers.",
        pid,
        addr,
        PORT_FIRST,
        PORT_LAST,
        last_error,
    )
