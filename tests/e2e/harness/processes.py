"""Children in their own process groups, logs in files, all killed on teardown; the base
of every runner (one child, start/stop, readiness wait)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import requests

from .waits import STOP_TIMEOUT, WaitTimeout, wait_until


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


class Runner:
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


def safe_check(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Wrap a readiness probe so connection errors mean "not yet"."""

    def check():
        try:
            return fn()
        except (requests.RequestException, OSError, ValueError):
            return False

    return check



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
