"""mode: daemonset of charts/workersd (issue 16, node-local mode), next to mode: deployment.

The scenarios shared with test_chart.py (hardened pod, ports, exact RBAC, flags against the
binary) already run over SCENARIOS["daemonset"]; this file checks what only the DaemonSet has.

    python3 -m pytest tests/chart/test_chart_daemonset.py
"""

from __future__ import annotations

import copy
import re

import pytest

from helm_lib import HelmError
from test_chart import (
    CHART, LEASES, NAMESPACE, NODES, RELEASE, SCENARIOS, WATCH, args_of, container, explain_lint, flag_value,
    rbac_rules, render, rendered, triples, workload,  # noqa: F401 (rendered: a fixture)
)

DAEMONSET = SCENARIOS["daemonset"]
DEPLOYMENT_SCENARIOS = [name for name, values in SCENARIOS.items() if not (values or {}).get("mode") == "daemonset"]


@pytest.fixture(scope="module")
def ds(helm):
    return render(helm, DAEMONSET)


@pytest.fixture(scope="module")
def deployment(helm):
    return render(helm, None)


def test_lint_daemonset(helm):
    result = helm.lint(CHART, DAEMONSET)
    assert result.ok, explain_lint(helm, result, DAEMONSET)
    assert not result.warnings, explain_lint(helm, result, DAEMONSET)


def test_daemonset_replaces_the_deployment(ds):
    kinds = sorted(o["kind"] for o in ds.objects if o["kind"] != "CustomResourceDefinition")
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Role", "RoleBinding", "Service",
                     "ServiceAccount"], kinds
    d = ds.one("DaemonSet")
    assert "replicas" not in d["spec"]
    assert d["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}}
    assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]


def test_no_pdb_in_daemonset_mode(helm):
    with pytest.raises(HelmError, match=re.escape("mode=daemonset has no PodDisruptionBudget")):
        render(helm, dict(DAEMONSET, podDisruptionBudget={"enabled": True, "minAvailable": 1}))


def test_node_name_from_the_downward_api(ds, deployment):
    c = container(ds)
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    args = args_of(ds)
    assert flag_value(args, "--node-name") == "$(NODE_NAME)"
    # no elected prober; the janitor's Lease keeps the flags of leader election
    assert "--leader-election" not in args and "--consul-node" not in args and "--owner-id" not in args
    assert flag_value(args, "--lease-namespace") == NAMESPACE
    assert flag_value(args, "--lease-name") == RELEASE
    assert flag_value(args, "--lease-duration") == "15s"
    # mode: deployment never gets them
    assert "NODE_NAME" not in {e["name"] for e in container(deployment)["env"]}
    assert not any(a.startswith("--node-name") for a in args_of(deployment))


def test_tolerations_applied(helm, ds):
    pod = ds.one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    plain = render(helm, {"mode": "daemonset"})
    assert "tolerations" not in plain.one("DaemonSet")["spec"]["template"]["spec"]
    assert "tolerate every taint" in plain.notes
    assert "tolerate every taint" not in ds.notes


def test_the_pod_template_is_shared(ds, deployment):
    """One helper renders both pods: they differ only by the node-local bits."""
    def strip(rendered):
        tpl = copy.deepcopy(workload(rendered)["spec"]["template"])
        spec = tpl["spec"]
        spec.pop("affinity", None)  # the leader/standby anti-affinity: mode: deployment only
        spec.pop("tolerations", None)
        c = spec["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != "NODE_NAME"]
        args, out, skip = c["args"], [], 0
        for a in args:
            if skip:
                skip -= 1
            elif a == "--leader-election":
                skip = 1
            elif not a.startswith("--node-name"):
                out.append(a)
        c["args"] = out
        return tpl
    assert strip(ds) == strip(deployment)
    assert "affinity" not in ds.one("DaemonSet")["spec"]["template"]["spec"]


def test_nodes_rbac_only_in_daemonset_mode(ds, rendered):
    cluster = [rules for (kind, _, _), rules in rbac_rules(ds).items() if kind == "ClusterRole"]
    assert len(cluster) == 1 and triples(cluster[0]) == WATCH | NODES
    # the janitor's Lease Role stays, in the release namespace
    leases = [(ns, rules) for (kind, ns, _), rules in rbac_rules(ds).items() if triples(rules) & LEASES]
    assert [(ns, triples(rules)) for ns, rules in leases] == [(NAMESPACE, LEASES)]
    for scenario in DEPLOYMENT_SCENARIOS:
        for key, rules in rbac_rules(rendered[scenario]).items():
            assert not triples(rules) & NODES, f"{scenario}: {key} reads nodes"


def test_service_routes_to_the_callers_node(ds, deployment):
    svc = ds.one("Service")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert {p["name"] for p in svc["spec"]["ports"]} == {"metrics", "http-sd"}
    assert svc["spec"]["selector"] == ds.one("DaemonSet")["spec"]["selector"]["matchLabels"]
    assert "internalTrafficPolicy" not in deployment.one("Service")["spec"]
    ports = {p["name"]: p["containerPort"] for p in container(ds)["ports"]}
    assert ports == {"metrics": 9463, "http-sd": 9464}
    assert flag_value(args_of(ds), "--http-sd-listen") == "0.0.0.0:9464"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"watchNamespaces": ["shop"]}, "mode=daemonset watches pods in all namespaces"),
        ({"leaderElection": {"enabled": False}}, "mode=daemonset needs leaderElection.enabled=true"),
        ({"consul": {"node": "workersd-x"}}, "unset consul.node"),
    ],
)
def test_daemonset_guard_rails(helm, values, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        render(helm, dict(DAEMONSET, **values))


def test_replica_count_does_not_apply(helm):
    # mode: deployment refuses replicas without leader election; a DaemonSet has none
    r = render(helm, dict(DAEMONSET, replicaCount=5, daemonset={"maxUnavailable": 3}))
    assert r.one("DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 3


def test_notes_explain_node_local_discovery(ds, helm):
    notes = ds.notes
    assert "get daemonset workersd" in notes and "janitor" in notes
    assert "workersd-kubernetes_<node name>" in notes
    assert "internalTrafficPolicy is Local" in notes
    assert f"http://{RELEASE}.{NAMESPACE}.svc:9464/targets?service=clever" in notes
    assert "__meta_kubernetes_pod_container_port_name=http-sd" in notes
    assert "served by the leader" not in notes and "stand by" not in notes
    consul = render(helm, dict(DAEMONSET, consul={"address": "127.0.0.1:8500"}, httpSd={"enabled": False})).notes
    assert "consul_sd_configs" in consul and "http_sd_configs" not in consul
