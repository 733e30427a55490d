"""Bounded waiting: every wait has a time limit and an attempt limit, and says on timeout
what it waited for."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

# Default timeouts, generous for a slow 2-core CI machine.
START_TIMEOUT = float(os.environ.get("E2E_START_TIMEOUT", "60"))
WAIT_TIMEOUT = float(os.environ.get("E2E_WAIT_TIMEOUT", "45"))
STOP_TIMEOUT = 10.0


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
