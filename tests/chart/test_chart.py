"""Tests of the Helm chart charts/workersd, with Helm's own Go library (helm_lib.py).

    bash tests/chart/fetch_helm_lib.sh      # once; the tests also call it when needed
    python3 -m pytest tests/chart

Lint and render go through Helm itself; the rendered objects are then checked against what
workersd needs and accepts: the hardened pod, the probes, RBAC exactly as the code calls the
API (tests/chart/expected_rbac.yaml, also checked against README.md), the Consul token as a
mounted file. Every flag against the real binary: test_chart_flags.py; mode: daemonset:
test_chart_daemonset.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

import helm_lib
from helm_lib import ERROR, HelmError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "workersd"
HERE = Path(__file__).resolve().parent
VALUES_ALL = yaml.safe_load((HERE / "values-all.yaml").read_text())
EXPECTED_RBAC = yaml.safe_load((HERE / "expected_rbac.yaml").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = yaml.safe_load((CHART / "values.schema.json").read_text())
NAMESPACE = "monitoring"
RELEASE = "workersd"

TOKEN_DIR = "/etc/workersd/consul-token"


# -- helpers -----------------------------------------------------------------------------------


def render(helm, values=None) -> helm_lib.Rendered:
    return helm.render(CHART, values, release=RELEASE, namespace=NAMESPACE)


def workload(rendered: helm_lib.Rendered) -> dict:
    """The Deployment (mode: deployment) or the DaemonSet (mode: daemonset): exactly one."""
    found = rendered.of_kind("Deployment") + rendered.of_kind("DaemonSet")
    assert len(found) == 1, [o["kind"] for o in found]
    return found[0]


def container(rendered: helm_lib.Rendered) -> dict:
    pod = workload(rendered)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["workersd"]
    return pod["containers"][0]


def args_of(rendered) -> list[str]:
    return [str(a) for a in container(rendered)["args"]]


def flag_value(args: list[str], flag: str) -> str:
    """The value of `flag` (`--flag value` or `--flag=value`); the flag must be there once."""
    found = []
    for i, arg in enumerate(args):
        if arg == flag:
            found.append(args[i + 1])
        elif arg.startswith(flag + "="):
            found.append(arg.split("=", 1)[1])
    assert len(found) == 1, f"{flag} expected once in {args}"
    return found[0]


def triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


WATCH = triples(EXPECTED_RBAC["watch"])
LEASES = triples(EXPECTED_RBAC["leaderElection"])
NODES = triples(EXPECTED_RBAC["nodes"])
ALLOWED = WATCH | LEASES | NODES


def rbac_rules(rendered) -> dict[tuple[str, str | None, str], list[dict]]:
    """(kind, namespace, name) -> rules of every ClusterRole and Role."""
    return {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["rules"]
        for o in rendered.objects
        if o["kind"] in ("ClusterRole", "Role")
    }


def explain_lint(helm, result: helm_lib.LintResult, values=None) -> str:
    """The lint result lacks message texts: render the same values for Helm's error text."""
    try:
        helm.render(CHART, values, release=RELEASE, namespace=NAMESPACE)
        detail = "rendering the same values succeeds"
    except HelmError as e:
        detail = str(e)
    return f"helm lint: {result.describe()} (raw {result.raw}); {detail}"


