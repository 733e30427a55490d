#!/usr/bin/env python3
"""Break fake_nomad one behaviour at a time and check its fidelity test goes red.

    python3 tests/support/mutate_fake_nomad.py        # from the repository root

Each mutant replaces one snippet (which must occur exactly once), runs the named test, and
restores the file. Exit status: the number of mutants that survived.
"""

import subprocess
import sys
from pathlib import Path

D = Path(__file__).resolve().parent / "fake_nomad"
TESTS = Path(__file__).resolve().parent / "test_fake_nomad.py"
MUTANTS = [
    ("state.py", "if status not in CLIENT_REPORTED:", "if False:", "test_control_api_rejects_states_a_client_never_reports"),
    ("server.py", 'and body.get("client_status") == "lost":', 'and False:', "test_control_api_rejects_states_a_client_never_reports"),
    ("api.py", '"node_id": s.agent_node_id', '"node_id": s.agent_node_id[::-1]', "test_agent_self_carries_the_node_id_in_stats_client"),
    ("shapes.py", '"HostIP": net.get("ip", "")', '"HostIP": ""', "test_node_allocations_host_mode_shape_meta_ports_and_task_states"),
    ("shapes.py", "return dict(m) if m else None", "return dict(m or {})", "test_meta_absent_is_null_and_allocation_get_is_the_same_object"),
    ("shapes.py", '"Address": net.get("address", "")', '"Address": ""', "test_bridge_mode_has_the_alloc_address_in_network_status"),
    ("state.py", 'ts["failed"] = status == "failed"', 'ts["failed"] = False', "test_client_status_transitions_and_stop"),
    ("api.py", '"alloc not found"', '"allocation not found"', "test_unknown_allocation_is_404_alloc_not_found"),
    ("state.py", 'return allocs, max(a["modify_index"] for a in allocs)', 'return allocs, self.table["allocs"]', "test_blocking_query_wakes_on_a_change_to_this_nodes_allocations"),
    ("state.py", 'raise NotFound(f"alloc {alloc_id} not found")\n            self._bump("allocs")', 'raise NotFound(f"alloc {alloc_id} not found")', "test_empty_node_answers_the_allocs_table_index_and_gc_of_the_last_alloc_wakes"),
    ("api.py", 'if s == "0":', 'if s.isdigit():', "test_bad_wait_and_index_are_400_with_nomads_text"),
    ("api.py", 'if region and region != self.s.region:', 'if False:', "test_method_region_and_unknown_paths"),
    ("api.py", 'if (ns == "*" or a["namespace"] == ns)', 'if True', "test_allocations_list_namespace_wildcard_and_prefix"),
    ("api.py", 'raise HttpError(403, "ACL token not found")', 'raise HttpError(403, "Permission denied")', "test_acl_tokens_and_what_upstream_answers"),
    ("api.py", 'if acl is None or acl.allow_ns_op(a["namespace"], "read-job")]', ']', "test_acl_tokens_and_what_upstream_answers"),
    ("api.py", "return CUT, 0", "break", "test_agent_down_refuses_and_cuts_then_comes_back_on_the_same_port"),
    ("api.py", 'known = "" if s.mode == "no-servers" else "127.0.0.1:4647"', 'known = "127.0.0.1:4647"', "test_servers_lost_is_500_no_servers_while_agent_self_answers"),
    ("server.py", "time.sleep(secs)", "pass", "test_latency_and_request_log"),
    ("api.py", 'raise HttpError(400, "Expect `true` or `false` for `stale` query string parameter") from None', 'pass', "test_bad_wait_and_index_are_400_with_nomads_text"),
    ("api.py", 'int(self.q["per_page"])', 'pass', "test_bad_wait_and_index_are_400_with_nomads_text"),
    ("state.py", 'a["job_version"] += 1', 'pass', "test_job_update_bumps_version_and_alloc_modify_index_and_unknown_node_is_empty"),
    ("state.py", 'a["modify_index"] = a["alloc_modify_index"] = idx\n                if meta', 'a["modify_index"] = idx\n                if meta', "test_job_update_bumps_version_and_alloc_modify_index_and_unknown_node_is_empty"),
    ("server.py", "self.tls.verify_mode = ssl.CERT_REQUIRED", "self.tls.verify_mode = ssl.CERT_NONE", "test_https_with_client_certificates"),
    ("server.py", 'f"{api_url}\\n{control_url}\\n"', 'f"{api_url}\\n"', "test_cli_module_entry_and_ready_file_lines"),
    ("api.py", "t = MAX_BLOCK if wait > MAX_BLOCK else (DEFAULT_BLOCK if wait <= 0 else wait)", "t = 5.0", "test_wait_is_honoured_and_index_zero_answers_at_once"),
    ("server.py", 'if token in ("gzip", "deflate"):', 'if False:', "test_gzip_when_the_client_accepts_it"),
    ("state.py", 'key=lambda a: (terminal(a), a["id"]))', 'key=lambda a: a["id"])', "test_client_status_transitions_and_stop"),
]


def main():
    survived = 0
    for f, old, new, test in MUTANTS:
        p = D / f
        s = p.read_text()
        assert s.count(old) == 1, (f, old, s.count(old))
        p.write_text(s.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "-x", "-q", "-k", test],
                               capture_output=True, text=True, timeout=180)
        finally:
            p.write_text(s)
        red = r.returncode != 0
        survived += not red
        print(("red      " if red else "SURVIVED ") + f"{f}: {new[:50]!r} -> {test}", flush=True)
    return survived


if __name__ == "__main__":
    sys.exit(main())
