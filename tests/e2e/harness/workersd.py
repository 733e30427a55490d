"""The workersd binary under test."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import REPO_ROOT
from .net import free_port, http_get, http_ok, parse_metric
from .processes import ProcessManager, Runner, require_binary, safe_check
from .waits import START_TIMEOUT


def workersd_bin() -> Path:
    return Path(os.environ.get("WORKERSD_BIN", REPO_ROOT / "target" / "debug" / "workersd"))



def cli_flags(flags: Mapping[str, Any]) -> list[str]:
    """Keyword arguments as workersd's command-line flags, so a new flag needs no harness edit:
    probe_interval="1s" -> --probe-interval 1s; True -> the bare flag; None or False ->
    omitted (a flag that takes a boolean value is given as a string: leader_election="false");
    a list or tuple -> the flag once per item; anything else -> str(value)."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


class Workersd(Runner):
    """The workersd binary.

    Workersd(procs, mode="standalone", *, env=None, binary=None, consul_token=None,
             extra_args=(), **flags)

    Runs `workersd MODE --http-sd-listen 127.0.0.1:P --listen 127.0.0.1:P2 FLAGS... EXTRA...`
    and (start()) waits for GET /readyz == 200 on --listen. Every keyword in **flags is a
    command-line flag (see cli_flags), e.g. targets=path, consul_addr=consul.url,
    consul_node="n", probe_interval="1s" (the default here; None leaves workersd's own).
    consul_token (a secret) is written to a file passed as --consul-token-file.
    http_sd_url (http://127.0.0.1:P/targets), metrics_url, listen_url, readyz_url.
    Inherited WORKERSD_*/CONSUL_HTTP_*/CONSUL_DATACENTER env vars are not
    passed on (pass env= to set them). metric(name, labels) reads one value
    of its /metrics; Workersd.check(file) runs `workersd check --targets`.
    """

    name = "workersd"
    env_remove_prefixes = ("WORKERSD_", "CONSUL_HTTP_", "CONSUL_DATACENTER")
    # Flags the harness sets unless a test passes its own value (or None).
    DEFAULT_FLAGS: Mapping[str, Any] = {"probe_interval": "1s"}
    # Listen addresses the harness allocates (its URLs point there).
    _OWN_FLAGS = ("http_sd_listen", "listen")

    def __init__(
        self,
        procs: ProcessManager,
        mode: str = "standalone",
        *,
        env: Mapping[str, str] | None = None,
        binary: Path | str | None = None,
        consul_token: str | None = None,
        extra_args: Sequence[str] = (),
        **flags: Any,
    ):
        super().__init__(procs)
        taken = [f for f in self._OWN_FLAGS if f in flags]
        if taken:
            raise TypeError(f"Workersd allocates {taken} itself (see listen_url, http_sd_url)")
        self.binary = Path(binary) if binary else workersd_bin()
        self.mode = mode
        self.flags = {**self.DEFAULT_FLAGS, **flags}
        if consul_token is not None:
            token_file = procs.path(procs.unique_name("workersd-token"), "consul-token")
            token_file.write_text(consul_token + "\n")
            self.flags["consul_token_file"] = token_file
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.http_sd_port = free_port("127.0.0.1")
        self.listen_port = free_port("127.0.0.1")
        self.http_sd_base = f"http://127.0.0.1:{self.http_sd_port}"
        self.http_sd_url = f"{self.http_sd_base}/targets"
        self.listen_url = f"http://127.0.0.1:{self.listen_port}"
        self.metrics_url = f"{self.listen_url}/metrics"
        self.readyz_url = f"{self.listen_url}/readyz"

    def argv(self) -> list[str]:
        own = {
            "http_sd_listen": f"127.0.0.1:{self.http_sd_port}",
            "listen": f"127.0.0.1:{self.listen_port}",
        }
        return [str(self.binary), self.mode, *cli_flags({**own, **self.flags}), *self.extra_args]

    def start(self, timeout: float = START_TIMEOUT, wait_ready: bool = True) -> "Workersd":
        require_binary(self.binary, "workersd (WORKERSD_BIN)")
        self._launch(self.argv(), env=self.env)
        if wait_ready:
            self._wait_ready(
                safe_check(lambda: http_ok(self.readyz_url)),
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
