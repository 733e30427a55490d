#!/usr/bin/env python3
"""fake_kube: a small, faithful fake Kubernetes API server for black-box tests.

Plain HTTP on loopback, JSON only, no auth. Serves core/v1 pods, nodes, namespaces and
events, events.k8s.io/v1 events, coordination.k8s.io/v1 leases,
apiextensions.k8s.io/v1 customresourcedefinitions and the workersd.io/v1alpha1
WorkerMetrics custom resource (plus any CRD created at run time), with list,
watch (bookmarks, 410 Expired), optimistic concurrency, status subresources and
merge / strategic-merge / JSON / apply patches. Test controls live under
/_control/ on the same port. See CONTRACT.md next to this file.

Run (from anywhere; stdlib only, PyYAML optional for YAML seeds / apply patches):

    python3 tests/support/fake_kube/server.py --listen 127.0.0.1:0 \
        --ready-file /tmp/fk.url --kubeconfig-out /tmp/fk.kubeconfig
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import json
import os
import random
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

try:  # a package (tests.support.fake_kube, fake_kube) or a script next to nodes.py
    from . import nodes as node_rules
except ImportError:
    import nodes as node_rules  # type: ignore

try:  # optional: YAML seeds and application/apply-patch+yaml bodies
    import yaml  # type: ignore
except Exception:  # pragma: no cover
    yaml = None

SERVER_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-fake-kube",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
JSON_CT = "application/json"


def now_ts() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ts_at(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def deep_copy(obj):
    return json.loads(json.dumps(obj))


# ---------------------------------------------------------------------------
# Errors (metav1.Status)
# ---------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None, headers=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict:
        st = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            st["details"] = self.details
        return st


def _details(rd, name=None):
    d = {"kind": rd.plural}
    if rd.group:
        d["group"] = rd.group
    if name:
        d["name"] = name
    return d


def err_not_found(rd, name):
    return ApiError(404, "NotFound", f'{rd.qualified} "{name}" not found', _details(rd, name))


def err_already_exists(rd, name):
    return ApiError(409, "AlreadyExists", f'{rd.qualified} "{name}" already exists', _details(rd, name))


def err_conflict(rd, name, why=None):
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rd.qualified} "{name}": {why}', _details(rd, name))


def err_bad_request(msg):
    return ApiError(400, "BadRequest", msg)


def err_invalid(rd, name, causes):
    """causes: list of (field, reason, message)."""
    text = ", ".join(f"{f}: {m}" for f, _, m in causes)
    det = {"name": name or "", "kind": rd.kind, "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]}
    if rd.group:
        det["group"] = rd.group
    if len(causes) > 1:
        text = "[" + text + "]"
    gk = f"{rd.kind}.{rd.group}" if rd.group else rd.kind  # schema.GroupKind.String()
    return ApiError(422, "Invalid", f'{gk} "{name or ""}" is invalid: {text}', det)


class _GroupKind:
    """Just enough of a ResourceDef for err_invalid on request options."""

    def __init__(self, group, kind):
        self.group, self.kind = group, kind


LIST_OPTIONS = _GroupKind("meta.k8s.io", "ListOptions")  # 'ListOptions.meta.k8s.io "" is invalid: ...'


def err_expired(msg):
    return ApiError(410, "Expired", msg)


def err_method_not_allowed():
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def err_path_not_found():
    return ApiError(404, "NotFound", "the server could not find the requested resource")


# ---------------------------------------------------------------------------
# Resource definitions and registry
# ---------------------------------------------------------------------------

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SUB_VERBS = ["get", "patch", "update"]


class ResourceDef:
    """One served group/version/resource."""

    def __init__(self, group, version, plural, kind, namespaced, *, singular=None, short_names=(),
                 verbs=None, status=False, generation=False, categories=(), storage=None,
                 field_labels=None, custom=False, printer_columns=None, builtin_view=None):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.list_kind = kind + "List"
        self.namespaced = namespaced
        self.singular = singular if singular is not None else kind.lower()
        self.short_names = list(short_names)
        self.verbs = list(verbs or ALL_VERBS)
        self.status = status  # status subresource enabled
        self.generation = generation  # metadata.generation tracked on spec changes
        self.categories = list(categories)
        self.storage = storage or f"{group}/{plural}"
        self.custom = custom
        self.printer_columns = printer_columns or []
        self.view = builtin_view  # (to_view, from_view) for converted views (events.k8s.io)
        self.schema = None  # custom resources: the version's openAPIV3Schema (structural)
        fl = {"metadata.name": ("metadata", "name")}
        if namespaced:
            fl["metadata.namespace"] = ("metadata", "namespace")
        fl.update(field_labels or {})
        self.field_labels = fl

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self):
        return self.api_version

    @property
    def qualified(self):
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def to_view(self, obj: dict) -> dict:
        """Stored form -> served form (a new dict when anything changes)."""
        if self.view:
            return self.view[0](obj)
        if obj.get("apiVersion") != self.api_version or obj.get("kind") != self.kind:
            obj = dict(obj)
            obj["apiVersion"] = self.api_version
            obj["kind"] = self.kind
        return obj

    def identity_view(self, obj: dict) -> bool:
        return self.view is None and obj.get("apiVersion") == self.api_version and obj.get("kind") == self.kind

    def from_view(self, obj: dict) -> dict:
        if self.view:
            return self.view[1](obj)
        obj["apiVersion"] = self.api_version
        obj["kind"] = self.kind
        return obj


# events.k8s.io/v1 <-> core/v1 Event (one storage, like the real server)
_EV_MAP = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
]


def _events_to_view(core: dict) -> dict:
    out = {}
    rev = {c: e for e, c in _EV_MAP}
    for k, v in core.items():
        out[rev.get(k, k)] = v
    out["apiVersion"] = "events.k8s.io/v1"
    out["kind"] = "Event"
    return out


def _events_from_view(ev: dict) -> dict:
    out = {}
    fwd = dict(_EV_MAP)
    for k, v in ev.items():
        out[fwd.get(k, k)] = v
    out["apiVersion"] = "v1"
    out["kind"] = "Event"
    return out


def _core_events_view(obj):
    if obj.get("apiVersion") == "v1" and obj.get("kind") == "Event":
        return obj
    o = dict(obj)
    o["apiVersion"], o["kind"] = "v1", "Event"
    return o


def _core_events_from(obj):
    obj["apiVersion"], obj["kind"] = "v1", "Event"
    return obj


EVENT_FIELD_LABELS = {
    "involvedObject.kind": ("involvedObject", "kind"),
    "involvedObject.namespace": ("involvedObject", "namespace"),
    "involvedObject.name": ("involvedObject", "name"),
    "involvedObject.uid": ("involvedObject", "uid"),
    "involvedObject.apiVersion": ("involvedObject", "apiVersion"),
    "involvedObject.resourceVersion": ("involvedObject", "resourceVersion"),
    "involvedObject.fieldPath": ("involvedObject", "fieldPath"),
    "reason": ("reason",),
    "reportingComponent": ("reportingComponent",),
    "source": ("source", "component"),
    "type": ("type",),
}
# events.k8s.io/v1 spellings, mapped onto the same stored (core) fields
EVENTS_V1_FIELD_LABELS = dict(EVENT_FIELD_LABELS)
EVENTS_V1_FIELD_LABELS.update({
    "regarding.kind": ("involvedObject", "kind"),
    "regarding.namespace": ("involvedObject", "namespace"),
    "regarding.name": ("involvedObject", "name"),
    "regarding.uid": ("involvedObject", "uid"),
    "regarding.apiVersion": ("involvedObject", "apiVersion"),
    "regarding.resourceVersion": ("involvedObject", "resourceVersion"),
    "regarding.fieldPath": ("involvedObject", "fieldPath"),
    "reportingController": ("reportingComponent",),
    "deprecatedSource": ("source", "component"),
})

POD_FIELD_LABELS = {
    "spec.nodeName": ("spec", "nodeName"),
    "spec.restartPolicy": ("spec", "restartPolicy"),
    "spec.schedulerName": ("spec", "schedulerName"),
    "spec.serviceAccountName": ("spec", "serviceAccountName"),
    "spec.hostNetwork": ("spec", "hostNetwork"),
    "status.phase": ("status", "phase"),
    "status.podIP": ("status", "podIP"),
    "status.nominatedNodeName": ("status", "nominatedNodeName"),
}

# The built-in WorkerMetrics CRD is the repository's own (crds/workermetrics.yaml, generated by
# `workersd crd`), so the schema a real cluster would enforce is the one enforced here.
WORKERMETRICS_CRD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                      "crds", "workermetrics.yaml")


def load_workermetrics_crd(path=WORKERMETRICS_CRD_PATH) -> dict:
    if yaml is None:
        raise RuntimeError("PyYAML is needed to load the WorkerMetrics CRD from " + path)
    with open(path) as f:
        crd = yaml.safe_load(f)
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise RuntimeError(f"{path} is not a CustomResourceDefinition")
    return crd


# ---------------------------------------------------------------------------
# Structural schemas of custom resources
# ---------------------------------------------------------------------------
#
# What a real apiserver does to a custom resource before storing it (apiextensions-apiserver
# pkg/apiserver/customresource_handler.go, unstructuredSchemaCoercer.apply, then the
# unstructuredDefaulter and the strategy's validation):
#   1. prune fields the schema does not declare (schema/pruning/algorithm.go; at the root
#      apiVersion, kind and metadata are kept; x-kubernetes-preserve-unknown-fields stops it),
#   2. drop `null` where the field is not nullable and has no default
#      (schema/defaulting/prunenulls.go),
#   3. apply `default`s to missing fields and to non-nullable nulls (schema/defaulting/algorithm.go),
#   4. validate against the OpenAPI schema with kube-openapi's validator
#      (apiextensions-apiserver pkg/apiserver/validation/validation.go maps its errors to
#      field errors: wrong type -> FieldValueTypeInvalid, missing -> FieldValueRequired, ...).
# Not modelled: x-kubernetes-validations (CEL), list-type/map-type uniqueness, formats
# other than date-time, embedded resources, metadata coercion beyond keeping it.

_REQ = threading.local()  # per request: fieldValidation directive and Warning headers

_RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _schema_join(path, key):
    return f"{path}.{key}" if path else str(key)


def schema_prune(x, s, path="", root=False, unknown=None):
    """Drop fields the structural schema `s` does not declare; returns their paths."""
    unknown = [] if unknown is None else unknown
    if not isinstance(s, dict):
        return unknown
    if isinstance(x, dict):
        props = s.get("properties") or {}
        addl = s.get("additionalProperties")
        preserve = bool(s.get("x-kubernetes-preserve-unknown-fields"))
        for k in list(x):
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if k in props:
                schema_prune(x[k], props[k], _schema_join(path, k), False, unknown)
            elif isinstance(addl, dict):
                schema_prune(x[k], addl, _schema_join(path, k), False, unknown)
            elif addl is True or preserve:
                continue
            else:
                unknown.append(_schema_join(path, k))
                del x[k]
    elif isinstance(x, list) and isinstance(s.get("items"), dict):
        for i, v in enumerate(x):
            schema_prune(v, s["items"], f"{path}[{i}]", False, unknown)
    return unknown


def _field_schema(s, k):
    if not isinstance(s, dict):
        return None
    props = s.get("properties") or {}
    if k in props:
        return props[k]
    addl = s.get("additionalProperties")
    return addl if isinstance(addl, dict) else None


def schema_prune_nulls(x, s):
    """Remove non-nullable nulls without a default from objects (prunenulls.go)."""
    if isinstance(x, dict):
        for k in list(x):
            fs = _field_schema(s, k)
            if x[k] is None and fs is not None and not fs.get("nullable") and "default" not in fs:
                del x[k]
            else:
                schema_prune_nulls(x[k], fs)
    elif isinstance(x, list):
        items = s.get("items") if isinstance(s, dict) else None
        for v in x:
            schema_prune_nulls(v, items)


def schema_default(x, s):
    """Apply `default`s to missing fields and non-nullable nulls (defaulting/algorithm.go)."""
    if not isinstance(s, dict):
        return
    if isinstance(x, dict):
        for k, prop in (s.get("properties") or {}).items():
            if "default" in prop and (k not in x or (x[k] is None and not prop.get("nullable"))):
                x[k] = deep_copy(prop["default"])
        addl = s.get("additionalProperties")
        for k in x:
            props = s.get("properties") or {}
            if k in props:
                schema_default(x[k], props[k])
            elif isinstance(addl, dict):
                if x[k] is None and not addl.get("nullable") and "default" in addl:
                    x[k] = deep_copy(addl["default"])
                schema_default(x[k], addl)
    elif isinstance(x, list) and isinstance(s.get("items"), dict):
        it = s["items"]
        for i in range(len(x)):
            if x[i] is None and not it.get("nullable") and "default" in it:
                x[i] = deep_copy(it["default"])
            schema_default(x[i], it)


def _json_type(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _go_value(v):
    return json.dumps(v) if isinstance(v, str) else (json.dumps(v) if v is not None else "null")


def schema_validate(x, s, path="", root=False, causes=None):
    """kube-openapi validation of `x` against `s`; causes are (field, reason, message)."""
    causes = [] if causes is None else causes
    if not isinstance(s, dict):
        return causes
    shown = path or "<root>"
    if x is None:
        if s.get("nullable") or not s.get("type"):
            return causes
        causes.append((shown, "FieldValueTypeInvalid",
                       f'Invalid value: "null": {shown} in body must be of type {s["type"]}: "null"'))
        return causes
    want = s.get("type")
    got = _json_type(x)
    if s.get("x-kubernetes-int-or-string"):
        if got not in ("integer", "string"):
            causes.append((shown, "FieldValueTypeInvalid",
                           f'Invalid value: "{got}": {shown} in body must be of type integer,string: "{got}"'))
            return causes
    elif want and not (want == got or (want == "number" and got == "integer")):
        causes.append((shown, "FieldValueTypeInvalid",
                       f'Invalid value: "{got}": {shown} in body must be of type {want}: "{got}"'))
        return causes
    if "enum" in s and x not in s["enum"]:
        supported = ", ".join(_go_value(e) for e in s["enum"])
        causes.append((shown, "FieldValueNotSupported", f"Unsupported value: {_go_value(x)}: supported values: {supported}"))
    if got in ("integer", "number"):
        if "minimum" in s and (x < s["minimum"] or (s.get("exclusiveMinimum") and x == s["minimum"])):
            rel = "greater than" if s.get("exclusiveMinimum") else "greater than or equal to"
            causes.append((shown, "FieldValueInvalid",
                           f"Invalid value: {x}: {shown} in body should be {rel} {_num(s['minimum'])}"))
        if "maximum" in s and (x > s["maximum"] or (s.get("exclusiveMaximum") and x == s["maximum"])):
            rel = "less than" if s.get("exclusiveMaximum") else "less than or equal to"
            causes.append((shown, "FieldValueInvalid",
                           f"Invalid value: {x}: {shown} in body should be {rel} {_num(s['maximum'])}"))
    if got == "string":
        if "maxLength" in s and len(x) > s["maxLength"]:
            causes.append((shown, "FieldValueTooLong", f"Too long: may not be more than {s['maxLength']} bytes"))
        if "minLength" in s and len(x) < s["minLength"]:
            causes.append((shown, "FieldValueInvalid",
                           f'Invalid value: "{x}": {shown} in body should be at least {s["minLength"]} chars long'))
        if "pattern" in s and not re.search(s["pattern"], x):
            causes.append((shown, "FieldValueInvalid",
                           f'Invalid value: "{x}": {shown} in body should match \'{s["pattern"]}\''))
        if s.get("format") == "date-time" and not _RFC3339_RE.match(x):
            causes.append((shown, "FieldValueInvalid",
                           f'Invalid value: "{x}": {shown} in body must be of type date-time: "{x}"'))
    if got == "array":
        if "maxItems" in s and len(x) > s["maxItems"]:
            causes.append((shown, "FieldValueTooMany", f"Too many: {len(x)}: must have at most {s['maxItems']} items"))
        if "minItems" in s and len(x) < s["minItems"]:
            causes.append((shown, "FieldValueInvalid",
                           f"Invalid value: {len(x)}: {shown} in body should have at least {s['minItems']} items"))
        if isinstance(s.get("items"), dict):
            for i, v in enumerate(x):
                schema_validate(v, s["items"], f"{path}[{i}]", False, causes)
    if got == "object":
        for r in s.get("required") or []:
            if r not in x:
                causes.append((_schema_join(path, r), "FieldValueRequired", "Required value"))
        props = s.get("properties") or {}
        addl = s.get("additionalProperties")
        for k, v in x.items():
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if k in props:
                schema_validate(v, props[k], _schema_join(path, k), False, causes)
            elif isinstance(addl, dict):
                schema_validate(v, addl, _schema_join(path, k), False, causes)
    return causes


def _num(v):
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def coerce_custom_resource(rd, obj):
    """Prune, default and validate `obj` in place; returns (unknown field paths, causes)."""
    s = rd.schema
    if s is None:
        return [], []
    unknown = schema_prune(obj, s, "", True)
    schema_prune_nulls(obj, s)
    schema_default(obj, s)
    return unknown, schema_validate(obj, s, "", True)


def crd_to_defs(crd: dict) -> list:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group")
    plural = names.get("plural")
    kind = names.get("kind")
    if not group or not plural or not kind:
        raise ValueError("CRD needs spec.group, spec.names.plural and spec.names.kind")
    namespaced = spec.get("scope", "Namespaced") == "Namespaced"
    defs = []
    for v in spec.get("versions") or []:
        if not v.get("served", True):
            continue
        fl = {}
        for sf in v.get("selectableFields") or []:
            jp = (sf.get("jsonPath") or "").lstrip(".")
            if jp:
                fl[jp] = tuple(jp.split("."))
        rd = ResourceDef(
            group, v["name"], plural, kind, namespaced,
            singular=names.get("singular") or kind.lower(),
            short_names=names.get("shortNames") or (),
            categories=names.get("categories") or (),
            status="status" in (v.get("subresources") or {}),
            generation=True, custom=True, field_labels=fl,
            printer_columns=v.get("additionalPrinterColumns") or [],
        )
        if names.get("listKind"):
            rd.list_kind = names["listKind"]
        rd.schema = (v.get("schema") or {}).get("openAPIV3Schema")
        defs.append(rd)
    return defs


def builtin_defs() -> list:
    return [
        ResourceDef("", "v1", "pods", "Pod", True, short_names=["po"], categories=["all"], status=True,
                    generation=True, field_labels=POD_FIELD_LABELS),
        ResourceDef("", "v1", "namespaces", "Namespace", False, short_names=["ns"],
                    verbs=["create", "delete", "get", "list", "patch", "update", "watch"], status=True,
                    field_labels={"status.phase": ("status", "phase")}),
        ResourceDef("", "v1", "nodes", "Node", False, short_names=["no"], status=True,
                    field_labels=node_rules.NODE_FIELD_LABELS),
        ResourceDef("", "v1", "events", "Event", True, short_names=["ev"], storage="core/events",
                    field_labels=EVENT_FIELD_LABELS, builtin_view=(_core_events_view, _core_events_from)),
        ResourceDef("events.k8s.io", "v1", "events", "Event", True, short_names=["ev"], storage="core/events",
                    field_labels=EVENTS_V1_FIELD_LABELS, builtin_view=(_events_to_view, _events_from_view)),
        ResourceDef("coordination.k8s.io", "v1", "leases", "Lease", True),
        ResourceDef("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                    short_names=["crd", "crds"], categories=["api-extensions"], status=True, generation=True),
        # What a Helm chart installs (tests/chart): stored as sent, no defaulting, no controllers.
        ResourceDef("", "v1", "secrets", "Secret", True),
        ResourceDef("", "v1", "configmaps", "ConfigMap", True, short_names=["cm"]),
        ResourceDef("", "v1", "services", "Service", True, short_names=["svc"], categories=["all"], status=True),
        ResourceDef("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=["sa"]),
        ResourceDef("apps", "v1", "deployments", "Deployment", True, short_names=["deploy"], categories=["all"],
                    status=True, generation=True),
        ResourceDef("apps", "v1", "daemonsets", "DaemonSet", True, short_names=["ds"], categories=["all"],
                    status=True, generation=True),
        ResourceDef("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
        ResourceDef("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
        ResourceDef("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        ResourceDef("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
        ResourceDef("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, short_names=["pdb"],
                    status=True, generation=True),
    ]


class Registry:
    def __init__(self):
        self.defs: dict = {}  # (group, version, plural) -> ResourceDef
        self.crd_owned: dict = {}  # crd name -> [keys]
        self.version = 0
        for rd in builtin_defs():
            self.add(rd)

    def add(self, rd):
        self.defs[(rd.group, rd.version, rd.plural)] = rd
        self.version += 1

    def get(self, group, version, plural):
        return self.defs.get((group, version, plural))

    def set_crd(self, name, defs):
        self.remove_crd(name)
        for rd in defs:
            self.add(rd)
        self.crd_owned[name] = [(rd.group, rd.version, rd.plural) for rd in defs]

    def remove_crd(self, name):
        for k in self.crd_owned.pop(name, []):
            self.defs.pop(k, None)
        self.version += 1

    def groups(self):
        """[(group, [versions])] in discovery order: core first, then by name."""
        out = {}
        for (g, v, _p) in self.defs:
            out.setdefault(g, [])
            if v not in out[g]:
                out[g].append(v)
        order = sorted(out, key=lambda g: (g != "", g))
        return [(g, sorted(out[g], key=_version_priority)) for g in order]

    def resources(self, group, version):
        return [rd for (g, v, _p), rd in sorted(self.defs.items()) if g == group and v == version]

    def defs_for_storage(self, storage):
        return [rd for rd in self.defs.values() if rd.storage == storage]


def _version_priority(v):
    """Kube-style version ordering: GA > beta > alpha, higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", v)
    if not m:
        return (3, v)
    major = int(m.group(1))
    stage = {"None": 0, "beta": 1, "alpha": 2}[str(m.group(2))]
    minor = int(m.group(3) or 0)
    return (stage, -major, -minor)


