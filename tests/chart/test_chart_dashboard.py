"""workersd's Grafana dashboard: charts/workersd/files/workersd-dashboard.json, shipped by the
chart as a ConfigMap for Grafana's dashboard sidecar (grafanaDashboard.enabled).

    python3 -m pytest tests/chart/test_chart_dashboard.py

Every panel's PromQL parses (promtool checks it as a recording rule, with the dashboard's
variables replaced by sample values) and names only metrics workersd (src/metrics.rs, or a
scrape of the binary) or the example app (examples/gunicorn) exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from test_chart import CHART, NAMESPACE, REPO, VALUES_ALL, render
from test_chart_alerts import exported_by_workersd, metric_names, promtool  # noqa: F401 (a fixture)

DASHBOARD_FILE = CHART / "files" / "workersd-dashboard.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
# Grafana's own variable; the dashboard's are taken from its templating list.
BUILTIN = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
README_QUERY = "sum by (service) (rate(request_processing_seconds_count[1m]))"


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row holds its panels
    return out


def exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every query, variable queries included."""
    out = [(p["title"], t["expr"]) for p in panels(DASHBOARD) for t in p.get("targets", [])]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def substitute(expr: str) -> str:
    values = dict(BUILTIN)
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var["current"]["value"]
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    return out


def example_app_metrics() -> set[str]:
    """Sample names of the example app's registry (examples/gunicorn/app.py)."""
    code = "import app, prometheus_client; print(prometheus_client.generate_latest().decode())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "examples" / "gunicorn",
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    names = set(re.findall(r"(?m)^([a-zA-Z_:][\w:]*)[ {]", out))
    assert "request_processing_seconds_count" in names, out
    return names


def check_as_rules(tmp_path, queries: list[str]) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)
    ]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)


def test_every_query_parses(tmp_path):
    queries = [substitute(e) for _, e in exprs()]
    assert not [q for q in queries if "$" in q], queries
    out = check_as_rules(tmp_path, queries)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout, out.stdout


def test_a_broken_query_fails_the_check(tmp_path):
    """Guards the harness: promtool does reject what Prometheus cannot parse."""
    out = check_as_rules(tmp_path, ["sum by (service) (rate(x[1m])"])
    assert out.returncode != 0, out.stdout


def test_every_metric_is_exported(exported_by_workersd):
    exported = exported_by_workersd | example_app_metrics() | {"up"}
    for title, expr in exprs():
        names = metric_names(substitute(expr))
        assert names, f"{title}: no metric in {expr}"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported: {expr}"


def test_panels_cover_the_issue():
    queries = [e for _, e in exprs()]
    assert README_QUERY in queries, "the README's requests-per-service query"
    for metric in (
        "up{job=~\"$workers_job\"}", "workersd_probes_total", "workersd_sink_operations_total",
        "workersd_sink_errors_total", "workersd_sweep_overruns_total",
        "workersd_reconcile_duration_seconds_bucket", "workersd_sink_quarantined_operations",
    ):
        assert any(metric in q for q in queries), metric


def test_dashboard_is_well_formed():
    ids = [p["id"] for p in panels(DASHBOARD)]
    assert len(ids) == len(set(ids)), ids
    assert DASHBOARD["uid"] == "workersd" and DASHBOARD["title"]
    for panel in panels(DASHBOARD):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    names = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert names[0] == "datasource", names


# -- the chart's ConfigMap ---------------------------------------------------------------------


def test_dashboard_off_by_default(helm):
    assert not render(helm).of_kind("ConfigMap")


def test_dashboard_config_map(helm):
    cm = render(helm, {"grafanaDashboard": {"enabled": True}}).one("ConfigMap")
    assert cm["metadata"]["name"] == "workersd-dashboard"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in cm["metadata"]
    assert json.loads(cm["data"]["workersd.json"]) == DASHBOARD


def test_values_all_dashboard(helm):
    cm = render(helm, VALUES_ALL).one("ConfigMap")
    v = VALUES_ALL["grafanaDashboard"]
    assert cm["metadata"]["namespace"] == v["namespace"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == v["labels"]["grafana_dashboard"]
    assert cm["metadata"]["annotations"] == v["annotations"]
    assert json.loads(cm["data"]["workersd.json"]) == DASHBOARD


@pytest.mark.parametrize("bad", [{"namespace": "Grafana"}, {"labels": {"grafana_dashboard": 1}}])
def test_schema_rejects_bad_dashboard_values(helm, bad):
    from helm_lib import HelmError

    with pytest.raises(HelmError, match="schema"):
        render(helm, {"grafanaDashboard": {"enabled": True, **bad}})
