"""End-to-end test harness for workersd.

Everything here runs on loopback (127.0.0.0/8) only and every wait is bounded
in time and in iterations.

Building blocks:
  wait_until(...)            bounded polling with a clear timeout message
  Sampler(fn, interval)      fn() sampled in a background thread (bounded)
  free_port(host)            a free TCP port on a loopback address
  free_port_range(host, n)   a free contiguous range (for worker metrics ports)
  ProcessManager             children in their own process groups, logs in
                             files, all killed on teardown (the `procs` fixture)
  http_get / parse_metric    HTTP (never through a proxy) and exposition parsing
  write_atomic / targets_yaml   targets files written at once (rename)
  readme_yaml_block(heading)    README.md's documented YAML, parsed (used verbatim)

Runners (each takes the ProcessManager first; construct, then .start()):
  Gunicorn, VictoriaMetrics, Prometheus, ConsulDouble, Workersd
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO_ROOT / "examples" / "gunicorn"

VICTORIA_METRICS_BIN = os.environ.get("VICTORIA_METRICS_BIN", "/usr/bin/victoria-metrics")
PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")


def workersd_bin() -> Path:
    return Path(os.environ.get("WORKERSD_BIN", REPO_ROOT / "target" / "debug" / "workersd"))


def consul_double_bin() -> Path:
    """CONSUL_DOUBLE_BIN, else target/debug/consul-double; while testing/consul-double
    is its own workspace, its own target/ is tried too."""
    if os.environ.get("CONSUL_DOUBLE_BIN"):
        return Path(os.environ["CONSUL_DOUBLE_BIN"])
    main = REPO_ROOT / "target" / "debug" / "consul-double"
    standalone = REPO_ROOT / "testing" / "consul-double" / "target" / "debug" / "consul-double"
    return standalone if not main.exists() and standalone.exists() else main


# Default timeouts, generous for a slow 2-core CI machine.
START_TIMEOUT = float(os.environ.get("E2E_START_TIMEOUT", "60"))
WAIT_TIMEOUT = float(os.environ.get("E2E_WAIT_TIMEOUT", "45"))
STOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------


class WaitTimeout(AssertionError):
    """A bounded wait ran out. Subclass of AssertionError so tests fail, not error."""


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.25,
    message: str | Callable[[], str] = "",
    ignore_exceptions: bool = True,
) -> Any:
    """Poll predicate() until it returns a truthy value; return that value.

    Bounded twice: by `timeout` seconds and by timeout/interval + 2 attempts.
    Exceptions raised by the predicate count as "not yet" (unless
    ignore_exceptions=False); the last value and the last exception are in the
    timeout message. `message` may be a callable, evaluated only on timeout
    (e.g. to include current state).
    """
    __tracebackhide__ = True
    if timeout <= 0 or interval <= 0:
        raise ValueError("timeout and interval must be > 0")
    deadline = time.monotonic() + timeout
    max_attempts = int(timeout / interval) + 2
    last_value: Any = None
    last_exc: BaseException | None = None
    for attempt in range(1, max_attempts + 1):
        try:
            last_value = predicate()
            if last_value:
                return last_value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            if not ignore_exceptions:
                raise
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0 or attempt == max_attempts:
            break
        time.sleep(min(interval, remaining))
    what = message() if callable(message) else message
    detail = f"last value: {last_value!r}"
    if last_exc is not None:
        detail += f"; last error: {type(last_exc).__name__}: {last_exc}"
    raise WaitTimeout(
        f"timed out after {timeout:.1f}s ({attempt} attempts; {detail}) waiting for "
        f"{what or getattr(predicate, '__name__', 'condition')}"
    )


class Sampler:
    """Calls fn() every `interval` s in a background thread while in a `with` block,
    recording (monotonic time, value) pairs in .samples; a raising call records
    (time, exc). Bounded: at most max_seconds/interval calls. E.g. "the catalog never
    shrank during a restart"."""

    def __init__(self, fn: Callable[[], Any], interval: float = 0.1, max_seconds: float = 60):
        self.fn, self.interval = fn, interval
        self.max_samples = int(max_seconds / interval) + 1
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        for _ in range(self.max_samples):
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                value = self.fn()
            except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
                value = exc
            self.samples.append((started, value))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def errors(self) -> list[tuple[float, BaseException]]:
        return [(t, v) for t, v in self.samples if isinstance(v, BaseException)]

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------
# Ports and addresses
# --------------------------------------------------------------------------

_reserved_lock = threading.Lock()
_reserved: set[tuple[str, int]] = set()


def _bindable(host: str, port: int) -> bool:
    """True if a listener could bind host:port now (same SO_REUSEADDR as servers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on host, not handed out before in this test session."""
    for _ in range(50):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _reserved_lock:
            if (host, port) not in _reserved:
                _reserved.add((host, port))
                return port
    raise RuntimeError(f"no free port found on {host} in 50 attempts")


