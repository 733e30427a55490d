"""Prometheus and VictoriaMetrics runners with the query API they share."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .net import free_port, http_get, http_ok, http_request
from .processes import ProcessManager, Runner, safe_check
from .waits import START_TIMEOUT, WAIT_TIMEOUT, wait_until

VICTORIA_METRICS_BIN = os.environ.get("VICTORIA_METRICS_BIN", "/usr/bin/victoria-metrics")
PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")


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


class _PromAPI(Runner):
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
            safe_check(lambda: http_ok(f"{self.url}/health")),
            f"VictoriaMetrics /health on {self.url}",
            timeout,
        )
        # The targets API answers once promscrape has loaded the config.
        self._wait_ready(
            safe_check(lambda: http_ok(f"{self.url}/api/v1/targets")),
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
            safe_check(lambda: http_ok(f"{self.url}/-/ready")),
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
