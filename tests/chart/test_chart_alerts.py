"""workersd's alerts: charts/workersd/files/workersd.rules.yaml, the one copy of the rules,
served as a plain rules file and rendered by the chart into a PrometheusRule.

    python3 -m pytest tests/chart/test_chart_alerts.py

promtool (Debian's `prometheus` package) checks the file and runs its unit tests
(tests/alerts/workersd.test.yaml: every alert fires on its failure, stays silent when
healthy); each alert's runbook_url names a section of README.md.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_chart import CHART, NAMESPACE, REPO, VALUES_ALL, render
from test_chart_flags import workersd_binary

RULES_FILE = CHART / "files" / "workersd.rules.yaml"
UNIT_TESTS = REPO / "tests" / "alerts" / "workersd.test.yaml"
README = REPO / "README.md"
RUNBOOK_BASE = "https://github.com/workersd/workersd/blob/main/README.md#"

# Rules that name metrics workersd does not export yet; test_rules_use_exported_metrics
# fails once they are exported, so this list shrinks with them.
PENDING_METRICS: set[str] = set()


def promtool() -> str:
    path = shutil.which("promtool")
    # Not skipped: the alerts are only tested through promtool.
    assert path, "promtool not found (Debian: apt-get install prometheus)"
    return path


def rules_of(doc: dict) -> list[dict]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def file_rules() -> list[dict]:
    return rules_of(yaml.safe_load(RULES_FILE.read_text()))


def test_promtool_check_rules():
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES_FILE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(file_rules())} rules found" in out.stdout, out.stdout


def test_promtool_unit_tests():
    out = subprocess.run(
        [promtool(), "test", "rules", str(UNIT_TESTS.relative_to(REPO))],
        capture_output=True, text=True, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_fires_and_stays_silent_in_the_unit_tests():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    for rule in file_rules():
        name = rule["alert"]
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays silent"


def readme_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", README.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_is_complete_and_has_a_runbook():
    anchors = readme_anchors()
    names = [rule["alert"] for rule in file_rules()]
    assert len(names) == len(set(names)), names
    for rule in file_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no for"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        url = ann["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        anchor = url[len(RUNBOOK_BASE):]
        assert anchor == name.lower(), url
        assert anchor in anchors, f"README.md has no section {name} (anchor #{anchor})"


def registered_in_source() -> set[str]:
    """Sample names workersd's registry can export, from src/metrics.rs's registrations
    (prefix workersd_; prometheus-client adds _total to counters, _info to infos and _bucket,
    _sum, _count to histograms). A scrape misses families that have no sample yet."""
    source = (REPO / "src" / "metrics.rs").read_text()
    kinds = {}
    for var, init in re.findall(r"let (\w+) = ([^;]+);", source):
        for kind in ("Counter", "Gauge", "Histogram", "Info"):
            if re.search(rf"\b{kind}\b", init):
                kinds[var] = kind
    suffixes = {"Counter": ["_total"], "Gauge": [""], "Info": ["_info"],
                "Histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for name, var in re.findall(r'register\(\s*"(\w+)",\s*"[^"]*",\s*(\w+)\.clone\(\)', source):
        assert var in kinds, f"src/metrics.rs: cannot tell the type of {name} ({var})"
        names |= {f"workersd_{name}{suffix}" for suffix in suffixes[kinds[var]]}
    assert {"workersd_probes_total", "workersd_invalid_objects",
            "workersd_reconcile_duration_seconds_count"} <= names, names
    return names


def scraped_from_workersd(tmp_path: Path) -> set[str]:
    """Sample names of a running `workersd standalone` (collectors registered outside
    src/metrics.rs show here)."""
    targets = tmp_path / "targets.yaml"
    targets.write_text('targets:\n  - {service: probe, address: 127.0.0.1, ports: "1"}\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(workersd_binary()), "standalone", "--targets", str(targets),
         "--listen", f"127.0.0.1:{port}", "--http-sd-listen", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "workersd_probes_total" in text:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "workersd served no probe counts within 30 s"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return set(re.findall(r"(?m)^([a-zA-Z_:][\w:]*)[ {]", text))


@pytest.fixture(scope="session")
def exported_by_workersd(tmp_path_factory) -> set[str]:
    source = registered_in_source()
    scraped = scraped_from_workersd(tmp_path_factory.mktemp("workersd"))
    # The source parser sees every workersd_ family the binary exports.
    assert {n for n in scraped if n.startswith("workersd_")} <= source, scraped - source
    return source | scraped


PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are no function, keyword, label
    (inside braces or grouping parentheses) or duration."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_names_parser():
    assert metric_names(
        'sum by (service) (rate(request_processing_seconds_count{job=~"a|b"}[1m])) > 0'
    ) == {"request_processing_seconds_count"}
    assert metric_names(
        "absent(up == 1) and on (job) count by (job) (x_total offset 5m) / y"
    ) == {"up", "x_total", "y"}


def test_rules_use_exported_metrics(exported_by_workersd):
    used = set().union(*(metric_names(rule["expr"]) for rule in file_rules()))
    exported = exported_by_workersd | {"up"}
    assert used - exported == PENDING_METRICS, (
        f"not exported by workersd: {sorted(used - exported)}; pending: {sorted(PENDING_METRICS)}"
    )


# -- the chart's PrometheusRule --------------------------------------------------------------


def test_prometheus_rule_off_by_default(helm):
    assert not render(helm).of_kind("PrometheusRule")


@pytest.mark.parametrize("fullname", ["workersd", "workersd-prod"])
def test_prometheus_rule_is_the_rules_file(helm, fullname):
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    if fullname != "workersd":
        values["fullnameOverride"] = fullname
    rule = render(helm, values).one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == fullname
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "workersd"
    # The same groups and rules, with the job the ServiceMonitor's targets get.
    expected = yaml.safe_load(
        RULES_FILE.read_text().replace('job="workersd"', f'job="{fullname}"')
    )
    assert rule["spec"] == expected
    assert f'up{{job="{fullname}"}}' in rule["spec"]["groups"][0]["rules"][0]["expr"]


def test_values_all_renders_the_rule(helm):
    rule = render(helm, VALUES_ALL).one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert 'job="workersd-prod"' in yaml.safe_dump(rule["spec"])
