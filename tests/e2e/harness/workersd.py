"""The workersd binary under test."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from .files import REPO_ROOT
from .net import free_port, http_get, http_ok, parse_metric
from .processes import ProcessManager, Runner, require_binary, safe_check
from .waits import START_TIMEOUT


def workersd_bin() -> Path:
    return Path(os.environ.get("WORKERSD_BIN", REPO_ROOT / "target" / "debug" / "workersd"))



class Workersd(Runner):
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
