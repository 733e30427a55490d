"""Helm's own Go library, called through cffi: lint and render a chart without a helm binary.

The library is libhelm_sdkpy.so from the PyPI wheel helm-sdkpy (Helm v4 behind a small cgo
shim). The wheel wants Python >= 3.12, so it is not pip-installed: tests/chart/fetch_helm_lib.sh
downloads and unpacks it, and this module dlopens the .so directly (cffi works on 3.11).

C API of helm-sdkpy 0.1.32 used here (every call returns 0 on success, -1 on error with the
message in helm_sdkpy_last_error(); result strings are malloc'ed and freed with helm_sdkpy_free):

    int  helm_sdkpy_config_create(const char *namespace, const char *kubeconfig,
                                  const char *kubecontext, const char *options_json,
                                  helm_sdkpy_handle *handle_out);
    void helm_sdkpy_config_destroy(helm_sdkpy_handle handle);
    int  helm_sdkpy_lint(helm_sdkpy_handle handle, const char *chart_path, char **result_json);
    int  helm_sdkpy_install(helm_sdkpy_handle handle, const char *release_name,
                            const char *chart_path, const char *values_json,
                            const char *version, const char *options_json, char **result_json);
    int  helm_sdkpy_package(helm_sdkpy_handle handle, const char *chart_path,
                            const char *dest_dir, char **result_path);
    int  helm_sdkpy_show_chart(helm_sdkpy_handle handle, const char *chart_path,
                               char **result_yaml);
    const char *helm_sdkpy_last_error(void);   /* owned by the library: never freed */
    void helm_sdkpy_free(void *ptr);
    const char *helm_sdkpy_version_string(void);

What the library does not offer, and how this module makes up for it:

- lint takes no values (it runs Helm's lint with the chart's values.yaml), and its JSON result
  carries each message's severity and path but not its text (Go errors marshal as {}).
  `lint(chart, values)` lints a temporary copy of the chart whose values.yaml holds the merged
  values; on failure the tests render the same values to get Helm's error text.
- there is no template/render function and install has no dry-run option, so `render()`
  installs the chart against a fresh tests/support/fake_kube (in this process, on 127.0.0.1)
  and returns the release's manifest and NOTES exactly as Helm rendered them, plus the
  objects the install created there.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from cffi import FFI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "support"))

from fake_kube import server as fake_kube  # noqa: E402

FETCH_SCRIPT = HERE / "fetch_helm_lib.sh"
VERSION = "0.1.32"

_CDEF = """
typedef unsigned long long helm_sdkpy_handle;
int helm_sdkpy_config_create(const char *namespace, const char *kubeconfig, const char *kubecontext,
                             const char *options_json, helm_sdkpy_handle *handle_out);
void helm_sdkpy_config_destroy(helm_sdkpy_handle handle);
int helm_sdkpy_lint(helm_sdkpy_handle handle, const char *chart_path, char **result_json);
int helm_sdkpy_install(helm_sdkpy_handle handle, const char *release_name, const char *chart_path,
                       const char *values_json, const char *version, const char *options_json,
                       char **result_json);
int helm_sdkpy_package(helm_sdkpy_handle handle, const char *chart_path, const char *dest_dir,
                       char **result_path);
int helm_sdkpy_show_chart(helm_sdkpy_handle handle, const char *chart_path, char **result_yaml);
const char *helm_sdkpy_last_error(void);
void helm_sdkpy_free(void *ptr);
const char *helm_sdkpy_version_string(void);
"""

# Helm's support.Message severities.
UNKNOWN, INFO, WARNING, ERROR = 0, 1, 2, 3
SEVERITY_NAMES = {UNKNOWN: "UNKNOWN", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}

# Options of helm_sdkpy_install (JSON), as the wheel's Python code passes them. Client-side
# apply, no waiting (nothing would ever become ready), schema validation on.
_INSTALL_OPTIONS = {
    "create_namespace": False,
    "wait": False,
    "timeout_seconds": 60,
    "wait_for_jobs": False,
    "server_side_apply": "false",
    "force_conflicts": False,
    "disable_openapi_validation": True,
    "skip_schema_validation": False,
    "rollback_on_failure": False,
    "take_ownership": False,
}


class HelmError(Exception):
    """A call into the library failed; the message is Helm's."""


@dataclass
class LintResult:
    total_charts_linted: int
    # (severity, path) per message; the library does not return the message text.
    messages: list[tuple[int, str]]
    error_count: int
    raw: dict

    @property
    def errors(self) -> list[tuple[int, str]]:
        return [m for m in self.messages if m[0] >= ERROR]

    @property
    def warnings(self) -> list[tuple[int, str]]:
        return [m for m in self.messages if m[0] == WARNING]

    @property
    def ok(self) -> bool:
        """Helm's own verdict (non-strict `helm lint`): a chart linted, no error."""
        return self.total_charts_linted == 1 and self.error_count == 0 and not self.errors

    def describe(self) -> str:
        return ", ".join(f"{SEVERITY_NAMES.get(s, s)} {p}" for s, p in self.messages) or "none"