def schema_leaves(schema: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the values the schema declares; free-form maps and lists are leaves."""
    out = []
    for key, sub in schema.get("properties", {}).items():
        if key == "global":
            continue
        path = f"{prefix}{key}"
        if "properties" in sub:
            out += schema_leaves(sub, path + ".")
        else:
            out.append(path)
    return out


def lookup(values: dict, path: str):
    node = values
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"{path} missing"
        node = node[part]
    return node


# Value sets every structural test runs over.
SCENARIOS = {
    "defaults": None,
    "values-all": VALUES_ALL,
    "no-leader-election": {"replicaCount": 1, "leaderElection": {"enabled": False}},
    "consul-only": {
        "consul": {"address": "127.0.0.1:8500", "tokenSecret": {"name": "consul-acl"}},
        "httpSd": {"enabled": False},
    },
    "one-namespace": {"watchNamespaces": ["shop"]},
    "daemonset": {"mode": "daemonset", "tolerations": [{"operator": "Exists"}]},
}


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, helm_lib.Rendered]:
    return {name: render(helm, values) for name, values in SCENARIOS.items()}


# -- the library -------------------------------------------------------------------------------


def test_library_loads(helm):
    assert helm.version.startswith("helm-sdkpy-v"), helm.version


def test_lint_reports_template_errors(helm, tmp_path):
    """Guards the lint result parsing: a broken chart must not pass as clean."""
    broken = tmp_path / "workersd"
    shutil.copytree(CHART, broken)
    with open(broken / "templates" / "service.yaml", "a") as f:
        f.write("\n{{ .Values.no.such.value }}\n")
    result = helm.lint(broken)
    assert not result.ok
    assert (ERROR, "templates/") in result.errors, result.describe()


# -- 1. lint -----------------------------------------------------------------------------------


def test_lint_defaults(helm):
    result = helm.lint(CHART)
    assert result.ok, explain_lint(helm, result)
    assert not result.warnings, explain_lint(helm, result)


def test_lint_values_all(helm):
    result = helm.lint(CHART, VALUES_ALL)
    assert result.ok, explain_lint(helm, result, VALUES_ALL)
    assert not result.warnings, explain_lint(helm, result, VALUES_ALL)


@pytest.mark.parametrize(
    "bad, pointer",
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicas": 2}, "replicas"),  # unknown key: additionalProperties false
        ({"consul": {"adress": "127.0.0.1:8500"}}, "adress"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"probe": {"interval": "ten seconds"}}, "/probe/interval"),
        ({"probe": {"concurrency": 0}}, "/probe/concurrency"),
        ({"probe": {"liveness": "poll"}}, "/probe/liveness"),
        ({"serviceNameTemplate": "{pod}-{service}"}, "/serviceNameTemplate"),
        ({"watchNamespaces": ["Shop"]}, "/watchNamespaces/0"),
        ({"httpSd": {"port": 70000}}, "/httpSd/port"),
        ({"clusterName": "prod eu"}, "/clusterName"),
        ({"mode": "statefulset"}, "/mode"),
        ({"mode": "daemonset", "daemonset": {"maxUnavailable": 0}}, "/daemonset/maxUnavailable"),
    ],
)
def test_schema_rejects_bad_values(helm, bad, pointer):
    lint = helm.lint(CHART, bad)
    assert not lint.ok and (ERROR, "values.yaml") in lint.errors, lint.describe()
    with pytest.raises(HelmError, match="schema") as info:
        render(helm, bad)
    assert pointer in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"leaderElection": {"enabled": False}}, "needs leaderElection.enabled=true"),
        ({"httpSd": {"enabled": False}}, "nothing would publish"),
        ({"httpSd": {"port": 9463}}, "must differ"),
        ({"consul": {"tokenSecret": {"name": "x"}}}, "need consul.address"),
    ],
)
def test_guard_rails(helm, values, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        render(helm, values)


# -- 2. rendered objects -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_is_hardened(rendered, scenario):
    pod = workload(rendered[scenario])["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container(rendered[scenario])["securityContext"]
    assert csc["runAsNonRoot"] is True and csc["runAsUser"] == 65532
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["privileged"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    # The token is mounted only where it is needed: this pod, not the ServiceAccount.
    assert pod["automountServiceAccountToken"] is True
    for sa in rendered[scenario].of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] in {
        sa["metadata"]["name"] for sa in rendered[scenario].of_kind("ServiceAccount")
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_and_ports(rendered, scenario):
    c = container(rendered[scenario])
    values = helm_lib.merge_values(DEFAULTS, SCENARIOS[scenario] or {})
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == values["metrics"]["port"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    args = args_of(rendered[scenario])
    assert args[0] == "kubernetes" and c["command"] == ["workersd"]
    assert flag_value(args, "--listen") == f"0.0.0.0:{values['metrics']['port']}"
    service = rendered[scenario].one("Service")
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    if values["httpSd"]["enabled"]:
        assert flag_value(args, "--http-sd-listen") == f"0.0.0.0:{values['httpSd']['port']}"
        assert ports["http-sd"] == values["httpSd"]["port"]
        assert service_ports == {
            "metrics": (values["metrics"]["port"], "metrics"),
            "http-sd": (values["httpSd"]["port"], "http-sd"),
        }
    else:
        assert flag_value(args, "--http-sd-listen") == "off"
        assert "http-sd" not in ports
        assert service_ports == {"metrics": (values["metrics"]["port"], "metrics")}
    assert service["spec"]["selector"] == workload(rendered[scenario])["spec"]["selector"]["matchLabels"]


def test_leader_election(rendered):
    default = rendered["defaults"]
    deployment = default.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = args_of(default)
    assert flag_value(args, "--leader-election") == "true"
    assert flag_value(args, "--lease-namespace") == NAMESPACE
    assert flag_value(args, "--lease-duration") == "15s"
    env = {e["name"]: e for e in container(default)["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    lease_roles = [r for r in default.of_kind("Role") if triples(r["rules"]) == LEASES]
    assert [r["metadata"]["namespace"] for r in lease_roles] == [NAMESPACE]

    single = rendered["no-leader-election"]
    args = args_of(single)
    assert flag_value(args, "--leader-election") == "false"
    assert "--lease-namespace" not in args
    assert single.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(triples(r["rules"]) & LEASES for r in single.of_kind("Role"))


def test_values_all_options_reach_the_pod(rendered):
    r = rendered["values-all"]
    deployment = r.one("Deployment")
    pod = deployment["spec"]["template"]
    c = container(r)
    args = args_of(r)
    v = VALUES_ALL
    assert deployment["metadata"]["name"] == v["fullnameOverride"]
    assert deployment["spec"]["replicas"] == v["replicaCount"]
    assert c["image"] == f"{v['image']['repository']}:{v['image']['tag']}"
    assert c["imagePullPolicy"] == v["image"]["pullPolicy"]
    assert pod["spec"]["imagePullSecrets"] == v["imagePullSecrets"]
    assert pod["spec"]["serviceAccountName"] == v["serviceAccount"]["name"]
    sa = r.one("ServiceAccount")
    assert sa["metadata"]["annotations"] == v["serviceAccount"]["annotations"]
    assert flag_value(args, "--cluster-name") == v["clusterName"]
    assert flag_value(args, "--namespaces") == ",".join(v["watchNamespaces"])
    assert flag_value(args, "--service-name-template") == v["serviceNameTemplate"]
    assert "--allow-host-network" in args
    assert flag_value(args, "--consul-addr") == v["consul"]["address"]
    assert flag_value(args, "--consul-datacenter") == v["consul"]["datacenter"]
    assert flag_value(args, "--consul-node") == v["consul"]["node"]
    assert flag_value(args, "--probe-interval") == v["probe"]["interval"]
    assert flag_value(args, "--probe-timeout") == v["probe"]["timeout"]
    assert flag_value(args, "--probe-concurrency") == str(v["probe"]["concurrency"])
    assert flag_value(args, "--fast-interval") == v["probe"]["fastInterval"]
    assert flag_value(args, "--fast-period") == v["probe"]["fastPeriod"]
    assert flag_value(args, "--full-sweep-interval") == v["probe"]["fullSweepInterval"]
    assert flag_value(args, "--liveness") == v["probe"]["liveness"]
    assert flag_value(args, "--lease-duration") == v["leaderElection"]["leaseDuration"]
    assert flag_value(args, "--lease-name") == v["fullnameOverride"]
    assert flag_value(args, "--log-format") == v["logFormat"]
    assert args[-len(v["extraArgs"]):] == v["extraArgs"]
    assert {"name": "WORKERSD_LOG", "value": "debug"} in c["env"]
    assert c["resources"] == v["resources"]
    assert pod["spec"]["nodeSelector"] == v["nodeSelector"]
    assert pod["spec"]["tolerations"] == v["tolerations"]
    assert pod["spec"]["affinity"] == v["affinity"]
    assert pod["metadata"]["annotations"] == v["podAnnotations"]
    assert pod["metadata"]["labels"]["team"] == "platform"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == v["nameOverride"]
    service = r.one("Service")
    assert service["spec"]["type"] == v["service"]["type"]
    assert service["metadata"]["annotations"] == v["service"]["annotations"]

    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == v["podDisruptionBudget"]["minAvailable"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    monitor = r.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": v["serviceMonitor"]["interval"]}
    ]
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_optional_objects_off_by_default(rendered):
    kinds = {o["kind"] for o in rendered["defaults"].objects}
    assert kinds == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "Service", "Deployment",
    }
    pod = rendered["defaults"].one("Deployment")["spec"]["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in container(rendered["defaults"])
    assert "imagePullSecrets" not in pod


# -- RBAC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_rules_are_allowed_and_exact(rendered, scenario):
    r = rendered[scenario]
    values = helm_lib.merge_values(DEFAULTS, SCENARIOS[scenario] or {})
    roles = rbac_rules(r)
    union: set = set()
    for key, rules in roles.items():
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"wildcard in {key}: {rule}"
            assert not rule.get("nonResourceURLs"), f"{key}: {rule}"
        got = triples(rules)
        assert got <= ALLOWED, f"{key} grants more than workersd calls: {got - ALLOWED}"
        union |= got
    expected = WATCH | (LEASES if values["leaderElection"]["enabled"] else set())
    expected |= NODES if values["mode"] == "daemonset" else set()
    assert union == expected, f"missing {expected - union}, extra {union - expected}"
    # Every role is bound to the chart's ServiceAccount, and only to it.
    sa = workload(r)["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [o for o in r.objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    bound = {
        (b["roleRef"]["kind"], b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None,
         b["roleRef"]["name"])
        for b in bindings
    }
    assert bound == set(roles), f"bindings {bound} vs roles {set(roles)}"
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


def test_rbac_cluster_wide_by_default(rendered):
    roles = rbac_rules(rendered["defaults"])
    cluster = [rules for (kind, _, _), rules in roles.items() if kind == "ClusterRole"]
    assert len(cluster) == 1 and triples(cluster[0]) == WATCH
    assert flag_value(args_of(rendered["defaults"]), "--service-name-template") == "{service}"
    assert "--namespaces" not in args_of(rendered["defaults"])


@pytest.mark.parametrize("scenario", ["values-all", "one-namespace"])
def test_rbac_per_namespace_with_watch_namespaces(rendered, scenario):
    r = rendered[scenario]
    namespaces = SCENARIOS[scenario]["watchNamespaces"]
    assert not r.of_kind("ClusterRole") and not r.of_kind("ClusterRoleBinding")
    roles = rbac_rules(r)
    watch_roles = {ns: rules for (kind, ns, _), rules in roles.items() if triples(rules) == WATCH}
    assert sorted(watch_roles) == sorted(namespaces)
    # Pods are only readable in the watched namespaces; leases only in the release namespace.
    for (kind, ns, name), rules in roles.items():
        if ("", "pods", "list") in triples(rules):
            assert kind == "Role" and ns in namespaces
        if triples(rules) & LEASES:
            assert kind == "Role" and ns == NAMESPACE and triples(rules) == LEASES
    assert flag_value(args_of(r), "--namespaces") == ",".join(namespaces)


def test_readme_rbac_block_matches_expected():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### RBAC", 1)[1]
    roles, node_local = re.findall(r"```yaml\n(.*?)```", section.split("\n### ", 1)[0], re.S)
    docs = [d for d in yaml.safe_load_all(roles) if d]
    by_kind = {d["kind"]: d["rules"] for d in docs}
    assert set(by_kind) == {"ClusterRole", "Role"}
    assert by_kind["ClusterRole"] == EXPECTED_RBAC["watch"]
    assert by_kind["Role"] == EXPECTED_RBAC["leaderElection"]
    assert yaml.safe_load(node_local) == EXPECTED_RBAC["nodes"]


# -- Consul token and TLS ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["values-all", "consul-only"])
def test_consul_token_is_a_mounted_secret_file(rendered, scenario):
    r = rendered[scenario]
    values = helm_lib.merge_values(DEFAULTS, SCENARIOS[scenario])
    secret = values["consul"]["tokenSecret"]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    c = container(r)
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_volume = volumes["consul-token"]["secret"]
    assert token_volume["secretName"] == secret["name"]
    assert token_volume["items"] == [{"key": secret["key"], "path": "token"}]
    assert token_volume["defaultMode"] == 0o440
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["consul-token"] == {"name": "consul-token", "mountPath": TOKEN_DIR, "readOnly": True}
    assert flag_value(args_of(r), "--consul-token-file") == f"{TOKEN_DIR}/token"
    # Never as an env value or argument.
    for env in c.get("env", []):
        assert env["name"] not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"), env
        assert "secretKeyRef" not in env.get("valueFrom", {}), env
    assert "envFrom" not in c
    assert not any("token" in a and a != f"{TOKEN_DIR}/token" and a != "--consul-token-file"
                   for a in args_of(r))


def test_consul_tls_secrets_mounted_and_passed(rendered, helm):
    r = rendered["values-all"]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
    assert volumes["consul-ca"] == VALUES_ALL["consul"]["tls"]["caSecret"]
    assert volumes["consul-client-cert"] == VALUES_ALL["consul"]["tls"]["clientCertSecret"]
    mounts = {m["name"]: m for m in container(r)["volumeMounts"]}
    assert mounts["consul-ca"]["readOnly"] and mounts["consul-client-cert"]["readOnly"]
    args = args_of(r)
    flag = lambda name: args[args.index(name) + 1]
    assert flag("--consul-ca-file") == "/etc/workersd/consul-tls/ca/ca.crt"
    assert flag("--consul-client-cert") == "/etc/workersd/consul-tls/client/tls.crt"
    assert flag("--consul-client-key") == "/etc/workersd/consul-tls/client/tls.key"
    assert flag("--consul-tls-server-name") == VALUES_ALL["consul"]["tls"]["serverName"]
    # Only what is set is mounted.
    only_ca = render(helm, {"consul": {"address": "127.0.0.1:8500", "tls": {"caSecret": "ca"}}})
    pod = only_ca.one("Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["consul-ca"]


# -- NOTES -------------------------------------------------------------------------------------


def test_notes_tell_the_next_step(rendered, helm):
    notes = rendered["defaults"].notes
    assert "workersd.io/service:" in notes and "workersd.io/ports.web:" in notes
    assert "kind: WorkerMetrics" in notes
    assert f"http://{RELEASE}.{NAMESPACE}.svc:9464/targets?service=clever" in notes
    assert "consul_sd_configs" not in notes

    consul = rendered["consul-only"].notes
    assert "consul_sd_configs" in consul and "server: 127.0.0.1:8500" in consul
    assert "regex: workersd" in consul and "action: keep" in consul
    assert "__meta_consul_service_metadata_metrics_path" in consul
    assert "http_sd_configs" not in consul

    scoped = rendered["values-all"].notes
    assert "Only pods in shop, web are watched" in scoped
    assert "consul_sd_configs" in scoped and "server: consul.consul.svc:8500" in scoped
    assert "services: [shop-clever]" in scoped and "/targets?service=shop-clever" in scoped

    https = render(helm, {"consul": {"address": "https://consul.example:8501"}}).notes
    assert "server: consul.example:8501" in https and "scheme: https" in https


# -- values, schema, docs stay in step ---------------------------------------------------------


def test_schema_values_readme_values_all_in_step():
    leaves = schema_leaves(SCHEMA)
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    for path in leaves:
        lookup(DEFAULTS, path)  # every schema value has a default in values.yaml
        value = lookup(VALUES_ALL, path)  # and is set in values-all.yaml
        if path not in ("service.type",):
            assert value != lookup(DEFAULTS, path) or path in (
                "serviceAccount.create", "leaderElection.enabled", "httpSd.enabled",
                "podDisruptionBudget.minAvailable",
                # values-all exercises mode: deployment (watchNamespaces, consul.node and the
                # PDB are refused in mode: daemonset); tests/chart/test_chart_daemonset.py
                "mode",
            ), f"values-all.yaml keeps the default of {path}"
    assert documented == set(leaves), (
        f"chart README: undocumented {sorted(set(leaves) - documented)}, "
        f"unknown {sorted(documented - set(leaves))}"
    )
    # values.yaml has nothing the schema does not know (additionalProperties: false).
    def walk(values, schema, prefix=""):
        for key, value in values.items():
            assert key in schema.get("properties", {}), f"{prefix}{key} not in the schema"
            sub = schema["properties"][key]
            if "properties" in sub and isinstance(value, dict):
                walk(value, sub, f"{prefix}{key}.")
    walk(DEFAULTS, SCHEMA)
    walk(VALUES_ALL, SCHEMA)


# -- 3. CRD ------------------------------------------------------------------------------------


def test_chart_crd_is_the_committed_crd():
    chart_crd = (CHART / "crds" / "workermetrics.yaml").read_bytes()
    committed = (REPO / "crds" / "workermetrics.yaml").read_bytes()
    assert chart_crd == committed, (
        "charts/workersd/crds/workermetrics.yaml differs from crds/workermetrics.yaml: "
        "cp crds/workermetrics.yaml charts/workersd/crds/workermetrics.yaml"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["workermetrics.yaml"]


def test_install_sends_the_crd_first(rendered):
    sent = rendered["defaults"].sent
    assert sent[0]["kind"] == "CustomResourceDefinition"
    assert sent[0]["metadata"]["name"] == "workermetrics.workersd.io"
