"""Nomad ACL tokens with simple policies (hashicorp/nomad acl/acl.go, acl/policy.go).

A token's policy is {"node": "read"|"write"|"deny", "agent": ..., "namespaces":
{"name-or-glob": "read"|"write"|"deny"|[capabilities]}}; type "management" allows all.
The anonymous token (secret "") has the policy stored under "" (none: nothing allowed).
"""

from __future__ import annotations

import fnmatch

# acl/policy.go expandNamespacePolicy: the capabilities a coarse namespace policy grants.
_READ_CAPS = {"list-jobs", "parse-job", "read-job", "csi-list-volume", "csi-read-volume",
              "read-job-scaling", "list-scaling-policies", "read-scaling-policy",
              "read-logs", "read-fs", "host-volume-read"}
_WRITE_CAPS = _READ_CAPS | {"submit-job", "dispatch-job", "alloc-exec", "alloc-lifecycle",
                            "scale-job", "submit-recommendation", "csi-write-volume"}


def _caps(rule) -> set:
    if isinstance(rule, (list, tuple)):
        return set(rule)
    return {"read": _READ_CAPS, "write": _WRITE_CAPS}.get(rule, set())


class Acl:
    """A resolved ACL object for one token (what acl.ACL answers for the checks used here)."""

    def __init__(self, token: dict | None):
        self.management = bool(token) and token.get("type") == "management"
        self.policy = (token or {}).get("policy") or {}

    def _level_allows(self, key: str, want: str) -> bool:
        if self.management:
            return True
        level = self.policy.get(key, "deny")
        return level == "write" or (level == "read" and want == "read")

    def allow_node_read(self) -> bool:
        return self._level_allows("node", "read")

    def allow_agent_read(self) -> bool:
        return self._level_allows("agent", "read")

    def _ns_rule(self, ns: str):
        rules = self.policy.get("namespaces") or {}
        if ns in rules:
            return rules[ns]
        # Glob rules: the closest match (fewest characters left over) wins, as acl.go does.
        best, best_len = None, None
        for pat, rule in rules.items():
            if "*" in pat and fnmatch.fnmatchcase(ns, pat):
                left = len(ns) - len(pat.replace("*", ""))
                if best_len is None or left < best_len:
                    best, best_len = rule, left
        return best

    def allow_ns_op(self, ns: str, op: str) -> bool:
        if self.management:
            return True
        if ns == "*":
            # A wildcard request is allowed if any namespace rule grants the capability.
            return any(op in _caps(r) for r in (self.policy.get("namespaces") or {}).values())
        rule = self._ns_rule(ns)
        return rule is not None and op in _caps(rule)


class TokenNotFound(Exception):
    pass


def resolve(tokens: dict, secret: str) -> Acl:
    """tokens maps secret -> token; "" is the anonymous token. Unknown secret: TokenNotFound."""
    if secret == "":
        return Acl(tokens.get("", {"type": "client", "policy": {}}))
    tok = tokens.get(secret)
    if tok is None:
        raise TokenNotFound(secret)
    return Acl(tok)