@dataclass
class Rendered:
    manifest: str
    notes: str
    # Objects the install created on the fake API server, in write order (CRDs first).
    sent: list[dict] = field(default_factory=list)

    @property
    def objects(self) -> list[dict]:
        """The release's manifest (templates/, not crds/), one dict per document."""
        return [doc for doc in yaml.safe_load_all(self.manifest) if doc]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]


def library_path() -> Path:
    """The .so: $HELM_SDKPY_LIB, else the fetch script's cache (fetched if missing)."""
    explicit = os.environ.get("HELM_SDKPY_LIB")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("HELM_SDKPY_DIR", "/tmp/helm-sdkpy"))
    path = cache / VERSION / "helm_sdkpy" / "_lib" / "linux-amd64" / "libhelm_sdkpy.so"
    if not path.is_file():
        # Failing to fetch raises: the chart tests fail, they are never skipped.
        out = subprocess.run(
            ["bash", str(FETCH_SCRIPT)], check=True, capture_output=True, text=True
        )
        path = Path(out.stdout.strip().splitlines()[-1])
    return path


class Helm:
    """The loaded library. One per process (see `load`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Go reads the environment once, when the library loads: point Helm's cache, config
        # and data directories at a scratch directory first, so tests never touch $HOME.
        home = Path(tempfile.mkdtemp(prefix="helm-sdkpy-home-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            os.environ[var] = str(home / var.lower())
        self._ffi = FFI()
        self._ffi.cdef(_CDEF)
        self._lib = self._ffi.dlopen(str(path))

    @property
    def version(self) -> str:
        return self._ffi.string(self._lib.helm_sdkpy_version_string()).decode()

    # -- plumbing ---------------------------------------------------------------------------

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            ptr = self._lib.helm_sdkpy_last_error()
            message = self._ffi.string(ptr).decode() if ptr != self._ffi.NULL else "unknown error"
            raise HelmError(f"{what}: {message}")

    def _take_string(self, out) -> str:
        ptr = out[0]
        if ptr == self._ffi.NULL:
            return ""
        try:
            return self._ffi.string(ptr).decode()
        finally:
            self._lib.helm_sdkpy_free(ptr)

    def _config(self, namespace: str, kubeconfig: str):
        handle = self._ffi.new("helm_sdkpy_handle *")
        rc = self._lib.helm_sdkpy_config_create(
            namespace.encode(), kubeconfig.encode(), self._ffi.NULL, b"{}", handle
        )
        self._check(rc, "helm_sdkpy_config_create")
        return handle[0]

    # -- actions ----------------------------------------------------------------------------

    def lint(self, chart: Path, values: dict[str, Any] | None = None) -> LintResult:
        """`helm lint CHART [-f values]` with Helm's lint rules (non-strict).

        With values, a scratch copy of the chart gets values.yaml = chart defaults merged with
        `values` (Helm's own precedence: given values win, maps merge, null deletes)."""
        with tempfile.TemporaryDirectory(prefix="helm-lint-") as scratch:
            target = Path(chart)
            if values is not None:
                target = Path(scratch) / Path(chart).name
                shutil.copytree(chart, target)
                defaults = yaml.safe_load((target / "values.yaml").read_text()) or {}
                merged = merge_values(defaults, values)
                (target / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
            # Lint never talks to a cluster; the kubeconfig only has to parse.
            handle = self._config("default", OFFLINE_KUBECONFIG)
            try:
                out = self._ffi.new("char **")
                rc = self._lib.helm_sdkpy_lint(handle, str(target).encode(), out)
                self._check(rc, f"lint {chart}")
                raw = json.loads(self._take_string(out))
            finally:
                self._lib.helm_sdkpy_config_destroy(handle)
        messages = [(int(m.get("Severity", 0)), str(m.get("Path", ""))) for m in raw.get("Messages") or []]
        return LintResult(
            total_charts_linted=int(raw.get("TotalChartsLinted") or 0),
            messages=messages,
            error_count=len(raw.get("Errors") or []),
            raw=raw,
        )

    def package(self, chart: Path, dest: Path) -> Path:
        """`helm package CHART -d DEST`: Helm's <name>-<version>.tgz of the chart directory
        (.helmignore applied, Chart.yaml first); returns its path. The entries carry the files'
        modification times, so a reproducible package needs them fixed first."""
        handle = self._config("default", OFFLINE_KUBECONFIG)
        try:
            out = self._ffi.new("char **")
            rc = self._lib.helm_sdkpy_package(handle, str(chart).encode(), str(dest).encode(), out)
            self._check(rc, f"package {chart}")
            return Path(self._take_string(out))
        finally:
            self._lib.helm_sdkpy_config_destroy(handle)

    def show_chart(self, chart: Path) -> dict:
        """`helm show chart CHART` (a directory or a .tgz, loaded by Helm's chart loader)."""
        handle = self._config("default", OFFLINE_KUBECONFIG)
        try:
            out = self._ffi.new("char **")
            rc = self._lib.helm_sdkpy_show_chart(handle, str(chart).encode(), out)
            self._check(rc, f"show chart {chart}")
            return yaml.safe_load(self._take_string(out))
        finally:
            self._lib.helm_sdkpy_config_destroy(handle)

    def render(
        self,
        chart: Path,
        values: dict[str, Any] | None = None,
        *,
        release: str = "workersd",
        namespace: str = "monitoring",
    ) -> Rendered:
        """`helm install --dry-run` equivalent: Helm renders and validates `chart` with
        `values` (schema included) and sends the objects to a fresh fake API server.
        Raises HelmError with Helm's message when rendering or validation fails."""
        with fake_cluster() as (url, state):
            before = state.rv
            handle = self._config(namespace, fake_kube.kubeconfig_text(url, namespace))
            try:
                out = self._ffi.new("char **")
                rc = self._lib.helm_sdkpy_install(
                    handle,
                    release.encode(),
                    str(chart).encode(),
                    json.dumps(values).encode() if values else b"",
                    b"",
                    json.dumps(_INSTALL_OPTIONS).encode(),
                    out,
                )
                self._check(rc, f"render {chart}")
                result = json.loads(self._take_string(out))
            finally:
                self._lib.helm_sdkpy_config_destroy(handle)
            sent = created_since(state, before)
        status = (result.get("info") or {}).get("status")
        if status != "deployed":
            raise HelmError(f"render {chart}: release status {status!r}, expected 'deployed'")
        return Rendered(
            manifest=result.get("manifest") or "",
            notes=(result.get("info") or {}).get("notes") or "",
            sent=sent,
        )


# Lint never talks to a cluster; the kubeconfig only has to parse (port 9 on loopback).
OFFLINE_KUBECONFIG = fake_kube.kubeconfig_text("http://127.0.0.1:9")

def _operator_crd(plural: str, kind: str) -> dict:
    """A prometheus-operator CRD (monitoring.coreos.com/v1), as a cluster running it serves
    it (schema left open here; the chart's objects are checked by the tests, not by this
    schema)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(),
                      "kind": kind, "listKind": f"{kind}List"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }


SERVICE_MONITOR_CRD = _operator_crd("servicemonitors", "ServiceMonitor")
PROMETHEUS_RULE_CRD = _operator_crd("prometheusrules", "PrometheusRule")


@contextlib.contextmanager
def fake_cluster() -> Iterator[tuple[str, Any]]:
    """A fresh fake_kube API server in a thread: (url, its State). Like a new cluster: no
    WorkerMetrics CRD yet (the chart installs it), ServiceMonitor and PrometheusRule served,
    and namespaces exist when used (Helm's install does not create them)."""
    state = fake_kube.State(workermetrics_crd=False, auto_create_namespaces=True)
    crds = state.rd("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    state.create(crds, None, SERVICE_MONITOR_CRD, bypass=True)
    state.create(crds, None, PROMETHEUS_RULE_CRD, bypass=True)
    server = fake_kube.FakeKubeServer(("127.0.0.1", 0), state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.url, state
    finally:
        with state.cond:
            state.closing = True
            state.cond.notify_all()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def created_since(state, rv: int) -> list[dict]:
    """Objects written after resourceVersion `rv` (an install writes each once), in write
    order, without Helm's release records (Secrets labelled owner=helm) and the namespaces
    fake_kube created on first use."""
    with state.cond:
        objs = [entry.copy() for st in state.stores.values() for entry in st.objects.values()]
    out = []
    for obj in objs:
        meta = obj["metadata"]
        if int(meta["resourceVersion"]) <= rv or obj["kind"] == "Namespace":
            continue
        if obj["kind"] == "Secret" and (meta.get("labels") or {}).get("owner") == "helm":
            continue
        out.append(obj)
    return sorted(out, key=lambda o: int(o["metadata"]["resourceVersion"]))


def merge_values(base: dict, override: dict) -> dict:
    """Helm's coalescing of user values over chart defaults."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_loaded: Helm | None = None


def load() -> Helm:
    """Load the library once per process (Go runtimes cannot be unloaded)."""
    global _loaded
    if _loaded is None:
        _loaded = Helm(library_path())
    return _loaded