def free_port_range(host: str, count: int, preferred_first: int = 19011) -> tuple[int, int]:
    """A contiguous range of `count` free ports on host, as (first, last).

    Tries `preferred_first` first, then bases below the Linux ephemeral range
    (32768+), so kernel-chosen client ports do not land in the range.
    """
    candidates = [preferred_first] + list(range(20000, 32000 - count, max(count, 10)))
    for first in candidates[:200]:
        ports = range(first, first + count)
        with _reserved_lock:
            if any((host, p) in _reserved for p in ports):
                continue
            if all(_bindable(host, p) for p in ports):
                _reserved.update((host, p) for p in ports)
                return first, first + count - 1
    raise RuntimeError(f"no free range of {count} ports on {host}")


def port_is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def loopback_works(address: str) -> bool:
    """Binding + connecting on a 127.x address works (Linux routes 127/8 to lo)."""
    try:
        with socket.socket() as srv:
            srv.bind((address, 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname(), timeout=2):
                return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# Files: targets files and README snippets
# --------------------------------------------------------------------------


def write_atomic(path: Path | str, text: str) -> None:
    """Replace path's content at once (a poller never reads half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def targets_yaml(entries: Sequence[Mapping[str, Any]]) -> str:
    """A workersd targets file: entries are dicts (service, address, ports, ...);
    a (first, last) ports tuple becomes "first-last"."""
    out = []
    for entry in entries:
        entry = dict(entry)
        ports = entry.get("ports")
        if isinstance(ports, tuple):
            entry["ports"] = f"{ports[0]}-{ports[1]}"
        out.append(entry)
    return yaml.safe_dump({"targets": out}, sort_keys=False)


def readme_yaml_block(heading: str, readme: Path | None = None) -> Any:
    """The first ```yaml block after the Markdown heading `heading` in README.md,
    parsed. Tests use README's documented configs verbatim, so they fail when
    the documentation drifts from what works."""
    text = (readme or REPO_ROOT / "README.md").read_text()
    lines = text.splitlines()
    try:
        start = next(
            i
            for i, line in enumerate(lines)
            if line.strip() == heading or line.startswith(heading + " ")
        )
    except StopIteration:
        raise AssertionError(f"README.md has no heading {heading!r}") from None
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("##"):
            break  # next heading: no block in this section
        if lines[i].strip() == "```yaml":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            return yaml.safe_load("\n".join(lines[i + 1 : end]))
    raise AssertionError(f"README.md section {heading!r} has no ```yaml block")


# --------------------------------------------------------------------------
# HTTP and exposition-format helpers
# --------------------------------------------------------------------------


def http_request(method: str, url: str, timeout: float = 5.0, **kwargs) -> requests.Response:
    """One HTTP request; ignores *_proxy environment variables (loopback only)."""
    with requests.Session() as s:
        s.trust_env = False
        return s.request(method, url, timeout=timeout, **kwargs)


def http_get(url: str, timeout: float = 5.0, **kwargs) -> requests.Response:
    return http_request("GET", url, timeout=timeout, **kwargs)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return http_get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def parse_metric(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of all samples called `name` (matching `labels`) in exposition text.

    Returns None when no such sample exists, so "absent" differs from 0.
    """
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            total = (total or 0.0) + sample.value
    return total


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

_all_managers: "set[ProcessManager]" = set()


@atexit.register
def _kill_leftovers() -> None:  # last resort if teardown never ran
    for manager in list(_all_managers):
        manager.stop_all(timeout=2.0)


class ManagedProcess:
    """A child in its own process group (new session), output to log files."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        env_remove_prefixes: Sequence[str] = (),
    ):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        # Inherited settings (e.g. a developer's CONSUL_HTTP_ADDR) must not
        # leak into the child; explicit `env` wins.
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(tuple(env_remove_prefixes))
        }
        if env:
            full_env.update(env)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            header = f"=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n"
            out.write(header.encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,  # own process group == pid
            )
        self.pid = self.popen.pid
        self.pgid = self.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        """Signal the process itself (not its group)."""
        if self.alive():
            os.kill(self.pid, sig)

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM the whole group, wait (bounded), then SIGKILL what is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        # Orphaned group members (e.g. gunicorn workers) are reaped by init;
        # wait a bounded while for the group to vanish.
        deadline = time.monotonic() + 5
        while self._group_exists() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            time.sleep(0.05)
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL the group at once (crash simulation)."""
        self.stop(timeout=0.1, sig=signal.SIGKILL)

    def logs(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def tail(self, max_chars: int = 6000) -> str:
        out = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if len(text) > max_chars:
                    text = "...[cut]...\n" + text[-max_chars:]
                out.append(f"--- {path} ---\n{text}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} alive={self.alive()}>"


class ProcessManager:
    """Starts children and guarantees they are killed (the `procs` fixture).

    Each test gets one; its teardown stops everything, even on failure, and
    the conftest attaches every child's log tail to a failing test's report.
    """

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = Path(tmp_dir)
        self.log_dir = self.tmp_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self._names: dict[str, int] = {}
        _all_managers.add(self)

    def unique_name(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    def path(self, *parts: str) -> Path:
        """A path under the test's tmp dir (parent dirs created)."""
        p = self.tmp_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        env_remove_prefixes: Sequence[str] = (),
    ) -> ManagedProcess:
        proc = ManagedProcess(
            self.unique_name(name),
            argv,
            self.log_dir,
            env=env,
            cwd=cwd,
            env_remove_prefixes=env_remove_prefixes,
        )
        self.processes.append(proc)
        return proc

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(timeout=timeout)
        _all_managers.discard(self)

    def report(self) -> str:
        return "\n\n".join(
            f"##### {p.name} (pid {p.pid}, exit {p.returncode}) {' '.join(p.argv)}\n{p.tail()}"
            for p in self.processes
        )


