"""core/v1 Node specifics of fake_kube (see CONTRACT.md, "Nodes").

Pure functions on plain dicts, so server.py stays the only place that stores and raises.
Each rule names the upstream kubernetes/kubernetes file it follows.
"""

from __future__ import annotations

import ipaddress
import re

# pkg/apis/core/v1/conversion.go AddFieldLabelConversionFunc(Node): metadata.name and
# spec.unschedulable only. pkg/registry/core/node/strategy.go NodeToSelectableFields renders
# spec.unschedulable with fmt.Sprint(bool), so a node without the field is "false".
NODE_FIELD_LABELS = {
    "spec.unschedulable": lambda obj: "true" if (obj.get("spec") or {}).get("unschedulable") else "false",
}

_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def normalize(obj: dict) -> None:
    """What decoding a v1 Node does before the strategy sees it.

    pkg/apis/core/v1/conversion.go Convert_v1_NodeSpec_To_core_NodeSpec: a podCIDR alone
    becomes podCIDRs [podCIDR]; when both are set and differ, podCIDR wins and replaces the
    list. Convert_core_NodeSpec_To_v1_NodeSpec writes podCIDRs[0] back into podCIDR.
    pkg/apis/core/v1/defaults.go SetDefaults_NodeStatus: allocatable defaults to capacity.
    """
    spec = obj.get("spec")
    if isinstance(spec, dict):
        one, many = spec.get("podCIDR"), spec.get("podCIDRs")
        if one and (not many or many[0] != one):
            spec["podCIDRs"] = [one]
        elif many and not one:
            spec["podCIDR"] = many[0]
    status = obj.get("status")
    if isinstance(status, dict) and status.get("capacity") is not None and status.get("allocatable") is None:
        status["allocatable"] = dict(status["capacity"])


def prepare_for_create(obj: dict) -> None:
    """pkg/registry/core/node/strategy.go PrepareForCreate/dropDisabledFields: "Nodes allow
    *all* fields, including status, to be set on create", except the removed dynamic kubelet
    config (spec.configSource, status.config)."""
    (obj.get("spec") or {}).pop("configSource", None)
    (obj.get("status") or {}).pop("config", None)


def _label_name_causes(key, path):
    """apimachinery ValidateLabelName (IsQualifiedName): [prefix/]name."""
    if not isinstance(key, str) or not key:
        return [(path, "FieldValueRequired", "Required value")]
    prefix, _, name = key.rpartition("/")
    ok = bool(_QUALIFIED_NAME_RE.match(name)) and len(name) <= 63
    if prefix:
        ok = ok and bool(_DNS_SUBDOMAIN_RE.match(prefix)) and len(prefix) <= 253
    if ok:
        return []
    return [(path, "FieldValueInvalid",
             f'Invalid value: "{key}": name part must consist of alphanumeric characters, \'-\', \'_\' or \'.\', '
             "and must start and end with an alphanumeric character")]


def _taint_causes(taints):
    """validation.go validateNodeTaints. Upstream builds the path from "metadata", so the
    causes read metadata.taints[i].key (sic), as a real server answers."""
    if not isinstance(taints, list):
        return [("spec.taints", "FieldValueInvalid", "Invalid value: taints must be a list")]
    causes, seen = [], set()
    for i, t in enumerate(taints):
        p = f"metadata.taints[{i}]"
        t = t if isinstance(t, dict) else {}
        key, value, effect = t.get("key", ""), t.get("value", ""), t.get("effect", "")
        causes += _label_name_causes(key, p + ".key")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            causes.append((p + ".value", "FieldValueInvalid", f'Invalid value: "{value}": a valid label must be '
                           "an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start "
                           "and end with an alphanumeric character"))
        # validateTaintEffect(allowEmpty=false)
        if not effect:
            causes.append((p + ".effect", "FieldValueRequired", "Required value"))
        elif effect not in _TAINT_EFFECTS:
            causes.append((p + ".effect", "FieldValueNotSupported", f'Unsupported value: "{effect}": supported values: '
                           + ", ".join(f'"{e}"' for e in _TAINT_EFFECTS)))
        if (key, effect) in seen:
            causes.append((p, "FieldValueDuplicate", "Duplicate value: taints must be unique by key and effect pair"))
            continue
        seen.add((key, effect))
    return causes


