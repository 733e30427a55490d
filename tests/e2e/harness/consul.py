"""The in-repo Consul double (testing/consul-double): its process, its Consul API and its
control endpoints (outages, wipes, statistics, fault injection)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import requests

from .files import REPO_ROOT
from .net import free_port, http_get, http_ok, http_request
from .processes import ProcessManager, Runner, require_binary, safe_check
from .waits import START_TIMEOUT


def consul_double_bin() -> Path:
    """CONSUL_DOUBLE_BIN, else target/debug/consul-double; while testing/consul-double
    is its own workspace, its own target/ is tried too."""
    if os.environ.get("CONSUL_DOUBLE_BIN"):
        return Path(os.environ["CONSUL_DOUBLE_BIN"])
    main = REPO_ROOT / "target" / "debug" / "consul-double"
    standalone = REPO_ROOT / "testing" / "consul-double" / "target" / "debug" / "consul-double"
    return standalone if not main.exists() and standalone.exists() else main



class ConsulDouble(Runner):
    """The in-repo Consul double (testing/consul-double).

    ConsulDouble(procs, acl_token=None, datacenter=None, extra_args=(), binary=None,
                 acl_config=None)

    acl_token alone: ACLs on, default deny, that one management token. acl_config (a dict in
    the double's --acl-config form, see its CONTRACT.md) sets up tokens with rules; then
    acl_token names the token the harness itself reads and writes with (management).
    set_token_rules(secret, rules) edits a token's policy while clients run.

    addr ("127.0.0.1:P", for consul_sd_configs `server`), url (http://...,
    for workersd --consul-addr), control_url; down(), up(empty=False), wipe(),
    state(), stats(), reset_stats(), health(), api_get(path, **params),
    api_put(path, body), register(entity), catalog_services(),
    catalog_service(name), node_services(node), owned_entries(service, owner),
    owned_ports(service, owner).
    """

    name = "consul-double"
    env_remove_prefixes = ("CONSUL_DOUBLE_",)

    def __init__(
        self,
        procs: ProcessManager,
        acl_token: str | None = None,
        datacenter: str | None = None,
        extra_args: Sequence[str] = (),
        binary: Path | str | None = None,
        acl_config: Mapping[str, Any] | None = None,
    ):
        super().__init__(procs)
        self.binary = Path(binary) if binary else consul_double_bin()
        self.acl_token = acl_token
        self.acl_config_file: Path | None = None
        if acl_config is not None:
            self.acl_config_file = procs.path(procs.unique_name("consul-acl"), "acl.json")
            self.acl_config_file.write_text(json.dumps(acl_config))
        self.datacenter = datacenter
        self.extra_args = list(extra_args)
        self.port = free_port("127.0.0.1")
        self.control_port = free_port("127.0.0.1")
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        self.control_url = f"http://127.0.0.1:{self.control_port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--listen",
            self.addr,
            "--control-listen",
            f"127.0.0.1:{self.control_port}",
        ]
        if self.acl_config_file:
            argv += ["--acl-config", str(self.acl_config_file)]
        elif self.acl_token:
            argv += ["--acl-token", self.acl_token]
        if self.datacenter:
            argv += ["--datacenter", self.datacenter]
        return argv + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> "ConsulDouble":
        require_binary(self.binary, "consul-double (CONSUL_DOUBLE_BIN)")
        self._launch(self.argv())
        self._wait_ready(
            safe_check(lambda: http_ok(f"{self.control_url}/control/state")),
            f"consul-double control API on {self.control_url}",
            timeout,
        )
        return self

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.acl_token} if self.acl_token else {}

    def _control(self, action: str) -> None:
        r = http_request("POST", f"{self.control_url}/control/{action}", timeout=5)
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double /control/{action}: {r.status_code} {r.text}")

    def down(self) -> None:
        """Make the Consul API fail (simulated outage)."""
        self._control("down")

    def up(self, empty: bool = False) -> None:
        """API back; empty=True: the catalog comes back wiped (index reset)."""
        self._control("up?empty=true" if empty else "up")

    def wipe(self) -> None:
        """Forget every registration (simulated Consul data loss)."""
        self._control("wipe")

    def state(self) -> Any:
        r = http_get(f"{self.control_url}/control/state", timeout=5)
        r.raise_for_status()
        return r.json()

    def stats(self) -> Any:
        """Request counters (GET /control/stats)."""
        r = http_get(f"{self.control_url}/control/stats", timeout=5)
        r.raise_for_status()
        return r.json()

    def reset_stats(self) -> None:
        """Zero the request statistics (POST /control/reset-stats)."""
        self._control("reset-stats")

    def set_token_rules(self, secret: str, rules: Mapping[str, Any]) -> None:
        """Replace a token's policy rules (PUT /control/acl/rules), as an operator would."""
        r = http_request(
            "PUT",
            f"{self.control_url}/control/acl/rules",
            json={"secret_id": secret, "rules": dict(rules)},
            timeout=5,
        )
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double /control/acl/rules: {r.status_code} {r.text}")

    def refuse_service_writes(self, services: list[str]) -> None:
        """Fault injection: txn Service writes of these names fail per op (409)."""
        r = http_request("POST", f"{self.control_url}/control/refuse-service-writes",
                         json={"services": list(services)}, timeout=5)
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double refuse-service-writes: {r.status_code} {r.text}")

    def health(self) -> Any:
        r = http_get(f"{self.control_url}/control/health", timeout=5)
        r.raise_for_status()
        return r.json()

    def api_put(self, path: str, body: Any, **params) -> requests.Response:
        return http_request(
            "PUT",
            f"{self.url}{path}",
            params=params or None,
            json=body,
            headers=self._headers(),
            timeout=5,
        )

    def register(self, entity: Mapping[str, Any]) -> None:
        """PUT /v1/catalog/register (e.g. a foreign entry a test must see survive)."""
        r = self.api_put("/v1/catalog/register", dict(entity))
        if r.status_code != 200:
            raise RuntimeError(f"catalog/register: {r.status_code} {r.text}")

    def node_services(self, node: str) -> Any:
        r = self.api_get(f"/v1/catalog/node-services/{node}")
        r.raise_for_status()
        return r.json()

    def api_get(self, path: str, **params) -> requests.Response:
        return http_get(
            f"{self.url}{path}", params=params or None, headers=self._headers(), timeout=5
        )

    def catalog_services(self) -> dict[str, list[str]]:
        r = self.api_get("/v1/catalog/services")
        r.raise_for_status()
        return r.json()

    def catalog_service(self, name: str) -> list[dict]:
        r = self.api_get(f"/v1/catalog/service/{name}")
        r.raise_for_status()
        return r.json()

    def owned_entries(self, service: str, owner: str) -> list[dict]:
        """catalog_service(service) entries whose ServiceMeta names workersd `owner`."""
        return [
            e
            for e in self.catalog_service(service)
            if (e.get("ServiceMeta") or {}).get("external-source") == "workersd"
            and (e.get("ServiceMeta") or {}).get("workersd-owner") == owner
        ]

    def owned_ports(self, service: str, owner: str) -> list[int]:
        """Sorted ServicePorts of owned_entries (duplicates kept, so they show)."""
        return sorted(e["ServicePort"] for e in self.owned_entries(service, owner))

    # -- the local agent (start with extra_args=["--agent", "--node-name", "node-1", ...]) --

    def _agent_control(self, method: str, action: str) -> Any:
        r = http_request(method, f"{self.control_url}/control/agent{action}", timeout=5)
        if r.status_code // 100 != 2:
            raise RuntimeError(f"consul-double /control/agent{action}: {r.status_code} {r.text}")
        return r.json()

    def agent_state(self) -> Any:
        """The local agent's services and checks (GET /control/agent)."""
        return self._agent_control("GET", "")

    def agent_restart(self, dev: bool = False) -> Any:
        """Restart the agent: API registrations restored; dev=True: an agent run with -dev,
        everything lost (its first full sync then deletes its catalog entries)."""
        return self._agent_control("POST", "/restart?dev=true" if dev else "/restart")

    def agent_fail(self) -> Any:
        """Serf marks the agent's node failed: every service of the node is critical."""
        return self._agent_control("POST", "/fail")

    def agent_recover(self) -> Any:
        """Serf sees the agent's node alive again; the agent runs a full sync."""
        return self._agent_control("POST", "/recover")

    def agent_full_sync(self) -> Any:
        """Run the agent's periodic anti-entropy full sync now."""
        return self._agent_control("POST", "/full-sync")

    def health_service(self, name: str, passing: bool = False) -> list[dict]:
        """GET /v1/health/service/<name> (optionally ?passing)."""
        r = self.api_get(f"/v1/health/service/{name}", **({"passing": "true"} if passing else {}))
        r.raise_for_status()
        return r.json()