class _Runner:
    """Common parts of the runners: one ManagedProcess, start/stop, logs."""

    name = "runner"
    # Environment variables the child would read as configuration.
    env_remove_prefixes: tuple[str, ...] = ()

    def __init__(self, procs: ProcessManager):
        self.procs = procs
        self.proc: ManagedProcess | None = None

    def _launch(self, argv, env=None, cwd=None) -> ManagedProcess:
        if self.proc is not None and self.proc.alive():
            raise RuntimeError(f"{self.name} already running")
        self.proc = self.procs.start(
            self.name, argv, env=env, cwd=cwd, env_remove_prefixes=self.env_remove_prefixes
        )
        return self.proc

    def _wait_ready(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        __tracebackhide__ = True

        def ready():
            if not self.proc.alive():
                raise _Died(self)
            return check()

        try:
            wait_until(ready, timeout=timeout, interval=0.2, message=what, ignore_exceptions=False)
        except _Died:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode} before {what}\n{self.proc.tail()}"
            ) from None
        except WaitTimeout as exc:
            raise WaitTimeout(f"{self.name}: {exc}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        return self.proc.stop(timeout=timeout) if self.proc else None

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def logs(self) -> str:
        return self.proc.logs() if self.proc else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _Died(Exception):
    def __init__(self, runner):
        super().__init__(f"{runner.name} died")


def _safe_check(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Wrap a readiness probe so connection errors mean "not yet"."""

    def check():
        try:
            return fn()
        except (requests.RequestException, OSError, ValueError):
            return False

    return check


# --------------------------------------------------------------------------
# Gunicorn (examples/gunicorn, used as is)
# --------------------------------------------------------------------------

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


class Gunicorn(_Runner):
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
            _safe_check(lambda: http_ok(f"{self.app_url}/metrics")),
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


# --------------------------------------------------------------------------
# VictoriaMetrics and Prometheus
# --------------------------------------------------------------------------


_SD_KINDS = ("http_sd_configs", "consul_sd_configs", "file_sd_configs")


def _config_data(
    config: str | Mapping[str, Any], scrape_interval: str, sd_refresh: str | None
) -> dict:
    """Normalise a Prometheus-style config for one of the two servers.

    global scrape_interval/scrape_timeout default to `scrape_interval`.
    sd_refresh set (Prometheus): every http/consul/file SD config without a
    refresh_interval gets sd_refresh. sd_refresh None (VictoriaMetrics 1.79,
    whose strict parser rejects refresh_interval; its refresh is the global
    -promscrape.*SDCheckInterval flags): refresh_interval keys are removed.
    So one config can be given to both runners.
    """
    data = yaml.safe_load(config) if isinstance(config, str) else json.loads(json.dumps(config))
    data = data or {}
    glob = dict(data.get("global") or {})
    glob.setdefault("scrape_interval", scrape_interval)
    glob.setdefault("scrape_timeout", scrape_interval)
    data["global"] = glob
    data.setdefault("scrape_configs", [])
    for job in data["scrape_configs"] or []:
        for kind in _SD_KINDS:
            for sd in job.get(kind) or []:
                if sd_refresh is None:
                    sd.pop("refresh_interval", None)
                else:
                    sd.setdefault("refresh_interval", sd_refresh)
    return data


class _PromAPI(_Runner):
    """Prometheus-compatible query API shared by VictoriaMetrics and Prometheus."""

    url: str
    query_params: dict[str, str] = {}

    def _api(
        self, path: str, params: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> Any:
        r = http_get(f"{self.url}{path}", params=params, timeout=timeout)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"{self.name} {path} {params}: HTTP {r.status_code}: {r.text[:500]}")
        return body["data"]

    def _before_query(self) -> None:
        pass

    def query_raw(self, promql: str, at: float | None = None) -> dict:
        self._before_query()
        params = {"query": promql, **self.query_params}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._api("/api/v1/query", params)

    def query(self, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """Instant query -> [(labels, value)] (scalar results as one item with {})."""
        data = self.query_raw(promql, at)
        if data["resultType"] == "vector":
            return [(item["metric"], float(item["value"][1])) for item in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise RuntimeError(f"unexpected result type {data['resultType']}")

    def query_value(self, promql: str, at: float | None = None) -> float | None:
        """The single value of an instant query; None if the result is empty."""
        result = self.query(promql, at)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql!r} returned {len(result)} series: {result}")
        return result[0][1]

    def wait_for_value(
        self,
        promql: str,
        predicate: Callable[[float | None], bool],
        timeout: float = WAIT_TIMEOUT,
        what: str = "",
    ) -> float | None:
        """Poll query_value(promql) until predicate(value); return the value."""
        __tracebackhide__ = True
        seen: list[float | None] = []

        def check():
            v = self.query_value(promql)
            seen.append(v)
            return predicate(v) and (True, v)

        result = wait_until(
            check,
            timeout=timeout,
            interval=0.5,
            message=lambda: f"{self.name}: {what or promql} (recent values {seen[-5:]})\n"
            f"targets: {self._targets_summary()}",
        )
        return result[1]

    def targets(self, state: str = "active") -> list[dict]:
        """activeTargets (or droppedTargets with state='dropped') of /api/v1/targets."""
        data = self._api("/api/v1/targets")
        return data.get("droppedTargets" if state == "dropped" else "activeTargets") or []

    def _targets_summary(self) -> str:
        try:
            return json.dumps(
                [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    | {"job": t.get("labels", {}).get("job")}
                    for t in self.targets()
                ]
            )
        except Exception as exc:  # noqa: BLE001
            return f"<unavailable: {exc}>"

    def wait_for_targets(
        self,
        predicate: Callable[[list[dict]], bool],
        timeout: float = WAIT_TIMEOUT,
        what: str = "targets",
    ) -> list[dict]:
        """Wait until predicate(active targets) holds; return the targets."""
        __tracebackhide__ = True
        last: list[dict] = []

        def check():
            nonlocal last
            last = self.targets()
            return predicate(last) and last

        return wait_until(
            check,
            timeout=timeout,
            interval=0.5,
            message=lambda: f"{self.name}: {what}; now: {self._targets_summary()}",
        )

    def up_targets(self, job: str | None = None) -> list[str]:
        """scrapeUrls of healthy active targets (optionally of one job)."""
        return sorted(
            t["scrapeUrl"]
            for t in self.targets()
            if t.get("health") == "up" and (job is None or t.get("labels", {}).get("job") == job)
        )

    sd_refresh: str | None = None

    def write_config(self, config: str | Mapping[str, Any]) -> None:
        """Write the (normalised) config file; does not reload."""
        data = _config_data(config, self.scrape_interval, self.sd_refresh)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(self.config_path)  # atomic: never a half-written config


class VictoriaMetrics(_PromAPI):
    """Single-node VictoriaMetrics (Debian's 1.79.x) scraping with its promscrape.

    VictoriaMetrics(procs, scrape_config, scrape_interval="1s", extra_args=())

    scrape_config: Prometheus-style config (YAML text or dict) with
    scrape_configs; global scrape_interval defaults to 1s. Discovery
    (consul/http/file SD) refreshes every second. Queries at "now" see data
    within ~1-2 s (see FLAGS).
    """

    name = "victoria-metrics"
    # nocache=1: no response cache and no latency-offset shift for this query.
    query_params = {"nocache": "1"}
    # VM 1.79 makes NEW series searchable only ~10 s after their first sample
    # (index lag, no flag for it); GET /internal/force_flush before each
    # query makes them visible at once. Set False to observe the real lag.
    flush_before_query = True

    # Why each flag (1.79 defaults in parentheses):
    FLAGS = [
        # Instant queries near "now" are evaluated at now-30s unless this is 0
        # (30s): without it fresh samples are invisible for half a minute.
        "-search.latencyOffset=0s",
        # Never serve cached rollup results (cache would hide new samples).
        "-search.disableCache",
        # Discovery refresh (30s consul, 1m http, 5m file) -> 1s.
        "-promscrape.consulSDCheckInterval=1s",
        "-promscrape.httpSDCheckInterval=1s",
        "-promscrape.fileSDCheckInterval=1s",
        # Re-read -promscrape.config when the file changes (write_config()).
        "-promscrape.configCheckInterval=1s",
        "-retentionPeriod=1d",
        # Stale samples vanish from instant queries after 2 missed 1s scrapes.
        "-search.maxStalenessInterval=5s",
    ]

    def __init__(
        self,
        procs: ProcessManager,
        scrape_config: str | Mapping[str, Any] | None = None,
        scrape_interval: str = "1s",
        extra_args: Sequence[str] = (),
        binary: str = VICTORIA_METRICS_BIN,
    ):
        super().__init__(procs)
        self.binary = binary
        self.scrape_interval = scrape_interval
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = procs.path(f"vm-{self.port}", "data")
        self.config_path = procs.path(f"vm-{self.port}", "scrape.yml")
        self.write_config(scrape_config or {})
        self.extra_args = list(extra_args)

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-promscrape.config={self.config_path}",
            *self.FLAGS,
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> "VictoriaMetrics":
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} missing: apt-get install victoria-metrics")
        self._launch(self.argv())
        self._wait_ready(
            _safe_check(lambda: http_ok(f"{self.url}/health")),
            f"VictoriaMetrics /health on {self.url}",
            timeout,
        )
        # The targets API answers once promscrape has loaded the config.
        self._wait_ready(
            _safe_check(lambda: http_ok(f"{self.url}/api/v1/targets")),
            "VictoriaMetrics /api/v1/targets",
            timeout,
        )
        return self

    def flush(self) -> None:
        """Make everything ingested so far searchable (incl. brand-new series)."""
        r = http_get(f"{self.url}/internal/force_flush", timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"force_flush: {r.status_code} {r.text[:200]}")

    def _before_query(self) -> None:
        if self.flush_before_query:
            self.flush()

    def reload(self) -> None:
        """Re-read the scrape config now (also happens within 1s on change)."""
        self.proc.send_signal(signal.SIGHUP)

    def update_config(self, config: str | Mapping[str, Any]) -> None:
        self.write_config(config)
        self.reload()


class Prometheus(_PromAPI):
    """Prometheus (Debian's 2.42) with a temp TSDB on a loopback port.

    Prometheus(procs, config, scrape_interval="1s", extra_args=())

    config: YAML text or dict (global scrape_interval defaults to 1s); every
    http/consul/file SD config gets refresh_interval 1s unless it sets one.
    Prometheus 2.42 applies discovered target changes only every ~5 s (fixed
    in its scrape/discovery managers, no flag), so allow ~5-10 s for a new
    target to be scraped. reload() = POST /-/reload.
    """

    name = "prometheus"
    sd_refresh = "1s"

    def __init__(
        self,
        procs: ProcessManager,
        config: str | Mapping[str, Any] | None = None,
        scrape_interval: str = "1s",
        extra_args: Sequence[str] = (),
        binary: str = PROMETHEUS_BIN,
    ):
        super().__init__(procs)
        self.binary = binary
        self.scrape_interval = scrape_interval
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = procs.path(f"prometheus-{self.port}", "data")
        self.config_path = procs.path(f"prometheus-{self.port}", "prometheus.yml")
        self.write_config(config or {})
        self.extra_args = list(extra_args)

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",  # POST /-/reload
            "--storage.tsdb.retention.time=1d",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> "Prometheus":
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} missing: apt-get install prometheus")
        self._launch(self.argv())
        self._wait_ready(
            _safe_check(lambda: http_ok(f"{self.url}/-/ready")),
            f"Prometheus /-/ready on {self.url}",
            timeout,
        )
        return self

    def reload(self) -> None:
        r = http_request("POST", f"{self.url}/-/reload", timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"prometheus reload failed: {r.status_code} {r.text}")

    def update_config(self, config: str | Mapping[str, Any]) -> None:
        self.write_config(config)
        self.reload()


# --------------------------------------------------------------------------
# In-repo binaries: consul-double and workersd
# --------------------------------------------------------------------------


def require_binary(path: Path, what: str) -> Path:
    """The binary's path; skip the test if it is missing, unless
    E2E_REQUIRE_BINARIES=1 (set by scripts/test-all), then fail."""
    if path.is_file() and os.access(path, os.X_OK):
        return path
    msg = f"{what} binary not found at {path} (cargo build --workspace --bins, or set the env var)"
    if os.environ.get("E2E_REQUIRE_BINARIES") == "1":
        raise AssertionError(msg)
    import pytest

    pytest.skip(msg)


class ConsulDouble(_Runner):
    """The in-repo Consul double (testing/consul-double).

    ConsulDouble(procs, acl_token=None, datacenter=None, extra_args=(), binary=None,
                 acl_config=None)

    acl_token alone: ACLs on, default deny, that one management token. acl_config (a dict in
    the double's --acl-config form, see its CONTRACT.md) sets up tokens with rules; then
    acl_token names the token the harness itself reads and writes with (management).
    set_token_rules(secret, rules) edits a token's policy while clients run.

    addr ("127.0.0.1:P", for consul_sd_configs `server`), url (http://...,
    for workersd --consul-addr), control_url; down(), up(empty=False), wipe(),
    state(), stats(), reset_stats(), health(), api_get(path, **params),
    api_put(path, body), register(entity), catalog_services(),
    catalog_service(name), node_services(node), owned_entries(service, owner),
    owned_ports(service, owner).
    """

    name = "consul-double"
    env_remove_prefixes = ("CONSUL_DOUBLE_",)

    def __init__(
        self,
        procs: ProcessManager,
        acl_token: str | None = None,
        datacenter: str | None = None,
        extra_args: Sequence[str] = (),
        binary: Path | str | None = None,
        acl_config: Mapping[str, Any] | None = None,
    ):
        super().__init__(procs)
        self.binary = Path(binary) if binary else consul_double_bin()
        self.acl_token = acl_token
        self.acl_config_file: Path | None = None
        if acl_config is not None:
            self.acl_config_file = procs.path(procs.unique_name("consul-acl"), "acl.json")
            self.acl_config_file.write_text(json.dumps(acl_config))
        self.datacenter = datacenter
        self.extra_args = list(extra_args)
        self.port = free_port("127.0.0.1")
        self.control_port = free_port("127.0.0.1")
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        self.control_url = f"http://127.0.0.1:{self.control_port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--listen",
            self.addr,
            "--control-listen",
            f"127.0.0.1:{self.control_port}",
        ]
        if self.acl_config_file:
            argv += ["--acl-config", str(self.acl_config_file)]
        elif self.acl_token:
            argv += ["--acl-token", self.acl_token]
        if self.datacenter:
            argv += ["--datacenter", self.datacenter]
        return argv + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> "ConsulDouble":
        require_binary(self.binary, "consul-double (CONSUL_DOUBLE_BIN)")
        self._launch(self.argv())
        self._wait_ready(
            _safe_check(lambda: http_ok(f"{self.control_url}/control/state")),
            f"consul-double control API on {self.control_url}",
            timeout,
        )
        return self

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.acl_token} if self.acl_token else {}

    def _control(self, action: str) -> None:
        r = http_request("POST", f"{self.control_url}/control/{action}", timeout=5)
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double /control/{action}: {r.status_code} {r.text}")

    def down(self) -> None:
        """Make the Consul API fail (simulated outage)."""
        self._control("down")

    def up(self, empty: bool = False) -> None:
        """API back; empty=True: the catalog comes back wiped (index reset)."""
        self._control("up?empty=true" if empty else "up")

    def wipe(self) -> None:
        """Forget every registration (simulated Consul data loss)."""
        self._control("wipe")

    def state(self) -> Any:
        r = http_get(f"{self.control_url}/control/state", timeout=5)
        r.raise_for_status()
        return r.json()

    def stats(self) -> Any:
        """Request counters (GET /control/stats)."""
        r = http_get(f"{self.control_url}/control/stats", timeout=5)
        r.raise_for_status()
        return r.json()

    def reset_stats(self) -> None:
        """Zero the request statistics (POST /control/reset-stats)."""
        self._control("reset-stats")

    def set_token_rules(self, secret: str, rules: Mapping[str, Any]) -> None:
        """Replace a token's policy rules (PUT /control/acl/rules), as an operator would."""
        r = http_request(
            "PUT",
            f"{self.control_url}/control/acl/rules",
            json={"secret_id": secret, "rules": dict(rules)},
            timeout=5,
        )
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double /control/acl/rules: {r.status_code} {r.text}")

    def refuse_service_writes(self, services: list[str]) -> None:
        """Fault injection: txn Service writes of these names fail per op (409)."""
        r = http_request("POST", f"{self.control_url}/control/refuse-service-writes",
                         json={"services": list(services)}, timeout=5)
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double refuse-service-writes: {r.status_code} {r.text}")

    def health(self) -> Any:
        r = http_get(f"{self.control_url}/control/health", timeout=5)
        r.raise_for_status()
        return r.json()

    def api_put(self, path: str, body: Any, **params) -> requests.Response:
        return http_request(
            "PUT",
            f"{self.url}{path}",
            params=params or None,
            json=body,
            headers=self._headers(),
            timeout=5,
        )

    def register(self, entity: Mapping[str, Any]) -> None:
        """PUT /v1/catalog/register (e.g. a foreign entry a test must see survive)."""
        r = self.api_put("/v1/catalog/register", dict(entity))
        if r.status_code != 200:
            raise RuntimeError(f"catalog/register: {r.status_code} {r.text}")

    def node_services(self, node: str) -> Any:
        r = self.api_get(f"/v1/catalog/node-services/{node}")
        r.raise_for_status()
        return r.json()

    def api_get(self, path: str, **params) -> requests.Response:
        return http_get(
            f"{self.url}{path}", params=params or None, headers=self._headers(), timeout=5
        )

    def catalog_services(self) -> dict[str, list[str]]:
        r = self.api_get("/v1/catalog/services")
        r.raise_for_status()
        return r.json()

    def catalog_service(self, name: str) -> list[dict]:
        r = self.api_get(f"/v1/catalog/service/{name}")
        r.raise_for_status()
        return r.json()

    def owned_entries(self, service: str, owner: str) -> list[dict]:
        """catalog_service(service) entries whose ServiceMeta names workersd `owner`."""
        return [
            e
            for e in self.catalog_service(service)
            if (e.get("ServiceMeta") or {}).get("external-source") == "workersd"
            and (e.get("ServiceMeta") or {}).get("workersd-owner") == owner
        ]

    def owned_ports(self, service: str, owner: str) -> list[int]:
        """Sorted ServicePorts of owned_entries (duplicates kept, so they show)."""
        return sorted(e["ServicePort"] for e in self.owned_entries(service, owner))


class Workersd(_Runner):
    """The workersd binary.

    Workersd(procs, mode="standalone", targets_file=None, consul_addr=None,
             extra_args=(), probe_interval="1s", env=None, binary=None,
             consul_token=None, consul_node=None, consul_resync="1s")

    Runs `workersd MODE --targets FILE --http-sd-listen 127.0.0.1:P
    --listen 127.0.0.1:P2 [--consul-addr URL] [--consul-token-file F]
    [--consul-node NODE --consul-resync-interval 1s] --probe-interval 1s
    EXTRA...` (consul_token is written to F) and waits for GET /readyz == 200
    on --listen. http_sd_url
    (http://127.0.0.1:P/targets), metrics_url, listen_url, readyz_url.
    Inherited WORKERSD_*/CONSUL_HTTP_*/CONSUL_DATACENTER env vars are not
    passed on (pass env= to set them). metric(name, labels) reads one value
    of its /metrics; Workersd.check(file) runs `workersd check --targets`.
    """

    name = "workersd"
    env_remove_prefixes = ("WORKERSD_", "CONSUL_HTTP_", "CONSUL_DATACENTER")

    def __init__(
        self,
        procs: ProcessManager,
        mode: str = "standalone",
        targets_file: Path | str | None = None,
        consul_addr: str | None = None,
        extra_args: Sequence[str] = (),
        probe_interval: str | None = "1s",
        env: Mapping[str, str] | None = None,
        binary: Path | str | None = None,
        consul_token: str | None = None,
        consul_node: str | None = None,
        consul_resync: str = "1s",
    ):
        super().__init__(procs)
        self.binary = Path(binary) if binary else workersd_bin()
        self.mode = mode
        self.targets_file = Path(targets_file) if targets_file else None
        self.consul_addr = consul_addr
        self.consul_token_file: Path | None = None
        if consul_token is not None:
            self.consul_token_file = procs.path(procs.unique_name("workersd-token"), "consul-token")
            self.consul_token_file.write_text(consul_token + "\n")
        self.extra_args = list(extra_args)
        self.probe_interval = probe_interval
        self.consul_node = consul_node
        self.consul_resync = consul_resync
        self.env = dict(env or {})
        self.http_sd_port = free_port("127.0.0.1")
        self.listen_port = free_port("127.0.0.1")
        self.http_sd_base = f"http://127.0.0.1:{self.http_sd_port}"
        self.http_sd_url = f"{self.http_sd_base}/targets"
        self.listen_url = f"http://127.0.0.1:{self.listen_port}"
        self.metrics_url = f"{self.listen_url}/metrics"
        self.readyz_url = f"{self.listen_url}/readyz"

    def argv(self) -> list[str]:
        argv = [str(self.binary), self.mode]
        if self.targets_file is not None:
            argv += ["--targets", str(self.targets_file)]
        argv += [
            "--http-sd-listen",
            f"127.0.0.1:{self.http_sd_port}",
            "--listen",
            f"127.0.0.1:{self.listen_port}",
        ]
        if self.consul_addr:
            argv += ["--consul-addr", self.consul_addr]
        if self.consul_token_file:
            argv += ["--consul-token-file", str(self.consul_token_file)]
        if self.consul_node:
            argv += ["--consul-node", self.consul_node, "--consul-resync-interval", self.consul_resync]
        if self.probe_interval:
            argv += ["--probe-interval", self.probe_interval]
        return argv + self.extra_args

    def start(self, timeout: float = START_TIMEOUT, wait_ready: bool = True) -> "Workersd":
        require_binary(self.binary, "workersd (WORKERSD_BIN)")
        self._launch(self.argv(), env=self.env)
        if wait_ready:
            self._wait_ready(
                _safe_check(lambda: http_ok(self.readyz_url)),
                f"workersd {self.readyz_url} == 200",
                timeout,
            )
        return self

    def readyz(self) -> int:
        return http_get(self.readyz_url, timeout=5).status_code

    def http_sd(self) -> list[dict]:
        """The Prometheus HTTP SD document: [{"targets": [...], "labels": {...}}]."""
        r = http_get(self.http_sd_url, timeout=5)
        r.raise_for_status()
        return r.json()

    def http_sd_targets(self) -> list[str]:
        return sorted(t for group in self.http_sd() for t in group.get("targets", []))

    def metrics_text(self) -> str:
        r = http_get(self.metrics_url, timeout=5)
        r.raise_for_status()
        return r.text

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Sum of the samples `name` (matching labels) on /metrics; None if absent."""
        return parse_metric(self.metrics_text(), name, labels)

    @staticmethod
    def check(targets_file: Path | str, binary: Path | str | None = None, timeout: float = 30):
        """`workersd check --targets FILE` -> subprocess.CompletedProcess (text)."""
        exe = require_binary(Path(binary) if binary else workersd_bin(), "workersd (WORKERSD_BIN)")
        drop = Workersd.env_remove_prefixes
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        return subprocess.run(
            [str(exe), "check", "--targets", str(targets_file)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )


# --------------------------------------------------------------------------
# Fake Kubernetes API server (tests/support/fake_kube) and kubectl
# --------------------------------------------------------------------------

SUPPORT_DIR = REPO_ROOT / "tests" / "support"


def _fake_kube_client_class():
    if str(SUPPORT_DIR) not in sys.path:
        sys.path.insert(0, str(SUPPORT_DIR))
    from fake_kube.client import FakeKube as client_class

    return client_class


class FakeKube(_Runner):
    """tests/support/fake_kube/server.py under the ProcessManager (its log is attached to a
    failing test's report), driven through fake_kube.client.FakeKube.

    FakeKube(procs, bookmark_interval=None, history_limit=None, extra_args=())

    .url, .kubeconfig (for KUBECONFIG= / kubectl --kubeconfig) and every method of the
    client (api, ok, compact, drop_watches, watches, wait_for_watch, requests, add_fault,
    set_pod_status, terminate_pod, ...) are available on the runner itself.
    """

    name = "fake-kube"

    def __init__(
        self,
        procs: ProcessManager,
        bookmark_interval: float | None = None,
        history_limit: int | None = None,
        extra_args: Sequence[str] = (),
    ):
        super().__init__(procs)
        workdir = procs.path(procs.unique_name("fake-kube"), "x").parent
        self.client = _fake_kube_client_class()(
            workdir,
            bookmark_interval=bookmark_interval,
            history_limit=history_limit,
            extra_args=extra_args,
        )
        self.kubeconfig = self.client.kubeconfig

    def start(self, timeout: float = START_TIMEOUT) -> "FakeKube":
        ready_file = self.client.ready_file
        ready_file.unlink(missing_ok=True)
        self._launch(self.client.args)

        def ready():
            text = ready_file.read_text().strip() if ready_file.exists() else ""
            return bool(text) and http_ok(f"{text}/healthz")

        self._wait_ready(_safe_check(ready), f"fake_kube ready file {ready_file}", timeout)
        self.client.url = ready_file.read_text().strip()
        return self

    @property
    def url(self) -> str:
        return self.client.url

    def __getattr__(self, attr: str) -> Any:
        # Only called for attributes the runner lacks: delegate to the client.
        if attr == "client":
            raise AttributeError(attr)
        return getattr(self.client, attr)


def kubectl_bin() -> str | None:
    """Debian's kubectl (kubernetes-client), as tests/support/test_fake_kube.py finds it:
    KUBECTL, else /opt/kubernetes-client (install_kubectl.sh), else /usr/bin/kubectl when
    the kubernetes-client package owns it."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    unpacked = "/opt/kubernetes-client/usr/bin/kubectl"
    if os.access(unpacked, os.X_OK):
        return unpacked
    probe = subprocess.run(["dpkg", "-s", "kubernetes-client"], capture_output=True)
    if probe.returncode == 0 and os.access("/usr/bin/kubectl", os.X_OK):
        return "/usr/bin/kubectl"
    return None