# ---------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------

_QNAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)"
_LABEL_KEY_RE = re.compile(r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/)?" + _QNAME + r"$")
_LABEL_VALUE_RE = re.compile(r"^(" + _QNAME + r")?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def valid_label_key(k):
    if not _LABEL_KEY_RE.match(k):
        return False
    prefix, _, name = k.rpartition("/")
    return len(name) <= 63 and len(prefix) <= 253


def valid_label_value(v):
    return len(v) <= 63 and bool(_LABEL_VALUE_RE.match(v))


_TOKEN_RE = re.compile(r"\s*(!=|==|=|!|<|>|\(|\)|,|[^\s!=<>(),]+)")


def parse_label_selector(s):
    """Returns a list of (key, op, values); raises ApiError(400) when malformed."""
    if s is None or not s.strip():
        return []
    toks = []
    pos = 0
    s2 = s.rstrip()
    while pos < len(s2):
        m = _TOKEN_RE.match(s2, pos)
        if not m:
            raise err_bad_request(f"unable to parse requirement: invalid label selector: {s!r}")
        toks.append(m.group(1))
        pos = m.end()
    reqs = []
    i = 0

    def bad(why):
        return err_bad_request(f"unable to parse requirement: {why} in label selector {s!r}")

    def check_key(k):
        if not valid_label_key(k):
            raise bad(f"invalid label key {k!r}")

    def check_val(v):
        if not valid_label_value(v):
            raise bad(f"invalid label value {v!r}")

    while i < len(toks):
        t = toks[i]
        if t == "!":
            if i + 1 >= len(toks):
                raise bad("missing key after '!'")
            check_key(toks[i + 1])
            reqs.append((toks[i + 1], "!", ()))
            i += 2
        else:
            if t in ("=", "==", "!=", "(", ")", ",", "<", ">"):
                raise bad(f"unexpected {t!r}")
            key = t
            check_key(key)
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is None or nxt == ",":
                reqs.append((key, "exists", ()))
                i += 1
            elif nxt in ("=", "==", "!="):
                val = toks[i + 2] if i + 2 < len(toks) and toks[i + 2] not in (",",) else ""
                if val in ("=", "==", "!=", "(", ")", "!", "<", ">"):
                    raise bad("expected a value")
                if val != "":
                    check_val(val)
                reqs.append((key, "!=" if nxt == "!=" else "=", (val,)))
                i += 3 if val != "" else 2
            elif nxt in ("in", "notin"):
                if i + 2 >= len(toks) or toks[i + 2] != "(":
                    raise bad(f"expected '(' after {nxt}")
                j = i + 3
                vals = []
                expect_val = True
                while j < len(toks) and toks[j] != ")":
                    if toks[j] == ",":
                        if expect_val:
                            vals.append("")
                        expect_val = True
                    else:
                        if not expect_val:
                            raise bad("expected ','")
                        check_val(toks[j])
                        vals.append(toks[j])
                        expect_val = False
                    j += 1
                if j >= len(toks):
                    raise bad("missing ')'")
                if expect_val and vals:
                    vals.append("")
                if not vals:
                    raise bad("for 'in', 'notin' operators, values set can't be empty")
                reqs.append((key, nxt, tuple(vals)))
                i = j + 1
            elif nxt in ("<", ">"):
                val = toks[i + 2] if i + 2 < len(toks) else ""
                if not re.fullmatch(r"-?\d+", val):
                    raise bad(f"for 'Gt', 'Lt' operators, the value must be an integer, got {val!r}")
                reqs.append((key, nxt, (int(val),)))
                i += 3
            else:
                raise bad(f"unexpected {nxt!r} after key {key!r}")
        if i < len(toks):
            if toks[i] != ",":
                raise bad(f"expected ',' got {toks[i]!r}")
            i += 1
            if i >= len(toks):
                raise bad("trailing ','")
    return reqs


def label_match(reqs, labels):
    if not reqs:
        return True
    labels = labels or {}
    for key, op, vals in reqs:
        has = key in labels
        v = labels.get(key)
        if op == "=":
            if not has or v != vals[0]:
                return False
        elif op == "!=":
            if has and v == vals[0]:
                return False
        elif op == "in":
            if not has or v not in vals:
                return False
        elif op == "notin":
            if has and v in vals:
                return False
        elif op == "exists":
            if not has:
                return False
        elif op == "!":
            if has:
                return False
        elif op in ("<", ">"):
            if not has or not re.fullmatch(r"-?\d+", v or ""):
                return False
            if op == "<" and not int(v) < vals[0]:
                return False
            if op == ">" and not int(v) > vals[0]:
                return False
    return True


def parse_field_selector(s, rd):
    if s is None or not s.strip():
        return []
    reqs = []
    for part in _split_unescaped(s, ","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([^!=]+?)\s*(!=|==|=)\s*(.*)$", part)
        if not m:
            raise err_bad_request(f"invalid selector: '{s}'; can't understand '{part}'")
        field, op, val = m.group(1).strip(), m.group(2), m.group(3).replace("\\,", ",").replace("\\=", "=").replace("\\\\", "\\")
        if field not in rd.field_labels:
            raise err_bad_request(f'field label not supported: {field}')
        reqs.append((rd.field_labels[field], op != "!=", val))
    return reqs


def _split_unescaped(s, sep):
    out, cur, esc = [], [], False
    for ch in s:
        if esc:
            cur.append("\\" + ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def field_value(obj, path):
    if callable(path):  # a field whose selectable value is computed (nodes' spec.unschedulable)
        return path(obj)
    cur = obj
    for p in path:
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(p)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_match(reqs, obj):
    for path, eq, val in reqs:
        if (field_value(obj, path) == val) != eq:
            return False
    return True


# ---------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (returns a new value; inputs untouched)."""
    if not isinstance(patch, dict):
        return deep_copy(patch) if isinstance(patch, list) else patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# patchMergeKey of the list fields that core/v1 Pod (and friends) merge by key
SMP_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "ports": "containerPort", "volumes": "name", "volumeMounts": "mountPath",
    "volumeDevices": "devicePath", "conditions": "type", "ownerReferences": "uid",
    "imagePullSecrets": "name", "hostAliases": "ip", "readinessGates": "conditionType",
    "topologySpreadConstraints": "topologyKey", "resourceClaims": "name",
}
SMP_PRIMITIVE_MERGE = {"finalizers"}


def strategic_merge_patch(target, patch):
    """A simplified strategic merge patch: JSON merge patch, plus merge-by-key for
    the list fields above, union for metadata.finalizers, and the $patch,
    $retainKeys, $deleteFromPrimitiveList and $setElementOrder directives."""
    if not isinstance(patch, dict):
        return deep_copy(patch) if isinstance(patch, list) else patch
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: deep_copy(v) for k, v in patch.items() if not k.startswith("$")}
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    orders = {}
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            key = k.split("/", 1)[1]
            result[key] = [x for x in (result.get(key) or []) if x not in (v or [])]
            continue
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$"):
            continue
        if v is None:
            result.pop(k, None)
        elif isinstance(v, list) and k in SMP_MERGE_KEYS and all(isinstance(e, dict) for e in v):
            result[k] = _smp_merge_list(result.get(k) or [], v, SMP_MERGE_KEYS[k])
        elif isinstance(v, list) and k in SMP_PRIMITIVE_MERGE:
            cur = list(result.get(k) or [])
            for e in v:
                if e not in cur:
                    cur.append(e)
            result[k] = cur
        elif isinstance(v, list):
            result[k] = [strategic_merge_patch({}, e) if isinstance(e, dict) else e for e in v]
        elif isinstance(v, dict):
            r = strategic_merge_patch(result.get(k), v)
            if r is None:
                result.pop(k, None)
            else:
                result[k] = r
        else:
            result[k] = v
    for k, order in orders.items():
        lst = result.get(k)
        if not isinstance(lst, list) or not isinstance(order, list):
            continue
        mk = SMP_MERGE_KEYS.get(k)

        def ident(e, mk=mk):
            return e.get(mk) if (mk and isinstance(e, dict)) else json.dumps(e, sort_keys=True)

        pos = {ident(e): i for i, e in enumerate(order)}
        result[k] = sorted(lst, key=lambda e: pos.get(ident(e), len(pos)))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _smp_merge_list(cur, patch, key):
    if any(e.get("$patch") == "replace" for e in patch):
        return [{k: v for k, v in e.items() if not k.startswith("$")} for e in patch if e.get("$patch") != "replace"]
    out = list(cur)
    for el in patch:
        kv = el.get(key)
        idx = next((i for i, e in enumerate(out) if isinstance(e, dict) and e.get(key) == kv), None)
        if el.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(strategic_merge_patch({}, el))
        else:
            out[idx] = strategic_merge_patch(out[idx], el)
    return out


def _jp_tokens(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _jp_parent(doc, tokens):
    cur = doc
    for t in tokens[:-1]:
        if isinstance(cur, list):
            cur = cur[int(t)]
        elif isinstance(cur, dict):
            cur = cur[t]
        else:
            raise KeyError(t)
    return cur


def json_patch(doc, ops):
    """RFC 6902 JSON patch."""
    doc = deep_copy(doc)
    if not isinstance(ops, list):
        raise ValueError("a JSON patch must be a list of operations")
    for op in ops:
        kind = op.get("op")
        toks = _jp_tokens(op.get("path", ""))

        def get(tokens):
            cur = doc
            for t in tokens:
                cur = cur[int(t)] if isinstance(cur, list) else cur[t]
            return cur

        def remove(tokens):
            parent = _jp_parent(doc, tokens)
            if isinstance(parent, list):
                return parent.pop(int(tokens[-1]))
            return parent.pop(tokens[-1])

        def add(tokens, value):
            nonlocal doc
            if not tokens:
                doc = value
                return
            parent = _jp_parent(doc, tokens)
            last = tokens[-1]
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                else:
                    i = int(last)
                    if i > len(parent):
                        raise IndexError(last)
                    parent.insert(i, value)
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise KeyError(last)

        try:
            if kind == "add":
                add(toks, deep_copy(op["value"]))
            elif kind == "remove":
                remove(toks)
            elif kind == "replace":
                get(toks)
                if toks:
                    remove(toks)
                add(toks, deep_copy(op["value"]))
            elif kind == "move":
                v = remove(_jp_tokens(op["from"]))
                add(toks, v)
            elif kind == "copy":
                add(toks, deep_copy(get(_jp_tokens(op["from"]))))
            elif kind == "test":
                if get(toks) != op.get("value"):
                    raise ValueError(f"test operation failed at {op.get('path')}")
            else:
                raise ValueError(f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"JSON patch {kind} {op.get('path')!r} failed: {e!r}")
    return doc


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


class Entry:
    """One stored object version. obj is never mutated after construction."""
    __slots__ = ("obj", "_json")

    def __init__(self, obj):
        self.obj = obj
        self._json = None

    @property
    def json(self) -> bytes:
        j = self._json
        if j is None:
            j = self._json = dumps(self.obj)
        return j

    def copy(self) -> dict:
        return json.loads(self.json)


class HistEvent:
    __slots__ = ("rv", "type", "key", "entry", "prev")

    def __init__(self, rv, type_, key, entry, prev):
        self.rv = rv
        self.type = type_
        self.key = key
        self.entry = entry
        self.prev = prev


class History:
    def __init__(self, horizon):
        self.events: list = []
        self.rvs: list = []
        self.horizon = horizon  # every event with rv > horizon is retained


class Storage:
    def __init__(self, storage_key, horizon):
        self.key = storage_key
        # Test aid: every write with its wall-clock time, never compacted (bounded).
        self.writes = collections.deque(maxlen=10000)
        self.objects: dict = {}  # key -> Entry
        self.hist = History(horizon)
        self._sorted = None

    def sorted_keys(self):
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted


def obj_key(namespaced, ns, name):
    return f"{ns}/{name}" if namespaced else name


class WatchHandle:
    _ids = iter(range(1, 1 << 62))

    def __init__(self, rd, ns, label_sel, field_sel, start_rv, bookmarks, user_agent, peer):
        self.id = next(WatchHandle._ids)
        self.rd = rd
        self.ns = ns
        self.label_selector = label_sel
        self.field_selector = field_sel
        self.start_rv = start_rv
        self.cursor = start_rv
        self.bookmarks = bookmarks
        self.user_agent = user_agent
        self.peer = peer
        self.started = time.time()
        self.events_sent = 0
        self.bookmarks_sent = 0
        self.drop = None  # None | "reset" | "clean" | "drain" (send what is pending, then end cleanly)

    def describe(self):
        return {
            "id": self.id, "resource": self.rd.qualified, "apiVersion": self.rd.api_version,
            "namespace": self.ns, "labelSelector": self.label_selector, "fieldSelector": self.field_selector,
            "startResourceVersion": str(self.start_rv), "resourceVersion": str(self.cursor),
            "allowWatchBookmarks": self.bookmarks, "eventsSent": self.events_sent,
            "bookmarksSent": self.bookmarks_sent, "userAgent": self.user_agent, "peer": self.peer,
            "ageSeconds": round(time.time() - self.started, 3),
        }


class State:
    """All objects, the global resourceVersion, per-storage event histories and watchers."""

    def __init__(self, history_limit=10000, bookmark_interval=5.0, graceful_deletion=False,
                 auto_create_namespaces=False, watch_timeout_max=1800.0, workermetrics_crd=True, watch_list=False,
                 event_ttl=3600.0):
        self.cond = threading.Condition(threading.RLock())
        self.rv = 1
        self.registry = Registry()
        self.stores: dict = {}
        self.history_limit = max(1, int(history_limit))
        self.bookmark_interval = float(bookmark_interval)
        self.graceful_deletion = graceful_deletion
        self.auto_create_namespaces = auto_create_namespaces
        self.watch_timeout_max = float(watch_timeout_max)
        # the WatchList feature gate: off, as on a 1.30 server (alpha until 1.32)
        self.watch_list = bool(watch_list)
        self.watches: dict = {}
        self.grace_deadlines: dict = {}  # (storage, key) -> deadline
        self.req_counts: dict = {}
        self.path_counts: dict = {}
        self.faults: list = []
        self._fault_ids = iter(range(1, 1 << 62))
        # Test knob: response latency of lists and watches (seconds). A real apiserver lists a
        # big cluster slowly (it reads and serialises every object of every page), so a client
        # must tolerate lists that take longer than its own timers.
        self.latency = {"list": 0.0, "listPage": 0.0, "watch": 0.0, "resources": []}
        # Events live event_ttl seconds after their last write, as kube-apiserver's --event-ttl
        # (default 1 h; cmd/kube-apiserver/app/options) puts them under an etcd lease on every
        # create and update (pkg/registry/core/event/storage/storage.go TTLFunc).
        self.event_ttl = float(event_ttl)
        self.event_expiry: dict = {}  # stored key -> deadline
        # The field manager of the API write this thread is serving (None: control/seed writes).
        self.tls = threading.local()
        self.closing = False
        for ns in DEFAULT_NAMESPACES:
            self.create(self.rd("", "v1", "namespaces"), None, {"metadata": {"name": ns}}, bypass=True)
        if workermetrics_crd:  # absent with --no-workermetrics-crd (helm install --skip-crds)
            crd_rd = self.rd("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            self.create(crd_rd, None, load_workermetrics_crd(), bypass=True)
        self._reaper = threading.Thread(target=self._reap_loop, name="grace-reaper", daemon=True)
        self._reaper.start()

    # -- helpers ----------------------------------------------------------

    def latency_for(self, rd, kind):
        """Configured latency (seconds) of `kind` ("list", "listPage", "watch") for rd."""
        with self.cond:
            only = self.latency["resources"]
            if only and rd.plural not in only and rd.qualified not in only:
                return 0.0
            return float(self.latency[kind] or 0.0)

    def pause(self, seconds):
        """Sleeps `seconds`, cut short when the server stops."""
        if seconds > 0:
            with self.cond:
                self.cond.wait_for(lambda: self.closing, timeout=seconds)

    def rd(self, group, version, plural):
        return self.registry.get(group, version, plural)

    def store(self, storage_key) -> Storage:
        st = self.stores.get(storage_key)
        if st is None:
            st = self.stores[storage_key] = Storage(storage_key, self.rv)
        return st

    def next_rv(self):
        self.rv += 1
        return self.rv

    def _record(self, st: Storage, type_, key, entry, prev):
        st.writes.append((time.time(), self.rv, type_, key, entry))
        ev = HistEvent(self.rv, type_, key, entry, prev)
        h = st.hist
        h.events.append(ev)
        h.rvs.append(ev.rv)
        over = len(h.events) - self.history_limit
        if over > 0 and (over >= max(1, self.history_limit // 8) or len(h.events) > 2 * self.history_limit):
            h.horizon = h.rvs[over - 1]
            del h.events[:over]
            del h.rvs[:over]
        self.cond.notify_all()

    def _store_put(self, st: Storage, key, obj, type_, prev_entry):
        if st.key == "core/events":
            self.event_expiry[key] = time.time() + self.event_ttl
            self.cond.notify_all()
        entry = Entry(obj)
        if key not in st.objects:
            st._sorted = None
        st.objects[key] = entry
        self._record(st, type_, key, entry, prev_entry)
        return entry

    def _store_remove(self, st: Storage, key, final_obj):
        prev = st.objects.pop(key)
        st._sorted = None
        self.grace_deadlines.pop((st.key, key), None)
        if st.key == "core/events":
            self.event_expiry.pop(key, None)
        entry = Entry(final_obj)
        self._record(st, "DELETED", key, entry, prev)
        return entry

    def compact(self, storage_keys=None):
        with self.cond:
            out = []
            for sk, st in self.stores.items():
                if storage_keys and sk not in storage_keys:
                    continue
                st.hist.events.clear()
                st.hist.rvs.clear()
                st.hist.horizon = self.rv
                out.append(sk)
            self.cond.notify_all()
            return self.rv, out

    # -- validation -------------------------------------------------------

    def _validate_meta(self, rd, obj, name):
        meta = obj.get("metadata") or {}
        causes = []
        if rd.plural == "namespaces":
            if not _DNS_LABEL_RE.match(name) or len(name) > 63:
                causes.append(("metadata.name", "FieldValueInvalid",
                               f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case '
                               "alphanumeric characters or '-', and must start and end with an alphanumeric character"))
        elif rd.storage != "core/events" and (not _DNS_SUBDOMAIN_RE.match(name) or len(name) > 253):
            causes.append(("metadata.name", "FieldValueInvalid",
                           f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                           "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"))
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            causes.append(("metadata.labels", "FieldValueInvalid", "Invalid value: labels must be a map"))
        else:
            for k, v in labels.items():
                if not valid_label_key(k):
                    causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{k}": invalid label key'))
                if not isinstance(v, str) or not valid_label_value(v):
                    causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{v}": invalid label value'))
        ann = meta.get("annotations") or {}
        if not isinstance(ann, dict) or any(not isinstance(v, str) for v in ann.values()):
            causes.append(("metadata.annotations", "FieldValueInvalid", "Invalid value: annotations must be a map of strings"))
        if rd.plural == "pods" and rd.group == "":
            containers = (obj.get("spec") or {}).get("containers")
            if not containers:
                causes.append(("spec.containers", "FieldValueRequired", "Required value"))
            else:
                for i, c in enumerate(containers):
                    if not isinstance(c, dict) or not c.get("name"):
                        causes.append((f"spec.containers[{i}].name", "FieldValueRequired", "Required value"))
                    if isinstance(c, dict) and not c.get("image"):
                        causes.append((f"spec.containers[{i}].image", "FieldValueRequired", "Required value"))
                    # pkg/apis/core/validation/validation.go validateContainers
                    if isinstance(c, dict) and c.get("restartPolicy") is not None:
                        causes.append((f"spec.containers[{i}].restartPolicy", "FieldValueForbidden",
                                       "Forbidden: may not be set for non-init containers"))
            # validateInitContainers: `restartPolicy: Always` makes a native sidecar (KEP-753,
            # on by default since 1.29); no other value is allowed on an init container
            names = {c.get("name") for c in containers or [] if isinstance(c, dict)}
            for i, c in enumerate((obj.get("spec") or {}).get("initContainers") or []):
                if not isinstance(c, dict) or not c.get("name"):
                    causes.append((f"spec.initContainers[{i}].name", "FieldValueRequired", "Required value"))
                    continue
                if not c.get("image"):
                    causes.append((f"spec.initContainers[{i}].image", "FieldValueRequired", "Required value"))
                if c["name"] in names:
                    causes.append((f"spec.initContainers[{i}].name", "FieldValueDuplicate",
                                   f'Duplicate value: "{c["name"]}"'))
                names.add(c["name"])
                rp = c.get("restartPolicy")
                if rp is not None and rp != "Always":
                    causes.append((f"spec.initContainers[{i}].restartPolicy", "FieldValueNotSupported",
                                   f'Unsupported value: "{rp}": supported values: "Always"'))
        if causes:
            raise err_invalid(rd, name, causes)

    def _coerce_cr(self, rd, obj, name):
        """The CRD's structural schema applied as on a real apiserver (see coerce_custom_resource).

        Unknown fields follow the request's fieldValidation (apiserver handlers/create.go,
        patch.go, update.go; GA since 1.27): Strict -> 400 `strict decoding error`, Warn (the
        default) -> pruned with a `Warning: 299` header each, Ignore -> pruned silently.
        """
        unknown, causes = coerce_custom_resource(rd, obj)
        mode = getattr(_REQ, "field_validation", None) or "Warn"
        if unknown and mode == "Strict":
            # handlers/rest.go transformDecodeError wraps the strict decoding error
            raise err_bad_request(f'{rd.kind} in version "{rd.version}" cannot be handled as a {rd.kind}: '
                                  "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown))
        if unknown and mode == "Warn" and getattr(_REQ, "warnings", None) is not None:
            _REQ.warnings.extend(f'unknown field "{u}"' for u in unknown)
        if causes:
            raise err_invalid(rd, name, causes)

    def _check_kind(self, rd, obj):
        av, kind = obj.get("apiVersion"), obj.get("kind")
        if (av and av != rd.api_version) or (kind and kind != rd.kind):
            raise err_bad_request(
                f"the API version in the data ({av}) does not match the expected API version ({rd.api_version})"
                if av and av != rd.api_version else
                f"the kind in the data ({kind}) does not match the expected kind ({rd.kind})")

    def _defaults_on_create(self, rd, obj, bypass):
        if rd.group == "" and rd.plural == "pods":
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            if not bypass or not obj.get("status"):
                obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            else:
                obj["status"].setdefault("phase", "Pending")
        elif rd.group == "" and rd.plural == "namespaces":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
            labels = obj["metadata"].setdefault("labels", {})
            labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif _is_node(rd):
            pass  # strategy.go PrepareForCreate: a Node keeps the status it is created with
        elif rd.status and not bypass:
            obj.pop("status", None)

    # -- CRUD -------------------------------------------------------------

    def get(self, rd, ns, name):
        with self.cond:
            st = self.store(rd.storage)
            e = st.objects.get(obj_key(rd.namespaced, ns, name))
            if e is None:
                raise err_not_found(rd, name)
            return e

    def _ensure_namespace(self, ns, bypass):
        nsst = self.store("/namespaces")
        if ns in nsst.objects:
            if (nsst.objects[ns].obj.get("metadata") or {}).get("deletionTimestamp"):
                raise ApiError(403, "Forbidden",
                               f"unable to create new content in namespace {ns} because it is being terminated")
            return
        if bypass or self.auto_create_namespaces:
            self.create(self.rd("", "v1", "namespaces"), None, {"metadata": {"name": ns}}, bypass=True)
            return
        raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})

    def create(self, rd, ns, body, *, bypass=False, dry_run=False):
        if not isinstance(body, dict):
            raise err_bad_request("the body of the request was not a JSON object")
        obj = rd.from_view(deep_copy(body)) if rd.view else deep_copy(body)
        if not rd.view:
            self._check_kind(rd, body)
            obj["apiVersion"], obj["kind"] = rd.api_version, rd.kind
        _secret_on_write(rd, obj)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        with self.cond:
            if rd.namespaced:
                bns = meta.get("namespace")
                if bns and ns and bns != ns:
                    raise err_bad_request("the namespace of the provided object does not match the namespace sent on the request")
                ns = ns or bns or "default"
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            name = meta.get("name")
            if not name:
                gn = meta.get("generateName")
                if not gn:
                    raise err_invalid(rd, "", [("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")])
                name = gn + "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
                meta["name"] = name
            if meta.get("resourceVersion") and not bypass:
                raise ApiError(500, "InternalError",
                               "Internal error occurred: resourceVersion should not be set on objects to be created")
            self._validate_meta(rd, obj, name)
            if rd.group == "events.k8s.io":
                _validate_events_v1(rd, obj, name, None)
            if _is_node(rd):
                node_rules.normalize(obj)
                node_rules.prepare_for_create(obj)
                _raise_causes(rd, name, node_rules.validate(obj, None))
            if rd.namespaced:
                self._ensure_namespace(ns, bypass)
            st = self.store(rd.storage)
            key = obj_key(rd.namespaced, ns, name)
            if key in st.objects:
                raise err_already_exists(rd, name)
            for f in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
                meta.pop(f, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_ts()
            if rd.generation:
                meta["generation"] = 1
            else:
                meta.pop("generation", None)
            self._defaults_on_create(rd, obj, bypass)
            if rd.custom:
                self._coerce_cr(rd, obj, name)
            if rd.plural == "customresourcedefinitions" and rd.group == "apiextensions.k8s.io":
                self._apply_crd(obj, dry_run)
            if dry_run:
                meta["resourceVersion"] = str(self.rv)
                return Entry(obj)
            obj = {"apiVersion": obj.pop("apiVersion"), "kind": obj.pop("kind"), "metadata": obj.pop("metadata"), **obj}
            obj["metadata"].pop("managedFields", None)
            self._note_manager(obj, None)
            obj["metadata"]["resourceVersion"] = str(self.next_rv())
            return self._store_put(st, key, obj, "ADDED", None)

    def _apply_crd(self, crd, dry_run):
        name = crd["metadata"]["name"]
        try:
            defs = crd_to_defs(crd)
        except (ValueError, KeyError, TypeError) as e:
            raise err_invalid(self.rd("apiextensions.k8s.io", "v1", "customresourcedefinitions"), name,
                              [("spec", "FieldValueInvalid", str(e))])
        spec = crd["spec"]
        expect = f"{spec['names']['plural']}.{spec['group']}"
        if name != expect:
            raise err_invalid(self.rd("apiextensions.k8s.io", "v1", "customresourcedefinitions"), name,
                              [("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')])
        if dry_run:
            return
        self.registry.set_crd(name, defs)
        crd["status"] = {
            "acceptedNames": dict(spec["names"]),
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found",
                 "lastTransitionTime": now_ts()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": now_ts()},
            ],
        }

    def update(self, rd, ns, name, body, *, subresource=None, bypass=False, dry_run=False, create_missing=False):
        """PUT semantics: body replaces the object (or only .status for subresource='status')."""
        if not isinstance(body, dict):
            raise err_bad_request("the body of the request was not a JSON object")
        new = rd.from_view(deep_copy(body)) if rd.view else deep_copy(body)
        if not rd.view:
            self._check_kind(rd, body)
            new["apiVersion"], new["kind"] = rd.api_version, rd.kind
        _secret_on_write(rd, new)
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        if meta.get("name") and meta["name"] != name:
            raise err_bad_request("the name of the object (%s) does not match the name on the URL (%s)" % (meta["name"], name))
        if rd.namespaced and meta.get("namespace") and meta["namespace"] != ns:
            raise err_bad_request("the namespace of the provided object does not match the namespace sent on the request")
        with self.cond:
            st = self.store(rd.storage)
            key = obj_key(rd.namespaced, ns, name)
            cur = st.objects.get(key)
            if cur is None:
                if create_missing and subresource is None:
                    meta["name"] = name
                    meta.pop("resourceVersion", None)
                    return self.create(rd, ns, rd.to_view(new) if rd.view else new, bypass=bypass, dry_run=dry_run), True
                raise err_not_found(rd, name)
            want_rv = meta.get("resourceVersion")
            if want_rv and want_rv != cur.obj["metadata"]["resourceVersion"]:
                raise err_conflict(rd, name)
            return self._commit_update(rd, st, key, cur, new, subresource, bypass, dry_run), False

    def patch(self, rd, ns, name, patch_type, body_bytes, *, subresource=None, dry_run=False, field_manager=None):
        ptype = (patch_type or "").split(";")[0].strip().lower()
        try:
            if ptype == "application/apply-patch+yaml":
                if not field_manager:
                    raise ApiError(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch')
                text = body_bytes.decode() if body_bytes else "{}"
                patch = yaml.safe_load(text) if yaml is not None else json.loads(text)
            else:
                patch = json.loads(body_bytes or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise err_bad_request(f"error decoding patch: {e}")
        except Exception as e:  # yaml errors
            if isinstance(e, ApiError):
                raise
            raise err_bad_request(f"error decoding patch: {e}")
        if ptype == "application/strategic-merge-patch+json" and rd.custom:
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")
        if ptype not in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                         "application/json-patch+json", "application/apply-patch+yaml"):
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                           + ("" if rd.custom else ", application/strategic-merge-patch+json"))
        with self.cond:
            st = self.store(rd.storage)
            key = obj_key(rd.namespaced, ns, name)
            cur = st.objects.get(key)
            if cur is None:
                if ptype == "application/apply-patch+yaml" and subresource is None and isinstance(patch, dict):
                    obj = deep_copy(patch)
                    obj.setdefault("metadata", {})["name"] = name
                    if rd.namespaced:
                        obj["metadata"]["namespace"] = ns
                    return self.create(rd, ns, obj, dry_run=dry_run), True
                raise err_not_found(rd, name)
            old_view = rd.to_view(cur.copy())
            try:
                if ptype == "application/json-patch+json":
                    new_view = json_patch(old_view, patch)
                elif ptype == "application/strategic-merge-patch+json":
                    if not isinstance(patch, dict):
                        raise ValueError("a strategic merge patch must be a JSON object")
                    new_view = strategic_merge_patch(old_view, patch)
                else:
                    if ptype == "application/apply-patch+yaml" and not isinstance(patch, dict):
                        raise ValueError("an apply patch must be an object")
                    new_view = merge_patch(old_view, patch)
            except ValueError as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}")
            if not isinstance(new_view, dict):
                raise ApiError(422, "Invalid", "the patched object is not a JSON object")
            new = rd.from_view(deep_copy(new_view))
            pmeta = patch.get("metadata") if isinstance(patch, dict) else None
            want_rv = pmeta.get("resourceVersion") if isinstance(pmeta, dict) else None
            if ptype == "application/json-patch+json":
                want_rv = (new.get("metadata") or {}).get("resourceVersion")
                if want_rv == cur.obj["metadata"]["resourceVersion"]:
                    want_rv = None
            if want_rv and want_rv != cur.obj["metadata"]["resourceVersion"]:
                raise err_conflict(rd, name)
            nmeta = new.get("metadata") or {}
            if nmeta.get("name") != name or (rd.namespaced and nmeta.get("namespace") != ns):
                raise err_bad_request("metadata.name and metadata.namespace cannot be changed by a patch")
            return self._commit_update(rd, st, key, cur, new, subresource, False, dry_run), False

    def _note_manager(self, obj, subresource):
        """Records the writer in metadata.managedFields as the apiserver's field manager does
        (staging/src/k8s.io/apiserver/pkg/endpoints/handlers: the `fieldManager` parameter, or
        the User-Agent up to its first '/'): one entry per manager, operation, apiVersion and
        subresource, its time updated by each write. fieldsV1 is simplified (see Deviations)."""
        who = getattr(self.tls, "manager", None)
        if not who:
            return
        manager, operation, sub, api_version = who
        if subresource == "status":
            fields = {"f:status": {}}
        else:
            fields = {f"f:{k}": {} for k in obj if k not in ("apiVersion", "kind", "status")}
        entry = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": now_ts(),
                 "fieldsType": "FieldsV1", "fieldsV1": fields}
        if sub:
            entry["subresource"] = sub
        meta = obj["metadata"]
        kept = [m for m in (meta.get("managedFields") or [])
                if (m.get("manager"), m.get("operation"), m.get("apiVersion"), m.get("subresource"))
                != (manager, operation, api_version, sub)]
        meta["managedFields"] = kept + [entry]

    def _commit_update(self, rd, st, key, cur: Entry, new: dict, subresource, bypass, dry_run):
        old = cur.obj
        name = old["metadata"]["name"]
        if subresource == "status" and not _is_node(rd):
            result = cur.copy()
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            new = result
        else:
            if subresource == "status":
                # node strategy.go nodeStatusStrategy.PrepareForUpdate: the old spec is kept,
                # metadata and status are taken from the request (the kubelet labels its Node)
                if "spec" in old:
                    new["spec"] = deep_copy(old["spec"])
                else:
                    new.pop("spec", None)
            nmeta = new.setdefault("metadata", {})
            ometa = old["metadata"]
            for f in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "managedFields"):
                if f in ometa:
                    nmeta[f] = ometa[f]
                else:
                    nmeta.pop(f, None)
            if rd.status and not bypass and subresource is None:
                if "status" in old:
                    new["status"] = deep_copy(old["status"])
                else:
                    new.pop("status", None)
            self._validate_meta(rd, new, name)
            if rd.group == "events.k8s.io" and not bypass:
                _validate_events_v1(rd, new, name, old)
            if rd.plural == "pods" and rd.group == "" and not bypass:
                _check_pod_spec_update(rd, name, old.get("spec") or {}, new.get("spec") or {})
            if rd.plural == "namespaces" and rd.group == "":
                new["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            if _is_node(rd):
                node_rules.normalize(new)
                _raise_causes(rd, name, node_rules.validate(new, old))
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = old.get("apiVersion"), old.get("kind")
        if rd.custom:
            self._coerce_cr(rd, new, name)
        if rd.generation and subresource is None:
            strip_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
            strip_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
            if strip_new != strip_old:
                new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
        if new == old:
            return cur  # no-op: no new resourceVersion, no watch event (like the real server)
        self._note_manager(new, subresource)
        if rd.plural == "customresourcedefinitions" and rd.group == "apiextensions.k8s.io" and subresource is None:
            self._apply_crd(new, dry_run)
        if dry_run:
            return Entry(new)
        new["metadata"]["resourceVersion"] = str(self.next_rv())
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and (st.key, key) not in self.grace_deadlines:
            return self._remove(rd, st, key, new)
        return self._store_put(st, key, new, "MODIFIED", cur)

    def _remove(self, rd, st, key, final_obj):
        """Remove now; final_obj already carries the deletion resourceVersion."""
        if rd.plural == "namespaces" and rd.group == "":
            ns = final_obj["metadata"]["name"]
            prefix = ns + "/"
            for sk, other in list(self.stores.items()):
                for k in [k for k in other.objects if k.startswith(prefix)]:
                    o = other.objects[k].copy()
                    o["metadata"]["resourceVersion"] = str(self.next_rv())
                    self._store_remove(other, k, o)
            final_obj["metadata"]["resourceVersion"] = str(self.next_rv())
        if rd.plural == "customresourcedefinitions" and rd.group == "apiextensions.k8s.io":
            name = final_obj["metadata"]["name"]
            spec = final_obj.get("spec") or {}
            sk = f"{spec.get('group')}/{(spec.get('names') or {}).get('plural')}"
            other = self.stores.get(sk)
            if other:
                for k in list(other.objects):
                    o = other.objects[k].copy()
                    o["metadata"]["resourceVersion"] = str(self.next_rv())
                    self._store_remove(other, k, o)
                # The storage is torn down (customresource_handler.go removeDeadStorage/tearDown:
                # DestroyFunc stops the watch cache): open watches get the DELETED events above
                # and then end; a re-created CRD starts a fresh watch cache at the current
                # revision, so resuming an older resourceVersion is 410 Expired.
                del self.stores[sk]
                for h in self.watches.values():
                    if h.rd.storage == sk and not h.drop:
                        h.drop = "drain"
            self.registry.remove_crd(name)
            final_obj["metadata"]["resourceVersion"] = str(self.next_rv())
        return self._store_remove(st, key, final_obj)

    def delete(self, rd, ns, name, options=None, *, dry_run=False, force_now=False):
        options = options or {}
        with self.cond:
            st = self.store(rd.storage)
            key = obj_key(rd.namespaced, ns, name)
            cur = st.objects.get(key)
            if cur is None:
                raise err_not_found(rd, name)
            pre = options.get("preconditions") or {}
            meta = cur.obj["metadata"]
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise err_conflict(rd, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta.get('uid')}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
                raise err_conflict(rd, name, f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                                   f"ResourceVersion in object meta: {meta.get('resourceVersion')}")
            grace = options.get("gracePeriodSeconds")
            try:
                grace = None if grace in (None, "") else int(grace)
            except (TypeError, ValueError):
                raise err_bad_request(f"invalid gracePeriodSeconds {grace!r}")
            obj = cur.copy()
            ometa = obj["metadata"]
            finalizers = ometa.get("finalizers") or []
            is_pod = rd.group == "" and rd.plural == "pods"
            if dry_run:
                return Entry(obj)
            if ometa.get("deletionTimestamp"):
                # already terminating: a zero grace period (or a control call) forces removal
                if (force_now or (is_pod and grace == 0)) and (force_now or not finalizers):
                    self.grace_deadlines.pop((st.key, key), None)
                    ometa["resourceVersion"] = str(self.next_rv())
                    return self._remove(rd, st, key, obj)
                return cur
            if is_pod and not force_now and self.graceful_deletion and grace and grace > 0:
                ometa["deletionTimestamp"] = ts_at(time.time() + grace)
                ometa["deletionGracePeriodSeconds"] = grace
                if rd.generation:
                    ometa["generation"] = int(ometa.get("generation") or 0) + 1
                self.grace_deadlines[(st.key, key)] = time.time() + grace
                ometa["resourceVersion"] = str(self.next_rv())
                self.cond.notify_all()
                return self._store_put(st, key, obj, "MODIFIED", cur)
            if finalizers and not force_now:
                ometa["deletionTimestamp"] = now_ts()
                ometa["deletionGracePeriodSeconds"] = 0
                if rd.generation:
                    ometa["generation"] = int(ometa.get("generation") or 0) + 1
                ometa["resourceVersion"] = str(self.next_rv())
                return self._store_put(st, key, obj, "MODIFIED", cur)
            ometa["resourceVersion"] = str(self.next_rv())
            return self._remove(rd, st, key, obj)

    def terminate_pod(self, ns, name, grace):
        """Start a graceful deletion regardless of --graceful-deletion (like a kubelet/eviction)."""
        rd = self.rd("", "v1", "pods")
        with self.cond:
            st = self.store(rd.storage)
            key = obj_key(True, ns, name)
            cur = st.objects.get(key)
            if cur is None:
                raise err_not_found(rd, name)
            obj = cur.copy()
            ometa = obj["metadata"]
            if ometa.get("deletionTimestamp"):
                return cur
            g = 30 if grace is None else int(grace)
            ometa["deletionTimestamp"] = ts_at(time.time() + g)
            ometa["deletionGracePeriodSeconds"] = g
            ometa["generation"] = int(ometa.get("generation") or 0) + 1
            ometa["resourceVersion"] = str(self.next_rv())
            # no deadline when grace is explicitly null: stays until /finalize
            self.grace_deadlines[(st.key, key)] = (time.time() + g) if grace is not None else float("inf")
            self.cond.notify_all()
            return self._store_put(st, key, obj, "MODIFIED", cur)

    def _reap_loop(self):
        while True:
            with self.cond:
                if self.closing:
                    return
                now = time.time()
                due = [k for k, d in self.grace_deadlines.items() if d <= now]
                for sk, key in due:
                    self.grace_deadlines.pop((sk, key), None)
                    st = self.stores.get(sk)
                    if st is None or key not in st.objects:
                        continue
                    cur = st.objects[key]
                    if (cur.obj["metadata"].get("finalizers") or []):
                        continue  # waits for the finalizers, like the real server
                    rd = self.registry.defs_for_storage(sk)[0]
                    obj = cur.copy()
                    obj["metadata"]["resourceVersion"] = str(self.next_rv())
                    self._remove(rd, st, key, obj)
                # Expired Events vanish as an etcd lease expiry deletes the key: a DELETED event.
                ev_store = self.stores.get("core/events")
                for key in [k for k, d in self.event_expiry.items() if d <= now]:
                    self.event_expiry.pop(key, None)
                    if ev_store is None or key not in ev_store.objects:
                        continue
                    obj = ev_store.objects[key].copy()
                    obj["metadata"]["resourceVersion"] = str(self.next_rv())
                    self._store_remove(ev_store, key, obj)
                pending = [d for d in self.grace_deadlines.values() if d != float("inf")]
                pending += list(self.event_expiry.values())
                wait = min(1.0, max(0.05, (min(pending) - now) if pending else 1.0))
                self.cond.wait(wait)

    # -- list / snapshot ---------------------------------------------------

    def snapshot(self, st: Storage, rv: int):
        """Objects of a storage as of resourceVersion rv (rv >= horizon): undo newer events."""
        h = st.hist
        i = bisect.bisect_right(h.rvs, rv)
        if i >= len(h.events):
            return st.objects, st.sorted_keys()
        objs = dict(st.objects)
        for ev in reversed(h.events[i:]):
            if ev.type == "ADDED":
                objs.pop(ev.key, None)
            else:
                objs[ev.key] = ev.prev
        return objs, sorted(objs)

    def list(self, rd, ns, q):
        label_reqs = parse_label_selector(q.get("labelSelector"))
        field_reqs = parse_field_selector(q.get("fieldSelector"), rd)
        rv_param = q.get("resourceVersion")
        rv_match = q.get("resourceVersionMatch")
        cont = q.get("continue")
        try:
            limit = int(q.get("limit") or 0)
        except ValueError:
            raise err_bad_request(f"invalid limit {q.get('limit')!r}")
        if rv_match and rv_match not in ("Exact", "NotOlderThan"):
            raise err_bad_request(f'resourceVersionMatch: Unsupported value: "{rv_match}"')
        if rv_match and not rv_param:
            raise err_bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
        if cont and rv_param:
            raise err_bad_request("specifying resource version is not allowed when using continue")
        if rv_match == "Exact" and rv_param == "0":
            raise err_bad_request("resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"")
        start_key = None
        with self.cond:
            st = self.store(rd.storage)
            current = self.rv
            if cont:
                try:
                    tok = json.loads(base64.b64decode(cont + "=" * (-len(cont) % 4)))
                    snap_rv = int(tok["rv"])
                    start_key = tok["start"]
                except Exception:
                    raise err_bad_request("continue key is not valid: invalid continue token")
                if snap_rv < st.hist.horizon:
                    raise err_expired("The provided continue parameter is too old to display a consistent list result. "
                                      "You can start a new list without the continue parameter, or use the continue "
                                      "token in this response to retrieve the remainder of the results. Continuing "
                                      "with the provided token results in an inconsistent list - objects that were "
                                      "created, modified, or deleted between the time the first chunk was returned "
                                      "and now may show up in the list.")
            elif rv_param and rv_param != "0":
                try:
                    want = int(rv_param)
                except ValueError:
                    raise err_bad_request(f"resourceVersion: Invalid value: \"{rv_param}\": must be an integer")
                exact = rv_match == "Exact" or (not rv_match and limit > 0)
                if want > current:
                    self.cond.wait_for(lambda: self.rv >= want, timeout=3.0)
                    current = self.rv
                    if want > current:
                        raise ApiError(504, "Timeout", f"Too large resource version: {want}, current: {current}",
                                       {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                                        "retryAfterSeconds": 1})
                if exact:
                    if want < st.hist.horizon:
                        raise err_expired("The resourceVersion for the provided list is too old.")
                    snap_rv = want
                else:
                    snap_rv = current
            else:
                snap_rv = current
                if rv_param == "0":
                    limit = 0  # served "from the watch cache": no chunking
            objs, keys = self.snapshot(st, snap_rv)
            lo, hi = 0, len(keys)
            if rd.namespaced and ns:
                lo = bisect.bisect_left(keys, ns + "/")
                hi = bisect.bisect_left(keys, ns + "0")  # '0' is the byte after '/'
            if start_key is not None:
                lo = max(lo, bisect.bisect_right(keys, start_key))
            items = []
            next_key = None
            remaining = 0
            selective = bool(label_reqs or field_reqs)
            for idx in range(lo, hi):
                k = keys[idx]
                e = objs[k]
                o = e.obj
                if label_reqs and not label_match(label_reqs, (o.get("metadata") or {}).get("labels")):
                    continue
                if field_reqs and not field_match(field_reqs, o):
                    continue
                if limit and len(items) >= limit:
                    next_key = keys[idx - 1]
                    remaining = 0 if selective else (hi - idx)
                    break
                items.append(e)
            list_rv = snap_rv
        meta = {"resourceVersion": str(list_rv)}
        if next_key is not None:
            meta["continue"] = base64.b64encode(dumps({"v": "meta.k8s.io/v1", "rv": list_rv, "start": next_key})).decode().rstrip("=")
            if remaining:
                meta["remainingItemCount"] = remaining
        return items, meta

    def list_bytes(self, rd, items, meta) -> bytes:
        head = b'{"kind":"' + rd.list_kind.encode() + b'","apiVersion":"' + rd.api_version.encode() + b'","metadata":' + dumps(meta) + b',"items":['
        parts = []
        for e in items:
            parts.append(e.json if rd.identity_view(e.obj) else dumps(rd.to_view(e.obj)))
        return head + b",".join(parts) + b"]}"


# ---------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------


def _truthy(v):
    return v is not None and v.lower() in ("1", "true", "yes", "")


# -- core/v1 Secret writes ---------------------------------------------------


def _secret_on_write(rd, obj):
    """stringData is merged into data and dropped (pkg/apis/core/v1/conversion.go
    Convert_v1_Secret_To_core_Secret); type defaults to Opaque (pkg/apis/core/v1/defaults.go
    SetDefaults_Secret)."""
    if (rd.group, rd.plural) != ("", "secrets"):
        return
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        obj["data"] = data
    if not obj.get("type"):
        obj["type"] = "Opaque"


# -- protobuf request bodies (Secrets only) -----------------------------------
# client-go sends core kinds as protobuf when a client asks for it (Helm's release Secrets).
# Envelope: staging/src/k8s.io/apimachinery/pkg/runtime/serializer/protobuf/protobuf.go
# (the "k8s\x00" prefix, then runtime.Unknown {typeMeta=1 {apiVersion=1, kind=2}, raw=2});
# field numbers: staging/src/k8s.io/api/core/v1/generated.proto (Secret) and
# staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto (ObjectMeta).

PROTOBUF_CT = "application/vnd.kubernetes.protobuf"
_PB_PREFIX = b"k8s\x00"


def _pb_fields(buf: bytes):
    """(field number, wire type, value) of one message: int for varints, bytes otherwise."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    while i < n:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, value


def _pb_map_entry(buf: bytes):
    key = value = b""
    for num, _wire, v in _pb_fields(buf):
        if num == 1:
            key = v
        elif num == 2:
            value = v
    return key, value


def _pb_object_meta(buf: bytes) -> dict:
    """The client-settable ObjectMeta fields; server-set ones (timestamps, generation,
    managedFields) and ownerReferences are not decoded."""
    strings = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    maps = {11: "labels", 12: "annotations"}
    meta: dict = {}
    for num, wire, v in _pb_fields(buf):
        if wire != 2:
            continue
        if num in strings:
            meta[strings[num]] = v.decode()
        elif num in maps:
            k, val = _pb_map_entry(v)
            meta.setdefault(maps[num], {})[k.decode()] = val.decode()
        elif num == 14:
            meta.setdefault("finalizers", []).append(v.decode())
    return meta


def decode_protobuf_secret(body: bytes) -> dict:
    """A core/v1 Secret in the Kubernetes protobuf encoding, as its JSON object."""
    if not body.startswith(_PB_PREFIX) or len(body) == len(_PB_PREFIX):
        raise ValueError(f"provided data does not appear to be a protobuf message, expected prefix {list(_PB_PREFIX)}")
    type_meta: dict = {}
    raw = b""
    for num, wire, v in _pb_fields(body[len(_PB_PREFIX):]):
        if num == 1 and wire == 2:
            type_meta = {n: tv.decode() for n, _w, tv in _pb_fields(v)}
        elif num == 2 and wire == 2:
            raw = v
    obj: dict = {}
    if type_meta.get(1):
        obj["apiVersion"] = type_meta[1]
    if type_meta.get(2):
        obj["kind"] = type_meta[2]
    obj["metadata"] = {}
    for num, wire, v in _pb_fields(raw):
        if num == 1 and wire == 2:
            obj["metadata"] = _pb_object_meta(v)
        elif num in (2, 4) and wire == 2:
            k, val = _pb_map_entry(v)
            if num == 2:
                obj.setdefault("data", {})[k.decode()] = base64.b64encode(val).decode()
            else:
                obj.setdefault("stringData", {})[k.decode()] = val.decode()
        elif num == 3 and wire == 2:
            obj["type"] = v.decode()
        elif num == 5 and wire == 0:
            obj["immutable"] = bool(v)
    return obj


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube"
    sys_version = ""

    # -- plumbing ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):
        if getattr(self.server, "log_requests", False):
            sys.stderr.write("fake_kube: %s - %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline(65537)
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, code, body: bytes, ctype=JSON_CT, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if 200 <= code < 300:
            for w in getattr(_REQ, "warnings", None) or ():
                self.send_header("Warning", '299 - "' + w.replace("\\", "\\\\").replace('"', '\\"') + '"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, code, obj, headers=None):
        self._send(code, dumps(obj), headers=headers)

    def _send_error(self, e: ApiError):
        self._send_json(e.code, e.status(), headers=e.headers)

    def _json_body(self, body: bytes):
        if not body:
            raise err_bad_request("the request body is empty")
        ct = (self.headers.get("Content-Type") or JSON_CT).split(";")[0].strip().lower()
        try:
            if ct in ("application/yaml", "application/x-yaml", "text/yaml") and yaml is not None:
                return yaml.safe_load(body.decode())
            return json.loads(body)
        except Exception as e:
            raise err_bad_request(f"error decoding the request body: {e}")

    def _object_body(self, rd, body: bytes):
        """A create/update body: JSON or YAML, or protobuf for a Secret (see CONTRACT.md)."""
        ct = (self.headers.get("Content-Type") or JSON_CT).split(";")[0].strip().lower()
        if ct != PROTOBUF_CT:
            return self._json_body(body)
        if (rd.group, rd.plural) != ("", "secrets"):
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media types include: "
                           "application/json, application/yaml")
        try:
            return decode_protobuf_secret(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise err_bad_request(f"error decoding the request body: {e}")

    def _dispatch(self, method):
        try:
            body = self._read_body()
        except Exception:
            self.close_connection = True
            return
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        _REQ.warnings = []
        _REQ.field_validation = None
        self.state.tls.manager = None
        try:
            fv = q.get("fieldValidation")
            if fv and method in ("POST", "PUT", "PATCH"):
                if fv not in ("Ignore", "Warn", "Strict"):
                    raise err_bad_request(f"fieldValidation must be one of Ignore, Warn or Strict, got {fv}")
                _REQ.field_validation = fv
            if path.startswith("/_control"):
                return self._control(method, path, q, body)
            self._route(method, path, q, body)
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - surfaced to the client as a 500
            traceback.print_exc()
            self._send_error(ApiError(500, "InternalError", f"Internal error occurred: {e!r}"))

    # -- accounting and faults ---------------------------------------------

    def _account(self, method, path, verb_key):
        st = self.state
        with st.cond:
            pk = f"{method} {path}"
            st.path_counts[pk] = st.path_counts.get(pk, 0) + 1
            if verb_key:
                st.req_counts[verb_key] = st.req_counts.get(verb_key, 0) + 1
            for f in st.faults:
                if f["remaining"] <= 0:
                    continue
                if f.get("method", "*") not in ("*", method):
                    continue
                if not path.startswith(f.get("path", "")):
                    continue
                if f.get("verb") and (not verb_key or verb_key.split(" ")[0] != f["verb"]):
                    continue
                f["remaining"] -= 1
                f["hits"] += 1
                break
            else:
                return
        if f.get("delaySeconds"):
            time.sleep(min(float(f["delaySeconds"]), 30.0))
        code = int(f.get("code", 500))
        if code < 400:
            return  # a pure delay fault
        reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
                  409: "Conflict", 403: "Forbidden", 404: "NotFound", 410: "Expired"}.get(code, "InternalError")
        headers = {}
        det = None
        if code in (429, 503) or f.get("retryAfterSeconds"):
            ra = int(f.get("retryAfterSeconds", 1))
            headers["Retry-After"] = ra
            det = {"retryAfterSeconds": ra}
        raise ApiError(code, reason, f.get("message") or f"injected fault ({code})", det, headers)

    # -- routing -----------------------------------------------------------

    def _route(self, method, path, q, body):
        st = self.state
        segs = [s for s in path.split("/") if s]
        if path in ("/healthz", "/livez", "/readyz"):
            self._account(method, path, None)
            return self._send(200, b"ok", "text/plain; charset=utf-8")
        if path == "/version":
            self._account(method, path, None)
            return self._send_json(200, SERVER_VERSION)
        if segs and segs[0] in ("openapi", "swagger.json") or path.startswith("/swagger"):
            self._account(method, path, None)
            return self._openapi(path)
        if not segs or segs[0] not in ("api", "apis"):
            raise err_path_not_found()
        if segs[0] == "api":
            if len(segs) == 1:
                self._account(method, path, None)
                host = self.headers.get("Host") or "%s:%s" % self.server.server_address[:2]
                return self._send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]})
            group, version, rest = "", segs[1], segs[2:]
            if version != "v1":
                raise err_path_not_found()
        else:
            if len(segs) == 1:
                self._account(method, path, None)
                return self._send_json(200, self._group_list())
            group = segs[1]
            if len(segs) == 2:
                self._account(method, path, None)
                for g, versions in st.registry.groups():
                    if g == group and g:
                        return self._send_json(200, self._group(g, versions))
                raise err_path_not_found()
            version, rest = segs[2], segs[3:]
        with st.cond:
            gv_defs = st.registry.resources(group, version)
        if not gv_defs:
            self._account(method, path, None)  # counted by path (e.g. a CRD's paths while it is absent)
            raise err_path_not_found()
        if not rest:
            self._account(method, path, None)
            return self._send_json(200, self._resource_list(group, version, gv_defs))
        legacy_watch = False
        if rest[0] == "watch":
            legacy_watch = True
            rest = rest[1:]
        ns = None
        by_plural = {rd.plural: rd for rd in gv_defs}
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural and by_plural[rest[2]].namespaced:
            ns = rest[1]
            rest = rest[2:]
        rd = by_plural.get(rest[0]) if rest else None
        if rd is None:
            self._account(method, path, None)  # counted by path (e.g. a CRD's paths while it is absent)
            raise err_path_not_found()
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) >= 3 else None
        if len(rest) > 3 or (sub and not (sub == "status" and rd.status)):
            raise err_path_not_found()
        if rd.namespaced and ns is None and name is not None:
            raise err_path_not_found()
        watch = legacy_watch or _truthy(q.get("watch")) if "watch" in q or legacy_watch else False
        if name is None:
            if method == "GET":
                verb = "watch" if watch else "list"
            elif method == "POST":
                verb = "create"
            elif method == "DELETE":
                verb = "deletecollection"
            else:
                raise err_method_not_allowed()
        else:
            if legacy_watch and method == "GET":
                verb = "watch"
                q = dict(q)
                q["fieldSelector"] = ",".join(x for x in (q.get("fieldSelector"), f"metadata.name={name}") if x)
                name = None
            else:
                verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
                if verb is None:
                    raise err_method_not_allowed()
        if rd.namespaced and ns is None and verb in ("create", "deletecollection"):
            raise err_method_not_allowed()
        self._account(method, path, f"{verb} {rd.qualified}{'/' + sub if sub else ''}")
        if verb not in rd.verbs and not sub:
            raise err_method_not_allowed()
        dry_run = bool(q.get("dryRun"))
        if verb in ("create", "update", "patch"):
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            st.tls.manager = (_manager_or_user_agent(q.get("fieldManager"), self.headers.get("User-Agent")),
                              "Apply" if ctype == "application/apply-patch+yaml" else "Update", sub, rd.api_version)
        else:
            st.tls.manager = None
        if verb == "list":
            items, meta = st.list(rd, ns, q)
            # Latency after the snapshot is taken: changes made meanwhile reach the client through
            # the watch that starts at this list's resourceVersion, as on a slow real server.
            delay = st.latency_for(rd, "listPage")
            if not q.get("continue"):
                delay += st.latency_for(rd, "list")
            st.pause(delay)
            if self._wants_table():
                return self._send_json(200, self._table(rd, items, meta))
            return self._send(200, st.list_bytes(rd, items, meta))
        if verb == "watch":
            return self._watch(rd, ns, q)
        if verb == "get":
            e = st.get(rd, ns, name)
            if self._wants_table():
                return self._send_json(200, self._table(rd, [e], {"resourceVersion": e.obj["metadata"]["resourceVersion"]}))
            return self._send_entry(200, rd, e)
        if verb == "create":
            e = st.create(rd, ns, self._object_body(rd, body), dry_run=dry_run)
            return self._send_entry(201, rd, e)
        if verb == "update":
            e, created = st.update(rd, ns, name, self._object_body(rd, body), subresource=sub, dry_run=dry_run)
            return self._send_entry(201 if created else 200, rd, e)
        if verb == "patch":
            e, created = st.patch(rd, ns, name, self.headers.get("Content-Type"), body, subresource=sub,
                                  dry_run=dry_run, field_manager=q.get("fieldManager"))
            return self._send_entry(201 if created else 200, rd, e)
        if verb == "delete":
            opts = {}
            if body:
                try:
                    opts = json.loads(body) or {}
                except ValueError:
                    raise err_bad_request("invalid DeleteOptions body")
            if "gracePeriodSeconds" in q:
                opts["gracePeriodSeconds"] = q["gracePeriodSeconds"]
            e = st.delete(rd, ns, name, opts, dry_run=dry_run)
            return self._send_entry(200, rd, e)
        if verb == "deletecollection":
            opts = json.loads(body) if body else {}
            items, _meta = st.list(rd, ns, {k: v for k, v in q.items() if k in ("labelSelector", "fieldSelector")})
            deleted = []
            for e in items:
                m = e.obj["metadata"]
                try:
                    deleted.append(st.delete(rd, m.get("namespace"), m["name"], opts, dry_run=dry_run))
                except ApiError as err:
                    if err.code != 404:
                        raise
            return self._send(200, st.list_bytes(rd, deleted, {"resourceVersion": str(st.rv)}))
        raise err_method_not_allowed()

    def _send_entry(self, code, rd, e: Entry):
        if rd.identity_view(e.obj):
            return self._send(code, e.json)
        return self._send_json(code, rd.to_view(e.obj))

    # -- discovery ---------------------------------------------------------

    def _group(self, g, versions):
        vs = [{"groupVersion": f"{g}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": vs, "preferredVersion": vs[0]}

    def _group_list(self):
        with self.state.cond:
            groups = [self._group(g, vs) for g, vs in self.state.registry.groups() if g]
        for gr in groups:
            gr.pop("kind")
            gr.pop("apiVersion")
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _resource_list(self, group, version, defs):
        res = []
        for rd in defs:
            r = {"name": rd.plural, "singularName": rd.singular, "namespaced": rd.namespaced, "kind": rd.kind,
                 "verbs": rd.verbs}
            if rd.short_names:
                r["shortNames"] = rd.short_names
            if rd.categories:
                r["categories"] = rd.categories
            res.append(r)
            if rd.status:
                res.append({"name": rd.plural + "/status", "singularName": "", "namespaced": rd.namespaced,
                            "kind": rd.kind, "verbs": SUB_VERBS})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": res}

    def _openapi(self, path):
        accept = self.headers.get("Accept") or ""
        if path == "/openapi/v2":
            if "protobuf" in accept and "json" not in accept:
                # An empty protobuf message is a valid, empty openapi_v2.Document: kubectl then
                # finds no schema for any kind and skips client-side validation.
                return self._send(200, b"", "application/octet-stream")
            return self._send_json(200, {"swagger": "2.0", "info": {"title": "fake-kube", "version": "v1.30.0"},
                                         "paths": {}, "definitions": {}})
        if path == "/openapi/v3":
            return self._send_json(200, {"paths": {}})
        raise err_path_not_found()

    # -- tables (kubectl's human-readable output) ---------------------------

    def _wants_table(self):
        accept = self.headers.get("Accept") or ""
        return "as=Table" in accept and "g=meta.k8s.io" in accept

    def _table(self, rd, items, meta):
        accept = (self.headers.get("Accept") or "").replace(" ", "")
        table_version = "v1" if "as=Table;v=v1;g=meta.k8s.io" in accept else "v1beta1"
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        if _is_node(rd):
            return self._node_table(table_version, items, meta)
        if rd.group == "" and rd.plural == "pods":
            cols += [{"name": n, "type": t, "format": "", "description": n, "priority": 0}
                     for n, t in (("Ready", "string"), ("Status", "string"), ("Restarts", "integer"))]
            cols += [{"name": n, "type": "string", "format": "", "description": n, "priority": 1}
                     for n in ("IP", "Node")]
        elif rd.group == "" and rd.plural == "namespaces":
            cols.append({"name": "Status", "type": "string", "format": "", "description": "phase", "priority": 0})
        # custom resources: Name + the printer columns, or Age alone when there are none
        # (customresource_handler.go serveDefaultColumnsIfEmpty; tableconvertor renders `date` as an age)
        pcols = rd.printer_columns if rd.custom else []
        if rd.custom and not pcols:
            pcols = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for pc in pcols:
            cols.append({"name": pc.get("name", ""), "type": pc.get("type", "string"), "format": pc.get("format", ""),
                         "description": pc.get("description", ""), "priority": pc.get("priority", 0)})
        if not rd.custom:
            cols.append({"name": "Age", "type": "string", "format": "", "description": "age", "priority": 0})
        rows = []
        for e in items:
            o = rd.to_view(e.obj)
            m = o.get("metadata") or {}
            cells = [m.get("name", "")]
            if rd.group == "" and rd.plural == "pods":
                stt = o.get("status") or {}
                # sidecars (restartable init containers) count in READY, as kubectl's printPod does
                sidecars = {c.get("name") for c in (o.get("spec") or {}).get("initContainers") or []
                            if c.get("restartPolicy") == "Always"}
                cs = (stt.get("containerStatuses") or []) + [
                    c for c in stt.get("initContainerStatuses") or [] if c.get("name") in sidecars]
                n = len((o.get("spec") or {}).get("containers") or []) + len(sidecars)
                ready = sum(1 for c in cs if c.get("ready"))
                phase = stt.get("phase", "")
                if m.get("deletionTimestamp"):
                    phase = "Terminating"
                cells += [f"{ready}/{n}", phase, sum(int(c.get("restartCount") or 0) for c in cs),
                          stt.get("podIP") or "<none>", (o.get("spec") or {}).get("nodeName") or "<none>"]
            elif rd.group == "" and rd.plural == "namespaces":
                cells.append((o.get("status") or {}).get("phase", ""))
            for pc in pcols:
                v = _jsonpath_simple(o, pc.get("jsonPath", ""))
                if pc.get("type") == "date" and isinstance(v, str):
                    v = _age(v)
                cells.append("<none>" if v is None else v)
            if not rd.custom:
                cells.append(_age(m.get("creationTimestamp")))
            partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": m}
            rows.append({"cells": cells, "object": partial})
        return {"kind": "Table", "apiVersion": f"meta.k8s.io/{table_version}", "metadata": meta,
                "columnDefinitions": cols, "rows": rows}

    def _node_table(self, table_version, items, meta):
        cols = [{"name": n, "type": "string", "format": "name" if n == "Name" else "", "description": n, "priority": p}
                for n, p in node_rules.TABLE_COLUMNS]
        rows = [{"cells": node_rules.table_cells(e.obj, _age((e.obj.get("metadata") or {}).get("creationTimestamp"))),
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": e.obj.get("metadata") or {}}} for e in items]
        return {"kind": "Table", "apiVersion": f"meta.k8s.io/{table_version}", "metadata": meta,
                "columnDefinitions": cols, "rows": rows}

    # -- watch -------------------------------------------------------------

    def _watch(self, rd, ns, q):
        st = self.state
        label_reqs = parse_label_selector(q.get("labelSelector"))
        field_reqs = parse_field_selector(q.get("fieldSelector"), rd)
        rv_param = q.get("resourceVersion") or ""
        rv_match = q.get("resourceVersionMatch")
        bookmarks = _truthy(q.get("allowWatchBookmarks")) if "allowWatchBookmarks" in q else False
        sie = q.get("sendInitialEvents")
        # apimachinery pkg/apis/meta/internalversion/validation validateWatchOptions, as
        # called by apiserver endpoints/handlers/get.go ListResource with the WatchList gate
        causes = []
        if sie is not None:
            if rv_match != "NotOlderThan":
                causes.append(("resourceVersionMatch", "FieldValueForbidden",
                               "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"))
            if not st.watch_list:
                causes.append(("sendInitialEvents", "FieldValueForbidden",
                               "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"))
        if rv_match:
            if sie is None:
                causes.append(("resourceVersionMatch", "FieldValueForbidden",
                               "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"))
            if rv_match != "NotOlderThan":
                causes.append(("resourceVersionMatch", "FieldValueNotSupported",
                               f'Unsupported value: "{rv_match}": supported values: "NotOlderThan"'))
        if causes:
            raise err_invalid(LIST_OPTIONS, "", causes)
        if sie is not None and _truthy(sie) and not bookmarks:
            # the watch cache (cacher.go) needs bookmarks to send the initial-events-end one
            raise err_invalid(LIST_OPTIONS, "", [("allowWatchBookmarks", "FieldValueForbidden",
                                                  "Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true")])
        try:
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else st.watch_timeout_max
        except ValueError:
            raise err_bad_request(f"invalid timeoutSeconds {q.get('timeoutSeconds')!r}")
        timeout = max(0.0, min(timeout, st.watch_timeout_max))
        if rv_param and rv_param != "0":
            try:
                start = int(rv_param)
            except ValueError:
                raise err_bad_request(f'resourceVersion: Invalid value: "{rv_param}": must be an integer')
        else:
            start = None
        initial = []
        error = None
        self._watch_table = self._wants_table()
        self._watch_table_headers_sent = False
        send_initial = (start is None) if sie is None else _truthy(sie)
        initial_end_bookmark = sie is not None and _truthy(sie)
        with st.cond:
            store = st.store(rd.storage)
            if start is not None and start > st.rv:
                st.cond.wait_for(lambda: st.rv >= start, timeout=3.0)
                if start > st.rv:
                    error = ApiError(504, "Timeout", f"Too large resource version: {start}, current: {st.rv}",
                                     {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                                      "retryAfterSeconds": 1})
            if error is None and send_initial:
                cursor = st.rv
                keys = store.sorted_keys()
                lo, hi = 0, len(keys)
                if rd.namespaced and ns:
                    lo, hi = bisect.bisect_left(keys, ns + "/"), bisect.bisect_left(keys, ns + "0")
                for k in keys[lo:hi]:
                    e = store.objects[k]
                    if self._matches(rd, label_reqs, field_reqs, e.obj):
                        initial.append(e)
                if start is not None and cursor < start:
                    cursor = start
            elif error is None:
                cursor = start if start is not None else st.rv
                if cursor < store.hist.horizon:
                    error = err_expired(f"too old resource version: {cursor} ({store.hist.horizon})")
            else:
                cursor = st.rv
            handle = WatchHandle(rd, ns, q.get("labelSelector"), q.get("fieldSelector"), cursor, bookmarks,
                                 self.headers.get("User-Agent"), "%s:%s" % self.client_address[:2])
            if error is None:
                st.watches[handle.id] = handle
        try:
            # Latency before the response starts; the start point is already fixed, so nothing
            # written meanwhile is lost.
            st.pause(st.latency_for(rd, "watch"))
            self.send_response(200)
            self.send_header("Content-Type", JSON_CT)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            if error is not None:
                self._chunk(dumps({"type": "ERROR", "object": error.status()}) + b"\n")
                self._chunk(b"")
                return
            self.connection.settimeout(60)
            self._stream(handle, rd, store, label_reqs, field_reqs, initial, initial_end_bookmark, timeout)
        finally:
            with st.cond:
                st.watches.pop(handle.id, None)

    def _chunk(self, data: bytes):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _matches(rd, label_reqs, field_reqs, obj):
        if label_reqs and not label_match(label_reqs, (obj.get("metadata") or {}).get("labels")):
            return False
        if field_reqs and not field_match(field_reqs, obj):
            return False
        return True

    def _event_bytes(self, rd, type_, obj_or_entry):
        if getattr(self, "_watch_table", False):
            e = obj_or_entry if isinstance(obj_or_entry, Entry) else Entry(obj_or_entry)
            tbl = self._table(rd, [e], {"resourceVersion": e.obj["metadata"].get("resourceVersion", "")})
            if self._watch_table_headers_sent:
                tbl["columnDefinitions"] = []
            self._watch_table_headers_sent = True
            return dumps({"type": type_, "object": tbl}) + b"\n"
        if isinstance(obj_or_entry, Entry):
            e = obj_or_entry
            body = e.json if rd.identity_view(e.obj) else dumps(rd.to_view(e.obj))
        else:
            body = dumps(rd.to_view(obj_or_entry))
        return b'{"type":"' + type_.encode() + b'","object":' + body + b"}\n"

    def _bookmark(self, rd, rv, annotations=None):
        meta = {"resourceVersion": str(rv), "creationTimestamp": None}
        if annotations:
            meta["annotations"] = annotations
        return dumps({"type": "BOOKMARK", "object": {"kind": rd.kind, "apiVersion": rd.api_version, "metadata": meta}}) + b"\n"

    def _client_gone(self):
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if r:
                data = self.connection.recv(1, socket.MSG_PEEK)
                return data == b""
        except (OSError, ValueError):
            return True
        return False

    def _stream(self, handle, rd, store, label_reqs, field_reqs, initial, initial_end_bookmark, timeout):
        st = self.state
        ns_prefix = (handle.ns + "/") if (rd.namespaced and handle.ns) else None
        buf = []
        size = 0

        def flush():
            nonlocal buf, size
            if buf:
                self._chunk(b"".join(buf))
                buf, size = [], 0

        def add(b):
            nonlocal size
            buf.append(b)
            size += len(b)
            if size >= 65536:
                flush()

        for e in initial:
            add(self._event_bytes(rd, "ADDED", e))
            handle.events_sent += 1
        if initial_end_bookmark:
            add(self._bookmark(rd, handle.cursor, {"k8s.io/initial-events-end": "true"}))
            handle.bookmarks_sent += 1
        flush()
        deadline = time.time() + timeout
        interval = max(0.05, st.bookmark_interval)
        next_bm = time.time() + interval
        last_gone_check = time.time()
        while True:
            with st.cond:
                while True:
                    if handle.drop or st.closing:
                        break
                    h = store.hist
                    if handle.cursor < h.horizon:
                        break
                    i = bisect.bisect_right(h.rvs, handle.cursor)
                    if i < len(h.events):
                        break
                    now = time.time()
                    if now >= deadline or (handle.bookmarks and now >= next_bm):
                        break
                    wake = min(deadline, next_bm if handle.bookmarks else deadline, now + 1.0)
                    st.cond.wait(max(0.01, wake - now))
                    if time.time() - last_gone_check >= 1.0:
                        last_gone_check = time.time()
                        if self._client_gone():
                            handle.drop = "gone"
                            break
                drop = handle.drop or ("reset" if st.closing else None)
                h = store.hist
                expired = handle.cursor < h.horizon
                evs = []
                if drop in (None, "drain") and not expired:
                    i = bisect.bisect_right(h.rvs, handle.cursor)
                    evs = h.events[i:]
                current = st.rv
                horizon = h.horizon
            if drop == "gone":
                self.close_connection = True
                return
            if drop == "reset":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if drop == "clean":
                flush()
                self._chunk(b"")
                return
            if expired and drop != "drain":
                add(dumps({"type": "ERROR", "object": err_expired(
                    f"too old resource version: {handle.cursor} ({horizon})").status()}) + b"\n")
                flush()
                self._chunk(b"")
                return
            for ev in evs:
                if ns_prefix and not ev.key.startswith(ns_prefix):
                    continue
                b = self._filtered_event(rd, label_reqs, field_reqs, ev)
                if b:
                    add(b)
                    handle.events_sent += 1
            if evs:
                handle.cursor = evs[-1].rv
            if drop == "drain":
                flush()
                self._chunk(b"")
                return
            now = time.time()
            if handle.bookmarks and now >= next_bm:
                # every event of this resource up to `current` has been sent above
                handle.cursor = max(handle.cursor, current)
                add(self._bookmark(rd, handle.cursor))
                handle.bookmarks_sent += 1
                next_bm = now + max(0.05, st.bookmark_interval)
            flush()
            if now >= deadline:
                self._chunk(b"")
                return

    def _filtered_event(self, rd, label_reqs, field_reqs, ev: HistEvent):
        if not (label_reqs or field_reqs):
            return self._event_bytes(rd, ev.type, ev.entry)
        if ev.type == "ADDED":
            return self._event_bytes(rd, "ADDED", ev.entry) if self._matches(rd, label_reqs, field_reqs, ev.entry.obj) else None
        if ev.type == "DELETED":
            return self._event_bytes(rd, "DELETED", ev.entry) if self._matches(rd, label_reqs, field_reqs, ev.prev.obj) else None
        cur = self._matches(rd, label_reqs, field_reqs, ev.entry.obj)
        old = self._matches(rd, label_reqs, field_reqs, ev.prev.obj)
        if cur and old:
            return self._event_bytes(rd, "MODIFIED", ev.entry)
        if cur:
            return self._event_bytes(rd, "ADDED", ev.entry)
        if old:
            # like the watch cache: the previous content with the event's resourceVersion
            o = ev.prev.copy()
            o["metadata"]["resourceVersion"] = str(ev.rv)
            return self._event_bytes(rd, "DELETED", o)
        return None

    # -- controls ------------------------------------------------------------

    def _control(self, method, path, q, body):
        st = self.state
        segs = [s for s in path.split("/") if s][1:]
        data = {}
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                raise err_bad_request("control bodies are JSON")
        if segs == ["healthz"]:
            return self._send_json(200, {"ok": True, "resourceVersion": str(st.rv)})
        if segs == ["compact"] and method == "POST":
            keys = None
            if q.get("resource"):
                keys = [rd.storage for rd in st.registry.defs.values() if rd.plural == q["resource"] or rd.qualified == q["resource"]]
            rv, done = st.compact(keys)
            return self._send_json(200, {"resourceVersion": str(rv), "compacted": done})
        if segs == ["drop-watches"] and method == "POST":
            mode = q.get("mode") or data.get("mode") or "reset"
            if mode not in ("reset", "clean"):
                raise err_bad_request("mode is reset or clean")
            res = q.get("resource") or data.get("resource")
            with st.cond:
                hs = [h for h in st.watches.values() if not res or res in (h.rd.plural, h.rd.qualified)]
                for h in hs:
                    h.drop = mode
                st.cond.notify_all()
            return self._send_json(200, {"dropped": len(hs)})
        if segs == ["watches"]:
            with st.cond:
                return self._send_json(200, {"watches": [h.describe() for h in st.watches.values()]})
        if segs == ["requests"]:
            with st.cond:
                return self._send_json(200, {"total": sum(st.path_counts.values()), "byVerb": dict(st.req_counts),
                                             "byPath": dict(st.path_counts)})
        if segs == ["requests", "reset"] and method == "POST":
            with st.cond:
                st.req_counts.clear()
                st.path_counts.clear()
            return self._send_json(200, {"ok": True})
        if segs == ["faults"]:
            with st.cond:
                if method == "POST":
                    f = {"id": next(st._fault_ids), "path": data.get("path", ""), "method": data.get("method", "*"),
                         "verb": data.get("verb"), "code": int(data.get("code", 500)),
                         "remaining": int(data.get("count", 1)), "hits": 0,
                         "retryAfterSeconds": data.get("retryAfterSeconds"), "delaySeconds": data.get("delaySeconds"),
                         "message": data.get("message")}
                    st.faults.append(f)
                    return self._send_json(201, f)
                if method == "DELETE":
                    st.faults.clear()
                    return self._send_json(200, {"ok": True})
                return self._send_json(200, {"faults": list(st.faults)})
        if segs == ["config"]:
            with st.cond:
                if method in ("POST", "PATCH", "PUT"):
                    if "bookmarkIntervalSeconds" in data:
                        st.bookmark_interval = float(data["bookmarkIntervalSeconds"])
                    if "gracefulDeletion" in data:
                        st.graceful_deletion = bool(data["gracefulDeletion"])
                    if "historyLimit" in data:
                        st.history_limit = max(1, int(data["historyLimit"]))
                    if "autoCreateNamespaces" in data:
                        st.auto_create_namespaces = bool(data["autoCreateNamespaces"])
                    if "watchTimeoutMaxSeconds" in data:
                        st.watch_timeout_max = float(data["watchTimeoutMaxSeconds"])
                    if "watchList" in data:
                        st.watch_list = bool(data["watchList"])
                    for key, lk in (("listLatencySeconds", "list"), ("listPageLatencySeconds", "listPage"),
                                    ("watchLatencySeconds", "watch")):
                        if key in data:
                            st.latency[lk] = max(0.0, float(data[key] or 0.0))
                    if "latencyResources" in data:
                        st.latency["resources"] = list(data["latencyResources"] or [])
                    if "eventTTLSeconds" in data:
                        st.event_ttl = max(0.0, float(data["eventTTLSeconds"]))
                    st.cond.notify_all()
                return self._send_json(200, {"bookmarkIntervalSeconds": st.bookmark_interval,
                                             "gracefulDeletion": st.graceful_deletion,
                                             "historyLimit": st.history_limit,
                                             "autoCreateNamespaces": st.auto_create_namespaces,
                                             "watchTimeoutMaxSeconds": st.watch_timeout_max,
                                             "watchList": st.watch_list,
                                             "listLatencySeconds": st.latency["list"],
                                             "listPageLatencySeconds": st.latency["listPage"],
                                             "watchLatencySeconds": st.latency["watch"],
                                             "latencyResources": st.latency["resources"],
                                             "eventTTLSeconds": st.event_ttl,
                                             "resourceVersion": str(st.rv)})
        if segs == ["state"]:
            with st.cond:
                out = {}
                for sk, store in st.stores.items():
                    if q.get("resource") and q["resource"] not in (sk, sk.split("/", 1)[1]):
                        continue
                    out[sk] = {"objects": [e.obj for _, e in sorted(store.objects.items())],
                               "horizon": str(store.hist.horizon), "historySize": len(store.hist.events)}
                body_out = dumps({"resourceVersion": str(st.rv), "storages": out})
            return self._send(200, body_out)
        if segs == ["writes"]:
            with st.cond:
                out = []
                for sk, store in st.stores.items():
                    if q.get("resource") and q["resource"] not in (sk, sk.split("/", 1)[1]):
                        continue
                    out += [{"time": t, "resourceVersion": str(rv), "type": typ, "storage": sk, "key": k,
                             "object": e.obj} for t, rv, typ, k, e in store.writes]
            out.sort(key=lambda w: int(w["resourceVersion"]))
            return self._send(200, dumps({"writes": out}))
        if segs == ["bulk"] and method == "POST":
            return self._send_json(200, self._bulk(data))
        if segs == ["podgc"] and method == "POST":
            return self._send_json(200, {"deleted": self._podgc_orphans()})
        if len(segs) == 4 and segs[0] == "pods" and method in ("POST", "PATCH", "PUT"):
            ns, name, action = segs[1], segs[2], segs[3]
            rd = st.rd("", "v1", "pods")
            if action == "status":
                return self._send_entry(200, rd, self._set_pod_status(ns, name, data))
            if action == "terminate":
                return self._send_entry(200, rd, st.terminate_pod(ns, name, data.get("gracePeriodSeconds", 30)))
            if action == "finalize":
                return self._send_entry(200, rd, st.delete(rd, ns, name, {}, force_now=True))
        raise ApiError(404, "NotFound", f"no control endpoint {method} {path}")

    def _set_pod_status(self, ns, name, data):
        st = self.state
        rd = st.rd("", "v1", "pods")
        with st.cond:
            cur = st.get(rd, ns, name)
            obj = cur.copy()
            status = dict(obj.get("status") or {})
            spec = obj.get("spec") or {}
            if "podIP" in data:
                status["podIP"] = data["podIP"]
                status["podIPs"] = [{"ip": data["podIP"]}] if data["podIP"] else []
                if not data["podIP"]:
                    status.pop("podIP")
                    status.pop("podIPs")
            if "hostIP" in data:
                status["hostIP"] = data["hostIP"]
            if "phase" in data:
                status["phase"] = data["phase"]
            if "nodeName" in data:
                spec = dict(spec)
                spec["nodeName"] = data["nodeName"]
                obj["spec"] = spec
            if any(k in data for k in ("ready", "running", "restartCount")) or "containerStatuses" not in status:
                if "containerStatuses" not in data:
                    running = data.get("running", status.get("phase", "Pending") == "Running")
                    ready = bool(data.get("ready", running))
                    old_cs = {c.get("name"): c for c in status.get("containerStatuses") or []}
                    css = []
                    for c in spec.get("containers") or []:
                        prev = old_cs.get(c.get("name"), {})
                        rc = int(data.get("restartCount", prev.get("restartCount", 0)))
                        state = ({"running": {"startedAt": (prev.get("state") or {}).get("running", {}).get("startedAt") or now_ts()}}
                                 if running else {"waiting": {"reason": "ContainerCreating"}})
                        css.append({"name": c.get("name"), "image": c.get("image"), "imageID": "",
                                    "ready": ready and running, "started": running, "restartCount": rc,
                                    "state": state, "lastState": prev.get("lastState") or {}})
                    status["containerStatuses"] = css
                if "initContainerStatuses" not in data and spec.get("initContainers"):
                    # Like the kubelet (KEP-753): once the pod runs, regular init containers have
                    # terminated (Completed) and sidecars (restartPolicy: Always) keep running;
                    # both are reported in status.initContainerStatuses, in spec order.
                    old_ics = {c.get("name"): c for c in status.get("initContainerStatuses") or []}
                    ics = []
                    for c in spec["initContainers"]:
                        prev = old_ics.get(c.get("name"), {})
                        sidecar = c.get("restartPolicy") == "Always"
                        if sidecar:
                            rc = int(data.get("restartCount", prev.get("restartCount", 0)))
                            state = ({"running": {"startedAt": (prev.get("state") or {}).get("running", {}).get("startedAt") or now_ts()}}
                                     if running else {"waiting": {"reason": "PodInitializing"}})
                            ics.append({"name": c.get("name"), "image": c.get("image"), "imageID": "",
                                        "ready": ready and running, "started": running, "restartCount": rc,
                                        "state": state, "lastState": prev.get("lastState") or {}})
                        else:
                            state = ({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now_ts(),
                                                     "finishedAt": now_ts()}}
                                     if running else {"waiting": {"reason": "PodInitializing"}})
                            ics.append({"name": c.get("name"), "image": c.get("image"), "imageID": "",
                                        "ready": running, "started": False, "restartCount": 0,
                                        "state": state, "lastState": {}})
                    status["initContainerStatuses"] = ics
            if "containerStatuses" in data:
                status["containerStatuses"] = data["containerStatuses"]
            if "initContainerStatuses" in data:
                status["initContainerStatuses"] = data["initContainerStatuses"]
            if "ready" in data or "running" in data or "phase" in data or "conditions" not in status:
                # sidecars count towards the pod's readiness (KEP-753)
                sidecars = {c.get("name") for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"}
                css = (status.get("containerStatuses") or []) + [
                    c for c in status.get("initContainerStatuses") or [] if c.get("name") in sidecars]
                all_ready = bool(css) and all(c.get("ready") for c in css)
                t = now_ts()
                old = {c.get("type"): c for c in status.get("conditions") or []}

                def cond(typ, ok):
                    s = "True" if ok else "False"
                    prev = old.get(typ)
                    ltt = prev.get("lastTransitionTime") if prev and prev.get("status") == s else t
                    return {"type": typ, "status": s, "lastProbeTime": None, "lastTransitionTime": ltt}

                status["conditions"] = [cond("Initialized", True), cond("Ready", all_ready),
                                        cond("ContainersReady", all_ready), cond("PodScheduled", True)]
            if "status" in data and isinstance(data["status"], dict):
                status = merge_patch(status, data["status"])
            if status.get("phase") == "Running" and "startTime" not in status:
                status["startTime"] = now_ts()
            obj["status"] = status
            store = st.store(rd.storage)
            key = obj_key(True, ns, name)
            return st._commit_update(rd, store, key, cur, obj, None, True, False)

    def _podgc_orphans(self):
        """One pass of the pod GC controller's gcOrphaned (pkg/controller/podgc/gc_controller.go),
        without its 40 s quarantine: every pod bound to a Node that does not exist is marked
        Failed with a DisruptionTarget condition (MODIFIED), then deleted with grace 0."""
        st = self.state
        rd = st.rd("", "v1", "pods")
        deleted = []
        with st.cond:
            nodes = {e.obj["metadata"]["name"] for e in st.store("/nodes").objects.values()}
            store = st.store(rd.storage)
            for key, cur in sorted(store.objects.items()):
                node = (cur.obj.get("spec") or {}).get("nodeName")
                if not node or node in nodes:
                    continue
                ns, name = cur.obj["metadata"].get("namespace"), cur.obj["metadata"]["name"]
                failed = node_rules.orphan_status(cur.obj.get("status") or {}, now_ts())
                if failed is not None:
                    obj = cur.copy()
                    obj["status"] = failed
                    st._commit_update(rd, store, key, cur, obj, None, True, False)
                st.delete(rd, ns, name, {"gracePeriodSeconds": 0})
                deleted.append(f"{ns}/{name}")
        return deleted

    def _bulk(self, data):
        st = self.state
        objs = data.get("objects") or []
        upsert = bool(data.get("upsert"))
        created = updated = 0
        with st.cond:
            for body in objs:
                rd = _rd_for_object(st, body)
                meta = body.get("metadata") or {}
                ns = meta.get("namespace") or ("default" if rd.namespaced else None)
                name = meta.get("name")
                if upsert and name and obj_key(rd.namespaced, ns, name) in st.store(rd.storage).objects:
                    b = deep_copy(body)
                    b["metadata"].pop("resourceVersion", None)
                    st.update(rd, ns, name, b, bypass=True)
                    updated += 1
                else:
                    st.create(rd, ns, body, bypass=bool(data.get("createNamespaces", True)))
                    created += 1
            return {"created": created, "updated": updated, "resourceVersion": str(st.rv)}


POD_MUTABLE_SPEC = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def _manager_or_user_agent(manager, user_agent):
    """apiserver handlers/rest.go managerOrUserAgent: the fieldManager parameter, else the
    User-Agent up to its first '/', cut to 128 characters."""
    if manager:
        return manager
    return (user_agent or "").split("/", 1)[0][:128]


def _validate_events_v1(rd, obj, name, old):
    """What kube-apiserver checks on an events.k8s.io/v1 write and not on a core/v1 one
    (pkg/apis/core/validation/events.go ValidateEventCreate / ValidateEventUpdate): the name is a
    DNS subdomain of at most 253 characters (apimachinery NameIsDNSSubdomain, on create), and a
    series has count >= 2 and a lastObservedTime (validateV1EventSeries, on create and when the
    series changes). `obj` may be in either view: `series` has the same name in both."""
    causes = []
    if old is None and (not _DNS_SUBDOMAIN_RE.match(name) or len(name) > 253):
        why = "must be no more than 253 characters" if len(name) > 253 else (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
            "and must start and end with an alphanumeric character")
        causes.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": {why}'))
    series = obj.get("series")
    if series is not None and (old is None or series != old.get("series")):
        count = series.get("count") if isinstance(series, dict) else None
        if not isinstance(count, int) or count < 2:
            causes.append(("series.count", "FieldValueInvalid", 'Invalid value: "": should be at least 2'))
        if not isinstance(series, dict) or not series.get("lastObservedTime"):
            causes.append(("series.lastObservedTime", "FieldValueRequired", "Required value"))
    if causes:
        raise err_invalid(rd, name, causes)


def _is_node(rd):
    return rd.group == "" and rd.plural == "nodes"


def _raise_causes(rd, name, causes):
    if causes:
        raise err_invalid(rd, name, causes)


def _check_pod_spec_update(rd, name, old, new):
    """Pod specs are immutable except container images and a few fields (like the real server)."""
    def masked(spec):
        s = {k: v for k, v in spec.items() if k not in POD_MUTABLE_SPEC}
        for f in ("containers", "initContainers"):
            if isinstance(s.get(f), list):
                s[f] = [{k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c for c in s[f]]
        return s
    if masked(old) != masked(new):
        raise err_invalid(rd, name, [("spec", "FieldValueForbidden",
                                      "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                                      "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
                                      "`spec.tolerations` (only additions to existing tolerations) or "
                                      "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)")])


def _rd_for_object(st: State, body):
    av = body.get("apiVersion") or ""
    kind = body.get("kind") or ""
    group, _, version = av.rpartition("/")
    for rd in st.registry.defs.values():
        if rd.group == group and rd.version == version and rd.kind == kind:
            return rd
    raise err_bad_request(f"no resource for apiVersion={av!r} kind={kind!r}")


def _jsonpath_simple(obj, jp):
    cur = obj
    for p in [p for p in jp.strip().lstrip(".").split(".") if p]:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def _age(ts):
    try:
        t = time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except (TypeError, ValueError):
        return "<unknown>"
    d = max(0, int(time.time() - t))
    if d < 120:
        return f"{d}s"
    if d < 7200:
        return f"{d // 60}m"
    if d < 172800:
        return f"{d // 3600}h"
    return f"{d // 86400}d"


# ---------------------------------------------------------------------------
# Server and CLI
# ---------------------------------------------------------------------------


class FakeKubeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr, state: State, log_requests=False):
        super().__init__(addr, Handler)
        self.state = state
        self.log_requests = log_requests

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def kubeconfig_text(url, namespace="default"):
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: fake-kube\n"
        "  cluster:\n"
        f"    server: {url}\n"
        "contexts:\n"
        "- name: fake-kube\n"
        "  context:\n"
        "    cluster: fake-kube\n"
        "    user: fake-kube-user\n"
        f"    namespace: {namespace}\n"
        "current-context: fake-kube\n"
        "preferences: {}\n"
        "users:\n"
        "- name: fake-kube-user\n"
        "  user:\n"
        "    token: fake-kube-token\n"
    )


def load_seed(state: State, path):
    with open(path) as f:
        text = f.read()
    if yaml is not None:
        docs = list(yaml.safe_load_all(text))
    else:
        docs = [json.loads(text)]
    objs = []
    for d in docs:
        if not d:
            continue
        if isinstance(d, dict) and d.get("kind", "").endswith("List") and isinstance(d.get("items"), list):
            objs.extend(d["items"])
        else:
            objs.append(d)
    # CRDs and namespaces first, so that what follows can use them
    prio = {"CustomResourceDefinition": 0, "Namespace": 1}
    objs.sort(key=lambda o: prio.get(o.get("kind"), 2))
    with state.cond:
        for o in objs:
            rd = _rd_for_object(state, o)
            meta = o.get("metadata") or {}
            ns = meta.get("namespace") or ("default" if rd.namespaced else None)
            if meta.get("name") and obj_key(rd.namespaced, ns, meta["name"]) in state.store(rd.storage).objects:
                o = deep_copy(o)  # e.g. the project's own WorkerMetrics CRD replacing the built-in one
                o["metadata"].pop("resourceVersion", None)
                state.update(rd, ns, meta["name"], o, bypass=True)
            else:
                state.create(rd, ns, o, bypass=True)
    return len(objs)


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fake_kube", description="Fake Kubernetes API server for tests (see CONTRACT.md)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (loopback only; port 0 picks a free one)")
    p.add_argument("--ready-file", help="write the base URL here once listening")
    p.add_argument("--kubeconfig-out", help="write a kubeconfig for this server here")
    p.add_argument("--namespace", default="default", help="the kubeconfig context's namespace")
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between BOOKMARK events")
    p.add_argument("--history-limit", type=int, default=10000, help="watch events kept per resource")
    p.add_argument("--watch-timeout-max", type=float, default=1800.0, help="cap on a watch's duration (seconds)")
    p.add_argument("--graceful-deletion", action="store_true",
                   help="honour gracePeriodSeconds > 0 on pod DELETE (deletionTimestamp first)")
    p.add_argument("--auto-create-namespaces", action="store_true",
                   help="create a missing namespace on first use instead of answering 404")
    p.add_argument("--seed", action="append", default=[], help="YAML/JSON file of objects to preload (repeatable)")
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    p.add_argument("--watch-list", action="store_true",
                   help="enable the WatchList feature gate (streaming lists, sendInitialEvents=true)")
    p.add_argument("--no-workermetrics-crd", action="store_true",
                   help="start without the WorkerMetrics CRD (as after `helm install --skip-crds`)")
    p.add_argument("--event-ttl", type=float, default=3600.0,
                   help="seconds an Event lives after its last write (kube-apiserver --event-ttl, default 1 h)")
    p.add_argument("--list-latency", type=float, default=0.0, help="seconds added to every list (once per list)")
    p.add_argument("--list-page-latency", type=float, default=0.0, help="seconds added to every page of a list")
    p.add_argument("--watch-latency", type=float, default=0.0, help="seconds before a watch response starts")
    args = p.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        p.error("--listen must be a loopback address")
    state = State(history_limit=args.history_limit, bookmark_interval=args.bookmark_interval,
                  graceful_deletion=args.graceful_deletion, auto_create_namespaces=args.auto_create_namespaces,
                  watch_timeout_max=args.watch_timeout_max, workermetrics_crd=not args.no_workermetrics_crd,
                  watch_list=args.watch_list, event_ttl=args.event_ttl)
    state.latency.update({"list": max(0.0, args.list_latency), "listPage": max(0.0, args.list_page_latency),
                          "watch": max(0.0, args.watch_latency)})
    for s in args.seed:
        n = load_seed(state, s)
        sys.stderr.write(f"fake_kube: seeded {n} objects from {s}\n")
    if host == "::1":
        FakeKubeServer.address_family = socket.AF_INET6
    server = FakeKubeServer((host, int(port or 0)), state, log_requests=args.log_requests)
    url = server.url if host != "::1" else f"http://[::1]:{server.server_address[1]}"
    if args.kubeconfig_out:
        _write_atomic(args.kubeconfig_out, kubeconfig_text(url, args.namespace))
    if args.ready_file:
        _write_atomic(args.ready_file, url + "\n")
    print(f"fake_kube listening on {url}", flush=True)

    def _stop(_sig, _frm):
        with state.cond:
            state.closing = True
            state.cond.notify_all()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
