"""The example app (examples/gunicorn) under gunicorn: one "pod" per loopback address."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .files import REPO_ROOT
from .net import free_port, free_port_range, http_get, http_ok, parse_metric, port_is_listening
from .processes import ProcessManager, Runner, safe_check
from .waits import START_TIMEOUT, STOP_TIMEOUT, WAIT_TIMEOUT, wait_until

EXAMPLE_DIR = REPO_ROOT / "examples" / "gunicorn"


_PORT_LOG_RE = re.compile(
    r"worker metrics: pid=(\d+) listening on http://\[?([^\]\s]+?)\]?:(\d+)/metrics"
)
_NO_PORT_LOG_RE = re.compile(r"worker metrics: pid=(\d+) got NO metrics port")


def _gunicorn_supports(setting: str) -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(s.name == setting for s in KNOWN_SETTINGS)


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is pid (from /proc), excluding zombies."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces/parens
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2 and rest[0] != "Z" and int(rest[1]) == pid:
            kids.append(int(entry.name))
    return sorted(kids)


class Gunicorn(Runner):
    """The example app (examples/gunicorn) under gunicorn, one "pod" per address.

    Gunicorn(procs, address="127.0.0.2", app_port=None, metrics_ports=None,
             workers=4, extra_args=(), env=None, work_seconds=None)

    app_port None -> a free port on `address`. metrics_ports: (first, last),
    "first-last" or None -> a free 10-port range (19011-19020 if free).
    Waits on start() until the app answers and min(workers, range) metrics
    ports listen.
    """

    name = "gunicorn"
    env_remove_prefixes = ("WORKER_METRICS_", "APP_", "GUNICORN_CMD_ARGS")

    def __init__(
        self,
        procs: ProcessManager,
        address: str = "127.0.0.2",
        app_port: int | None = None,
        metrics_ports: tuple[int, int] | str | None = None,
        workers: int = 4,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        work_seconds: float | None = None,
    ):
        super().__init__(procs)
        self.address = address
        self.app_port = app_port or free_port(address)
        if metrics_ports is None:
            metrics_ports = free_port_range(address, 10)
        elif isinstance(metrics_ports, str):
            first, _, last = metrics_ports.partition("-")
            metrics_ports = (int(first), int(last or first))
        self.metrics_first, self.metrics_last = metrics_ports
        self.workers = workers
        self.extra_args = list(extra_args)
        self.env = {
            "WORKER_METRICS_ADDR": address,
            "WORKER_METRICS_PORTS": f"{self.metrics_first}-{self.metrics_last}",
            "PYTHONUNBUFFERED": "1",
        }
        if work_seconds is not None:
            self.env["APP_WORK_SECONDS"] = str(work_seconds)
        if env:
            self.env.update(env)

    # -- lifecycle ---------------------------------------------------------

    @property
    def metrics_port_range(self) -> range:
        return range(self.metrics_first, self.metrics_last + 1)

    @property
    def app_url(self) -> str:
        return f"http://{self.address}:{self.app_port}"

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(EXAMPLE_DIR / "gunicorn.conf.py"),
            "--chdir",
            str(EXAMPLE_DIR),
            "--bind",
            f"{self.address}:{self.app_port}",
            "--workers",
            str(self.workers),
            "--graceful-timeout",
            "5",
        ]
        if _gunicorn_supports("control_socket"):
            # gunicorn >= 27: default socket path is shared by all instances
            argv += ["--control-socket", str(self.procs.path(f"{self.name}-{self.app_port}.ctl"))]
        return argv + self.extra_args + ["app:app"]

    def start(self, timeout: float = START_TIMEOUT, wait_ports: int | None = None) -> "Gunicorn":
        self._launch(self.argv(), env=self.env)
        # /metrics on the app port is not counted by the app's Summary.
        self._wait_ready(
            safe_check(lambda: http_ok(f"{self.app_url}/metrics")),
            f"gunicorn app on {self.app_url}",
            timeout,
        )
        n = min(self.workers, len(self.metrics_port_range)) if wait_ports is None else wait_ports
        if n:
            self.wait_for_metrics_ports(
                lambda ports: len(ports) >= n, timeout=timeout, what=f">= {n} metrics ports"
            )
        return self

    def stop(self, timeout: float = STOP_TIMEOUT):
        return super().stop(timeout=timeout)

    # -- scaling -------------------------------------------------------------

    def scale_up(self) -> None:
        """SIGTTIN: one more worker; it takes the first free metrics port."""
        self.proc.send_signal(signal.SIGTTIN)

    def scale_down(self) -> None:
        """SIGTTOU: one worker less (gunicorn stops the oldest)."""
        self.proc.send_signal(signal.SIGTTOU)

    def worker_pids(self) -> list[int]:
        return _children_of(self.master_pid) if self.alive() else []

    # -- metrics ports -------------------------------------------------------

    def listening_metrics_ports(self) -> list[int]:
        return [p for p in self.metrics_port_range if port_is_listening(self.address, p)]

    def wait_for_metrics_ports(
        self,
        predicate: Callable[[list[int]], bool],
        timeout: float = WAIT_TIMEOUT,
        what: str = "metrics ports",
    ) -> list[int]:
        """Wait until predicate(listening ports) holds; return the ports."""
        __tracebackhide__ = True
        last: list[int] = []

        def check():
            nonlocal last
            last = self.listening_metrics_ports()
            return predicate(last) and last

        return wait_until(
            check,
            timeout=timeout,
            interval=0.2,
            message=lambda: f"{what} on {self.address}:{self.metrics_first}-{self.metrics_last} "
            f"(listening now: {last})",
        )

    def port_assignments(self) -> list[tuple[int, int]]:
        """(pid, port) for each 'worker metrics: pid=.. listening' log line, in order."""
        return [(int(m.group(1)), int(m.group(3))) for m in _PORT_LOG_RE.finditer(self.logs())]

    def port_owners(self) -> dict[int, int]:
        """port -> pid of the latest worker that logged it took that port."""
        return {port: pid for pid, port in self.port_assignments()}

    def workers_without_port(self) -> list[int]:
        return [int(m.group(1)) for m in _NO_PORT_LOG_RE.finditer(self.logs())]

    def metrics_url(self, port: int) -> str:
        return f"http://{self.address}:{port}/metrics"

    def scrape(self, port: int, timeout: float = 5.0) -> str:
        r = http_get(self.metrics_url(port), timeout=timeout)
        r.raise_for_status()
        return r.text

    def per_worker_values(
        self, metric: str = "request_processing_seconds_count"
    ) -> dict[int, float]:
        """port -> value of `metric`, scraped directly from every live metrics port."""
        out = {}
        for port in self.listening_metrics_ports():
            value = parse_metric(self.scrape(port), metric)
            if value is not None:
                out[port] = value
        return out

    def naive_scrape(self) -> str:
        """The load-balanced /metrics on the app port (one random worker's view)."""
        r = http_get(f"{self.app_url}/metrics")
        r.raise_for_status()
        return r.text

    # -- traffic -------------------------------------------------------------

    def send_requests(
        self, n: int, concurrency: int = 8, path: str = "/", timeout: float = 20.0
    ) -> list[str]:
        """Send n GETs with `concurrency` threads; raise unless all are 200.

        Returns the response bodies ("served by worker pid N").
        """

        def one(_):
            r = http_get(f"{self.app_url}{path}", timeout=timeout)
            return r.status_code, r.text

        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(n), timeout=timeout * max(1, n // concurrency + 1)))
        bad = [r for r in results if r[0] != 200]
        if bad:
            raise AssertionError(f"{len(bad)}/{n} requests failed, e.g. {bad[:3]}")
        return [body for _, body in results]
