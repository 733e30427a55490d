"""Fidelity tests for the fake Nomad agent API (tests/support/fake_nomad).

Driven by a real Nomad API client from PyPI, python-nomad (tests/requirements.txt), and by
raw HTTP where the client has no call (blocking-query headers, Authorization: Bearer).
Everything runs on 127.0.0.1 and every wait is bounded.

    python3 -m pytest tests/support/test_fake_nomad.py -x -q
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import requests

try:
    import nomad
    import nomad.api.exceptions as nexc
except ImportError as e:  # a missing client must fail the run, not skip the fidelity check
    raise ImportError("python-nomad is missing: python3 -m pip install -r tests/requirements.txt") from e

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_nomad.client import FakeNomad, port_range  # noqa: E402

NO_PROXY = {"http": None, "https": None}


@pytest.fixture
def fn(tmp_path):
    with FakeNomad(tmp_path / "fn") as server:
        yield server


def client(fn, **kw):
    """A python-nomad client at the double (NOMAD_ADDR-style address)."""
    return nomad.Nomad(address=fn.url, timeout=kw.pop("timeout", 5), **kw)


def node_allocs_raw(n, node_id, timeout=5, **params):
    """python-nomad's own request path, with the blocking-query params it has no argument for."""
    return n.node.request(node_id, "allocations", method="get", params=params, timeout=timeout)


# ---------------------------------------------------------------------------
# /v1/agent/self: where the node ID is
# ---------------------------------------------------------------------------


def test_agent_self_carries_the_node_id_in_stats_client(fn):
    self_ = client(fn).agent.get_agent()
    assert self_["stats"]["client"]["node_id"] == fn.node_id
    assert self_["config"]["Client"]["Enabled"] is True
    assert self_["config"]["Region"] == "global" and self_["config"]["Datacenter"] == "dc1"
    assert self_["config"]["NodeName"] == "fake-node"
    # The agent's node is what /v1/node/:id answers for that ID.
    assert client(fn).node.get_node(fn.node_id)["ID"] == fn.node_id


# ---------------------------------------------------------------------------
# allocation shapes
# ---------------------------------------------------------------------------


def test_node_allocations_host_mode_shape_meta_ports_and_task_states(fn):
    a = fn.run_alloc("web", "app", "gunicorn", meta={"workersd_service": "web"},
                     group_meta={"workersd_path": "/metrics"}, task_meta={"workersd_ports_gunicorn": "8000-8001"},
                     ip="127.0.0.5", ports=port_range("w", 8000, 2), dynamic_ports={"admin": 23456})
    allocs = client(fn).node.get_allocations(fn.node_id)
    assert [x["ID"] for x in allocs] == [a["ID"]]
    x = allocs[0]
    assert (x["NodeID"], x["JobID"], x["TaskGroup"], x["Namespace"]) == (fn.node_id, "web", "app", "default")
    assert x["Name"] == "web.app[0]"
    assert (x["DesiredStatus"], x["ClientStatus"]) == ("run", "running")
    assert x["TaskStates"]["gunicorn"]["State"] == "running"
    assert x["TaskStates"]["gunicorn"]["Failed"] is False
    job = x["Job"]
    assert job["Meta"] == {"workersd_service": "web"}
    tg = job["TaskGroups"][0]
    assert tg["Name"] == "app" and tg["Meta"] == {"workersd_path": "/metrics"}
    assert tg["Tasks"][0]["Name"] == "gunicorn"
    assert tg["Tasks"][0]["Meta"] == {"workersd_ports_gunicorn": "8000-8001"}
    shared = x["AllocatedResources"]["Shared"]
    net = shared["Networks"][0]
    assert (net["Mode"], net["IP"]) == ("host", "127.0.0.5")
    assert [(p["Label"], p["Value"]) for p in net["ReservedPorts"]] == [("w0", 8000), ("w1", 8001)]
    assert [(p["Label"], p["Value"]) for p in net["DynamicPorts"]] == [("admin", 23456)]
    assert [(p["Label"], p["Value"], p["To"], p["HostIP"]) for p in shared["Ports"]] == [
        ("w0", 8000, 0, "127.0.0.5"), ("w1", 8001, 0, "127.0.0.5"), ("admin", 23456, 0, "127.0.0.5")]
    assert set(x["AllocatedResources"]["Tasks"]) == {"gunicorn"}
    assert x["NetworkStatus"] is None
    assert x["CreateIndex"] <= x["ModifyIndex"]
    # The job's own spec: dynamic ports are unassigned (Value 0) there.
    assert [p["Value"] for p in tg["Networks"][0]["DynamicPorts"]] == [0]