def _pod_cidr_causes(cidrs):
    """validation.go ValidateNode: each podCIDRs entry a CIDR (IsValidCIDR), at most one per
    IP family, no duplicates."""
    if not isinstance(cidrs, list):
        return [("spec.podCIDRs", "FieldValueInvalid", "Invalid value: podCIDRs must be a list")]
    causes, nets = [], []
    for i, v in enumerate(cidrs):
        try:
            nets.append(ipaddress.ip_network(str(v), strict=False))
        except ValueError:
            causes.append((f"spec.podCIDRs[{i}]", "FieldValueInvalid",
                           f'Invalid value: "{v}": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)'))
    if len(cidrs) > 1:
        if causes or len(cidrs) > 2 or len({n.version for n in nets}) != len(nets):
            causes.append(("spec.podCIDRs", "FieldValueInvalid",
                           "Invalid value: " + repr(cidrs) + ": may specify no more than one CIDR for each IP family"))
        seen = set()
        for i, v in enumerate(cidrs):
            if v in seen:
                causes.append((f"spec.podCIDRs[{i}]", "FieldValueDuplicate", f'Duplicate value: "{v}"'))
            seen.add(v)
    return causes


def validate(obj: dict, old: dict | None) -> list:
    """validation.go ValidateNode (create and update) and ValidateNodeUpdate (update).

    The name (a DNS subdomain, ValidateNodeName = NameIsDNSSubdomain), labels and annotations
    are checked by the server's common metadata validation. Resource quantities in
    status.capacity/allocatable are not parsed (a deviation)."""
    spec = obj.get("spec") or {}
    causes = []
    if spec.get("taints"):
        causes += _taint_causes(spec["taints"])
    if spec.get("podCIDRs"):
        causes += _pod_cidr_causes(spec["podCIDRs"])
    if old is None:
        return causes
    ospec = old.get("spec") or {}
    # ValidateNodeUpdate: podCIDRs and providerID may go from "" to a value, never change after
    if ospec.get("podCIDRs") and list(ospec["podCIDRs"]) != list(spec.get("podCIDRs") or []):
        causes.append(("spec.podCIDRs", "FieldValueForbidden",
                       'Forbidden: node updates may not change podCIDR except from "" to valid'))
    if ospec.get("providerID") and ospec["providerID"] != spec.get("providerID"):
        causes.append(("spec.providerID", "FieldValueForbidden",
                       'Forbidden: node updates may not change providerID except from "" to valid'))
    if (ospec.get("externalID") or "") != (spec.get("externalID") or ""):
        causes.append(("spec.externalID", "FieldValueForbidden", "Forbidden: may not be updated"))
    addrs = set()
    for i, a in enumerate((obj.get("status") or {}).get("addresses") or []):
        k = (a.get("type"), a.get("address")) if isinstance(a, dict) else (None, repr(a))
        if k in addrs:
            causes.append((f"status.addresses[{i}]", "FieldValueDuplicate", f"Duplicate value: {a!r}"))
        addrs.add(k)
    return causes


# pkg/printers/internalversion/printers.go: nodeColumnDefinitions and printNode
TABLE_COLUMNS = [("Name", 0), ("Status", 0), ("Roles", 0), ("Age", 0), ("Version", 0),
                 ("Internal-IP", 1), ("External-IP", 1), ("OS-Image", 1), ("Kernel-Version", 1),
                 ("Container-Runtime", 1)]


def _roles(labels):
    """printers.go findNodeRoles: node-role.kubernetes.io/<role> keys, kubernetes.io/role values."""
    roles = set()
    for k, v in (labels or {}).items():
        if k.startswith("node-role.kubernetes.io/") and k[len("node-role.kubernetes.io/"):]:
            roles.add(k[len("node-role.kubernetes.io/"):])
        elif k == "kubernetes.io/role" and v:
            roles.add(v)
    return sorted(roles)


def table_cells(obj: dict, age: str) -> list:
    """One printNode row (every column; kubectl hides priority 1 unless -o wide)."""
    status = obj.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") == "Ready"]
    words = [("Ready" if ready[-1].get("status") == "True" else "NotReady")] if ready else ["Unknown"]
    if (obj.get("spec") or {}).get("unschedulable"):
        words.append("SchedulingDisabled")
    info = status.get("nodeInfo") or {}

    def addr(kind):
        return next((a.get("address") for a in status.get("addresses") or []
                     if isinstance(a, dict) and a.get("type") == kind), "<none>")

    return [(obj.get("metadata") or {}).get("name", ""), ",".join(words),
            ",".join(_roles((obj.get("metadata") or {}).get("labels"))) or "<none>", age,
            info.get("kubeletVersion", ""), addr("InternalIP"), addr("ExternalIP"),
            info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>"]


def orphan_status(status: dict, now: str) -> dict | None:
    """pkg/controller/podgc/gc_controller.go gcOrphaned/markFailedAndDeletePodWithCondition:
    the status a pod bound to a deleted node is patched to before its forced deletion, or
    None when it has already finished (Succeeded/Failed pods are deleted without a patch)."""
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    new = dict(status)
    new["phase"] = "Failed"
    cond = {"type": "DisruptionTarget", "status": "True", "lastProbeTime": None, "lastTransitionTime": now,
            "reason": "DeletionByPodGC", "message": "PodGC: node no longer exists"}
    new["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "DisruptionTarget"] + [cond]
    return new