def test_meta_absent_is_null_and_allocation_get_is_the_same_object(fn):
    a = fn.run_alloc("plain", "g", "t")
    n = client(fn)
    x = n.allocation.get_allocation(a["ID"])
    assert x["Job"]["Meta"] is None
    assert x["Job"]["TaskGroups"][0]["Meta"] is None
    assert x["Job"]["TaskGroups"][0]["Tasks"][0]["Meta"] is None
    assert x["AllocatedResources"]["Shared"]["Networks"] is None
    assert x == n.node.get_allocations(fn.node_id)[0]


def test_bridge_mode_has_the_alloc_address_in_network_status(fn):
    a = fn.run_alloc("br", "g", "t", mode="bridge", ip="127.0.0.1", address="172.26.64.5",
                     ports=[{"label": "metrics", "value": 25000, "to": 9100}])
    x = client(fn).allocation.get_allocation(a["ID"])
    assert x["NetworkStatus"]["Address"] == "172.26.64.5"
    assert x["AllocatedResources"]["Shared"]["Networks"][0]["Mode"] == "bridge"
    assert x["AllocatedResources"]["Shared"]["Ports"] == [
        {"Label": "metrics", "Value": 25000, "To": 9100, "HostIP": "127.0.0.1", "IgnoreCollision": False}]


def test_client_status_transitions_and_stop(fn):
    n = client(fn)
    a = fn.run_alloc("j", "g", "t", status="pending")
    assert n.allocation.get_allocation(a["ID"])["TaskStates"]["t"]["State"] == "pending"
    fn.set_client_status(a["ID"], "running")
    x = n.allocation.get_allocation(a["ID"])
    assert x["ClientStatus"] == "running" and x["TaskStates"]["t"]["StartedAt"] != "0001-01-01T00:00:00Z"
    fn.set_client_status(a["ID"], "failed")
    x = n.allocation.get_allocation(a["ID"])
    assert (x["ClientStatus"], x["TaskStates"]["t"]["State"], x["TaskStates"]["t"]["Failed"]) == ("failed", "dead", True)

    b = fn.run_alloc("j", "g", "t", index=1)
    before = n.allocation.get_allocation(b["ID"])["ModifyIndex"]
    fn.stop_alloc(b["ID"])
    x = n.allocation.get_allocation(b["ID"])
    assert (x["DesiredStatus"], x["ClientStatus"], x["TaskStates"]["t"]["State"]) == ("stop", "complete", "dead")
    assert x["ModifyIndex"] > before

    c = fn.run_alloc("j", "g", "t", index=2)
    fn.set_client_status(c["ID"], "lost")
    x = n.allocation.get_allocation(c["ID"])
    assert (x["DesiredStatus"], x["ClientStatus"]) == ("stop", "lost")

    # The node's list: live allocs first, then terminal ones, each by ID (the "node" index).
    # (IDs sorting after every random one, so an ID-only order would put them last.)
    live = [fn.run_alloc("j", "g", "t", index=i, alloc_id=f"ffffffff-ffff-4fff-8fff-fffffffffff{i}")["ID"]
            for i in (3, 4)]
    done = sorted([a["ID"], b["ID"], c["ID"]])
    assert [x["ID"] for x in n.node.get_allocations(fn.node_id)] == sorted(live) + done


def test_job_update_bumps_version_and_alloc_modify_index_and_unknown_node_is_empty(fn):
    n = client(fn)
    a = fn.run_alloc("j", "g", "t", meta={"workersd_service": "a"})
    before = n.allocation.get_allocation(a["ID"])
    fn.set_meta(a["ID"], meta={"workersd_service": "b"}, task_meta={"t": {"workersd_ports": "8000-8003"}})
    x = n.allocation.get_allocation(a["ID"])
    assert x["Job"]["Meta"] == {"workersd_service": "b"} and x["Job"]["Version"] == before["Job"]["Version"] + 1
    assert x["Job"]["TaskGroups"][0]["Tasks"][0]["Meta"] == {"workersd_ports": "8000-8003"}
    assert x["AllocModifyIndex"] > before["AllocModifyIndex"] and x["ModifyIndex"] > before["ModifyIndex"]
    # A client-side update moves ModifyIndex only.
    fn.set_task_state(a["ID"], "t", "dead")
    y = n.allocation.get_allocation(a["ID"])
    assert y["ModifyIndex"] > x["ModifyIndex"] and y["AllocModifyIndex"] == x["AllocModifyIndex"]
    # Node.GetAllocs has no "node not found": an unknown node has no allocations.
    r = node_allocs_raw(n, "00000000-0000-0000-0000-000000000000")
    assert r.status_code == 200 and r.json() == []


def test_control_api_rejects_states_a_client_never_reports(fn):
    a = fn.run_alloc("j", "g", "t")
    with pytest.raises(RuntimeError, match="400"):
        fn.update_alloc(a["ID"], client_status="unknown")
    with pytest.raises(RuntimeError, match="400"):
        fn.set_task_state(a["ID"], "t", "exited")
    x = fn.update_alloc(a["ID"], client_status="lost")  # the servers' verdict, routed as such
    assert (x["DesiredStatus"], x["ClientStatus"], x["TaskStates"]["t"]["State"]) == ("stop", "lost", "running")


def test_unknown_allocation_is_404_alloc_not_found(fn):
    with pytest.raises(nexc.URLNotFoundNomadException) as e:
        client(fn).allocation.get_allocation("7d2c1a4e-0000-0000-0000-000000000000")
    assert e.value.nomad_resp.status_code == 404
    assert e.value.nomad_resp.text == "alloc not found"


# ---------------------------------------------------------------------------
# blocking queries on /v1/node/:id/allocations
# ---------------------------------------------------------------------------


def test_blocking_query_wakes_on_a_change_to_this_nodes_allocations(fn):
    n = client(fn, timeout=15)
    a = fn.run_alloc("web", "app", "t")
    r = node_allocs_raw(n, fn.node_id)
    index = int(r.headers["X-Nomad-Index"])
    assert index == r.json()[0]["ModifyIndex"]
    assert r.headers["X-Nomad-KnownLeader"] == "true" and r.headers["X-Nomad-LastContact"] == "0"
    out = {}

    def block():
        t0 = time.monotonic()
        out["r"] = node_allocs_raw(n, fn.node_id, timeout=15, index=index, wait="10s")
        out["took"] = time.monotonic() - t0

    th = threading.Thread(target=block)
    th.start()
    fn.wait_for_waiter(f"/v1/node/{fn.node_id}/allocations")
    # An allocation on another node moves the raft index but not this node's answer.
    other = fn.add_node("other", "127.0.0.9")["id"]
    fn.run_alloc("web", "app", "t", node=other)
    time.sleep(0.3)
    assert th.is_alive(), "a change on another node woke the blocking query"
    fn.set_task_state(a["ID"], "t", "dead")
    th.join(10)
    assert not th.is_alive()
    assert out["took"] < 5
    assert int(out["r"].headers["X-Nomad-Index"]) > index
    assert out["r"].json()[0]["TaskStates"]["t"]["State"] == "dead"


def test_wait_is_honoured_and_index_zero_answers_at_once(fn):
    n = client(fn)
    fn.run_alloc("web", "app", "t")
    index = int(node_allocs_raw(n, fn.node_id).headers["X-Nomad-Index"])
    t0 = time.monotonic()
    r = node_allocs_raw(n, fn.node_id, index=index, wait="400ms")
    took = time.monotonic() - t0
    # wait plus blockingRPC's jitter of up to a sixteenth; the unchanged index comes back.
    assert 0.4 <= took < 2.0, took  # not the 300 s default; the jitter adds at most 25 ms
    assert int(r.headers["X-Nomad-Index"]) == index
    t0 = time.monotonic()
    node_allocs_raw(n, fn.node_id, index=0, wait="5s")
    node_allocs_raw(n, fn.node_id, index=index - 1, wait="5s")
    assert time.monotonic() - t0 < 1.0


def test_empty_node_answers_the_allocs_table_index_and_gc_of_the_last_alloc_wakes(fn):
    n = client(fn, timeout=15)
    r = node_allocs_raw(n, fn.node_id)
    assert r.json() == [] and int(r.headers["X-Nomad-Index"]) >= 1
    a = fn.run_alloc("j", "g", "t")
    b = fn.run_alloc("j", "g", "t", index=1)
    index = int(node_allocs_raw(n, fn.node_id).headers["X-Nomad-Index"])
    # GC of one of two allocs leaves the max ModifyIndex as it was: no wake-up (Node.GetAllocs).
    fn.gc_alloc(a["ID"])
    r = node_allocs_raw(n, fn.node_id, index=index, wait="300ms")
    assert int(r.headers["X-Nomad-Index"]) == index and [x["ID"] for x in r.json()] == [b["ID"]]
    # GC of the last one: the allocs table index answers, which passed it.
    fn.gc_alloc(b["ID"])
    r = node_allocs_raw(n, fn.node_id, index=index, wait="5s")
    assert r.json() == [] and int(r.headers["X-Nomad-Index"]) > index


def test_bad_wait_and_index_are_400_with_nomads_text(fn):
    n = client(fn)
    for params, text in (({"wait": "5"}, "Invalid wait time"), ({"index": "x"}, "Invalid index"),
                         ({"stale": "maybe", "wait": "5"}, "Expect `true` or `false` for `stale` query string parameter"),
                         ({"per_page": "many"}, "Expect a number for `per_page` query string parameter")):
        with pytest.raises(nexc.BadRequestNomadException) as e:
            node_allocs_raw(n, fn.node_id, **params)
        assert e.value.nomad_resp.text == text
        assert e.value.nomad_resp.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_gzip_when_the_client_accepts_it(fn):
    fn.run_alloc("j", "g", "t")
    r = node_allocs_raw(client(fn), fn.node_id)  # python-nomad (requests) sends Accept-Encoding: gzip
    assert r.headers["Content-Encoding"] == "gzip" and r.json()[0]["JobID"] == "j"
    r = requests.get(f"{fn.url}/v1/node/{fn.node_id}/allocations", proxies=NO_PROXY, timeout=5,
                     headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in r.headers and r.json()[0]["JobID"] == "j"
    r = requests.get(f"{fn.url}/v1/node/{fn.node_id}/allocations", proxies=NO_PROXY, timeout=5,
                     headers={"Accept-Encoding": "deflate, gzip"})
    assert r.headers["Content-Encoding"] == "deflate" and r.json()[0]["JobID"] == "j"


def test_method_region_and_unknown_paths(fn):
    r = requests.post(f"{fn.url}/v1/node/{fn.node_id}/allocations", proxies=NO_PROXY, timeout=5)
    assert (r.status_code, r.text) == (405, "Invalid method")
    r = requests.get(f"{fn.url}/v1/nothing", proxies=NO_PROXY, timeout=5)
    assert (r.status_code, r.text) == (404, "")
    with pytest.raises(nexc.BaseNomadException) as e:
        client(fn, region="elsewhere").node.get_allocations(fn.node_id)
    assert (e.value.nomad_resp.status_code, e.value.nomad_resp.text) == (500, "No path to region")


# ---------------------------------------------------------------------------
# namespaces
# ---------------------------------------------------------------------------


def test_allocations_list_namespace_wildcard_and_prefix(fn):
    fn.add_namespace("team")
    a = fn.run_alloc("j", "g", "t")
    b = fn.run_alloc("k", "g", "t", namespace="team")
    n = client(fn)
    assert [x["ID"] for x in n.allocations.get_allocations()] == [a["ID"]]
    assert [x["ID"] for x in n.allocations.get_allocations(namespace="team")] == [b["ID"]]
    assert {x["ID"] for x in n.allocations.get_allocations(namespace="*")} == {a["ID"], b["ID"]}
    assert [x["ID"] for x in n.allocations.get_allocations(prefix=b["ID"][:8], namespace="*")] == [b["ID"]]
    stub = n.allocations.get_allocations()[0]
    assert stub["AllocatedResources"] is None and stub["JobType"] == "service"
    assert n.allocations.get_allocations(resources=True)[0]["AllocatedResources"] is not None
    # /v1/node/:id/allocations ignores ?namespace: every namespace's allocs of the node.
    assert {x["ID"] for x in n.node.get_allocations(fn.node_id)} == {a["ID"], b["ID"]}


# ---------------------------------------------------------------------------
# ACL
# ---------------------------------------------------------------------------


def test_acl_tokens_and_what_upstream_answers(tmp_path):
    with FakeNomad(tmp_path / "acl", acl=True, management_tokens=["mgmt-secret"]) as fn:
        fn.add_namespace("team")
        a = fn.run_alloc("j", "g", "t")
        fn.run_alloc("k", "g", "t", namespace="team")
        fn.add_token("reader", {"node": "read", "agent": "read", "namespaces": {"default": "read"}})
        fn.add_token("no-node", {"namespaces": {"*": "read"}})
        for token, text in ((None, "Permission denied"), ("bogus", "Permission denied"),
                            ("no-node", "Permission denied")):
            with pytest.raises(nexc.URLNotAuthorizedNomadException) as e:
                client(fn, token=token).node.get_allocations(fn.node_id)
            assert e.value.nomad_resp.text == text
        # The agent resolves tokens itself for /v1/agent/self: an unknown one is "not found".
        with pytest.raises(nexc.URLNotAuthorizedNomadException) as e:
            client(fn, token="bogus").agent.get_agent()
        assert e.value.nomad_resp.text == "ACL token not found"
        assert client(fn, token="reader").agent.get_agent()["stats"]["client"]["node_id"] == fn.node_id
        # node:read sees the node's allocs of namespaces it may read-job in, only.
        assert [x["ID"] for x in client(fn, token="reader").node.get_allocations(fn.node_id)] == [a["ID"]]
        assert len(client(fn, token="mgmt-secret").node.get_allocations(fn.node_id)) == 2
        r = requests.get(f"{fn.url}/v1/node/{fn.node_id}/allocations", proxies=NO_PROXY, timeout=5,
                         headers={"Authorization": "Bearer reader"})
        assert r.status_code == 200 and [x["ID"] for x in r.json()] == [a["ID"]]


# ---------------------------------------------------------------------------
# the agent going away, latency, request log
# ---------------------------------------------------------------------------


def test_agent_down_refuses_and_cuts_then_comes_back_on_the_same_port(fn):
    n = client(fn, timeout=15)
    a = fn.run_alloc("j", "g", "t")
    index = int(node_allocs_raw(n, fn.node_id).headers["X-Nomad-Index"])
    out = {}

    def block():
        try:
            node_allocs_raw(n, fn.node_id, timeout=15, index=index, wait="10s")
            out["err"] = None
        except nexc.BaseNomadException as e:
            out["err"] = e

    th = threading.Thread(target=block)
    th.start()
    fn.wait_for_waiter("/v1/node/")
    fn.agent_down()
    th.join(10)
    assert not th.is_alive() and out["err"] is not None, "the in-flight blocking query was not cut"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{fn.url}/v1/agent/self", proxies=NO_PROXY, timeout=5)
    fn.agent_up()
    assert [x["ID"] for x in client(fn).node.get_allocations(fn.node_id)] == [a["ID"]]


def test_servers_lost_is_500_no_servers_while_agent_self_answers(fn):
    n = client(fn, timeout=15)
    fn.run_alloc("j", "g", "t")
    index = int(node_allocs_raw(n, fn.node_id).headers["X-Nomad-Index"])
    out = {}

    def block():
        try:
            node_allocs_raw(n, fn.node_id, timeout=15, index=index, wait="10s")
        except nexc.BaseNomadException as e:
            out["resp"] = e.nomad_resp

    th = threading.Thread(target=block)
    th.start()
    fn.wait_for_waiter("/v1/node/")
    fn.servers_lost()
    th.join(10)
    assert not th.is_alive() and out["resp"].status_code == 500 and out["resp"].text == "no servers"
    with pytest.raises(nexc.BaseNomadException) as e:
        n.node.get_allocations(fn.node_id)
    assert (e.value.nomad_resp.status_code, e.value.nomad_resp.text) == (500, "no servers")
    s = n.agent.get_agent()
    assert s["stats"]["client"]["node_id"] == fn.node_id and s["stats"]["client"]["known_servers"] == ""
    fn.agent_up()
    assert len(n.node.get_allocations(fn.node_id)) == 1


def test_latency_and_request_log(fn):
    n = client(fn)
    fn.set_latency(1.0, "/v1/node/")
    t0 = time.monotonic()
    n.node.get_allocations(fn.node_id)
    assert time.monotonic() - t0 >= 1.0
    t0 = time.monotonic()
    n.agent.get_agent()
    assert time.monotonic() - t0 < 0.8  # other paths are not delayed
    fn.set_latency(0, "/v1/node/")
    node_allocs_raw(n, fn.node_id, index=1, wait="1s")
    reqs = fn.requests("/v1/node/")
    assert [r["status"] for r in reqs] == [200, 200]
    assert "index=1" in reqs[-1]["query"] and "wait=1s" in reqs[-1]["query"]


# ---------------------------------------------------------------------------
# TLS (tls { http = true, verify_https_client = true })
# ---------------------------------------------------------------------------


def _openssl(*args, cwd):
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=fake-nomad-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:client.global.nomad\n")
    for name, cn in (("server", "server.global.nomad"), ("client", "cli.global.nomad")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return {k: str(d / v) for k, v in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"),
                                        ("client_cert", "client.pem"), ("client_key", "client.key"))}


def test_https_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path / "pki")
    with FakeNomad(tmp_path / "tls", tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"]) as fn:
        assert fn.url.startswith("https://127.0.0.1:")
        fn.run_alloc("j", "g", "t")
        n = nomad.Nomad(address=fn.url, verify=pki["ca"], cert=(pki["client_cert"], pki["client_key"]))
        assert n.agent.get_agent()["stats"]["client"]["node_id"] == fn.node_id
        assert len(n.node.get_allocations(fn.node_id)) == 1
        # verify_https_client: no client certificate, no answer.
        with pytest.raises(nexc.BaseNomadException):
            nomad.Nomad(address=fn.url, verify=pki["ca"]).agent.get_agent()
        # And the server certificate is checked against the CA by the client.
        with pytest.raises(nexc.BaseNomadException):
            nomad.Nomad(address=fn.url, verify=True, cert=(pki["client_cert"], pki["client_key"])).agent.get_agent()


def test_cli_module_entry_and_ready_file_lines(tmp_path):
    """What a non-Python test (the Rust e2e) does: run the module, read the two-line ready file."""
    import subprocess

    ready = tmp_path / "ready"
    repo = Path(__file__).resolve().parents[2]
    node_id = "5f2c7a3e-8d1b-4c6a-9e0f-1a2b3c4d5e6f"
    p = subprocess.Popen([sys.executable, "-m", "tests.support.fake_nomad", "--listen", "127.0.0.1:0",
                          "--ready-file", str(ready), "--node-id", node_id], cwd=repo,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not (ready.exists() and len(ready.read_text().split()) == 2):
            assert p.poll() is None, "fake_nomad exited"
            time.sleep(0.05)
        api_url, control_url = ready.read_text().split()
        r = requests.get(f"{api_url}/v1/agent/self", proxies=NO_PROXY, timeout=5)
        assert r.json()["stats"]["client"]["node_id"] == node_id
        r = requests.get(f"{control_url}/_control/state", proxies=NO_PROXY, timeout=5)
        assert r.json()["agent_node_id"] == node_id
    finally:
        p.terminate()
        p.wait(timeout=10)
