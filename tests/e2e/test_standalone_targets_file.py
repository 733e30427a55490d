"""The targets file: `workersd check`, start-up validation and hot reload.

- `workersd check --targets FILE` prints every violation with entry index and field and
  exits 1; a valid file exits 0.
- `workersd standalone` refuses a broken file at start (exit 1, the field named).
- Hot reload while running: a second target (another gunicorn on 127.0.0.3) added to the
  file appears in HTTP SD and Consul within a few seconds; a broken edit keeps the last good
  configuration (entries stay, even of a target the broken file no longer lists), is logged
  entry by entry and counted once in workersd_config_reloads_total{result="error"}; a
  vanished file keeps it too; fixing the file applies again.
"""

import time

from harness import (
    ConsulDouble,
    Gunicorn,
    Sampler,
    Workersd,
    free_port_range,
    targets_yaml,
    wait_until,
    write_atomic,
)

NODE = "workersd-e2e-file"

BROKEN = """\
targets:
  - service: web
    address: 127.0.0.2
    ports: 9020-9011
  - service: Bad_Name
    address: 127.0.0.2
    ports: 9100-9110
  - service: ok
    address: example.com
    ports: 1-65535
    scheme: ftp
  - service: ok2
    address: 127.0.0.3
    ports: 9011-9020
    colour: blue
    meta: {consul-x: y}
"""

BROKEN_FIELDS = [
    "targets[0].ports:",
    "targets[1].service:",
    "targets[2].address:",
    "targets[2].ports:",
    "targets[2].scheme:",
    "targets[3].colour:",
    "targets[3].meta:",
]


def test_check_names_every_bad_field_and_accepts_a_valid_file(procs):
    broken = procs.path("broken.yaml")
    broken.write_text(BROKEN)
    result = Workersd.check(broken)
    print(result.stdout)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    for field in BROKEN_FIELDS:
        matching = [ln for ln in lines if ln.startswith(f"{broken}: {field}")]
        assert len(matching) == 1, f"{field} not reported exactly once in:\n{result.stdout}"
    assert lines[-1] == f"{broken}: {len(BROKEN_FIELDS)} error(s)", result.stdout
    assert len(lines) == len(BROKEN_FIELDS) + 1, result.stdout

    valid = procs.path("valid.yaml")
    valid.write_text(
        targets_yaml(
            [
                {"service": "web", "address": "127.0.0.2", "ports": (9011, 9020), "tags": ["a"]},
                {"service": "api", "address": "127.0.0.3", "ports": 9011, "meta": {"team": "x"}},
            ]
        )
    )
    result = Workersd.check(valid)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == f"{valid}: OK, 2 target(s)"

    missing = Workersd.check(procs.path("does-not-exist.yaml"))
    assert missing.returncode == 1
    assert "cannot read" in missing.stdout

    # standalone refuses the broken file at start-up, naming the fields.
    wd = Workersd(procs, targets=broken)
    wd.start(wait_ready=False)
    wait_until(lambda: not wd.alive(), timeout=20, message="workersd exits on a broken file")
    assert wd.proc.returncode == 1
    log = wd.logs()
    for field in BROKEN_FIELDS:
        assert field in log, f"{field} missing from the start-up log:\n{log}"


def reloads(wd, result):
    return wd.metric("workersd_config_reloads_total", {"result": result}) or 0


def test_hot_reload_add_broken_edit_and_fix(procs):
    first_a, last_a = free_port_range("127.0.0.2", 10, preferred_first=19011)
    a = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first_a, last_a), workers=2).start()
    first_b, last_b = free_port_range("127.0.0.3", 10, preferred_first=19011)
    b = Gunicorn(procs, address="127.0.0.3", metrics_ports=(first_b, last_b), workers=3).start()
    ports_a = a.wait_for_metrics_ports(lambda p: len(p) == 2, what="a: 2 ports")
    ports_b = b.wait_for_metrics_ports(lambda p: len(p) == 3, what="b: 3 ports")
    entry_a = {"service": "alpha", "address": "127.0.0.2", "ports": (first_a, last_a)}
    entry_b = {"service": "beta", "address": "127.0.0.3", "ports": (first_b, last_b)}
    want_a = [f"127.0.0.2:{p}" for p in ports_a]
    want_b = [f"127.0.0.3:{p}" for p in ports_b]

    consul = ConsulDouble(procs).start()
    targets = procs.path("targets.yaml")
    write_atomic(targets, targets_yaml([entry_a]))
    wd = Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start()

    def consul_targets():
        return sorted(
            f"{e['ServiceAddress']}:{e['ServicePort']}"
            for name in ("alpha", "beta")
            for e in consul.owned_entries(name, NODE)
        )

    def published(expected):
        return wd.http_sd_targets() == sorted(expected) and consul_targets() == sorted(expected)

    wait_until(lambda: published(want_a), message=lambda: f"alpha published: {want_a}")
    assert reloads(wd, "ok") == 0 and reloads(wd, "error") == 0

    # 1. Add a second target: its workers appear within a few seconds.
    write_atomic(targets, targets_yaml([entry_a, entry_b]))
    edited = time.monotonic()
    wait_until(
        lambda: published(want_a + want_b),
        timeout=15,
        interval=0.1,
        message=lambda: f"beta added: HTTP SD {wd.http_sd_targets()}, Consul {consul_targets()}",
    )
    added_after = time.monotonic() - edited
    print(f"added target published {added_after:.2f}s after the edit")
    assert added_after <= 5.0, added_after  # reload interval 1 s + probe + write
    assert reloads(wd, "ok") == 1
    beta_groups = [g for g in wd.http_sd() if g["labels"]["__meta_workersd_service"] == "beta"]
    assert [sorted(g["targets"]) for g in beta_groups] == [want_b]

    # 2. A broken edit that also drops beta: nothing of it may be applied.
    errors_before = reloads(wd, "error")
    write_atomic(
        targets,
        targets_yaml(
            [entry_a, {"service": "Bad_Name", "address": "127.0.0.4", "ports": "1-65535"}]
        ),
    )
    wait_until(
        lambda: reloads(wd, "error") == errors_before + 1,
        timeout=15,
        message="the broken edit counted in workersd_config_reloads_total{result=error}",
    )
    wait_until(
        lambda: "targets[1].service:" in wd.logs() and "targets[1].ports:" in wd.logs(),
        timeout=10,
        message="the log names targets[1].service and targets[1].ports",
    )
    log = wd.logs()
    assert "keeping the last good configuration" in log
    for _ in range(12):  # 3 s: several reload polls, probe sweeps and resyncs
        assert published(want_a + want_b), (wd.http_sd_targets(), consul_targets())
        time.sleep(0.25)
    assert reloads(wd, "error") == errors_before + 1, "an unchanged broken file is counted once"
    assert reloads(wd, "ok") == 1

    # 3. The file vanishes for a while: still the last good configuration.
    targets.unlink()
    wait_until(
        lambda: reloads(wd, "error") == errors_before + 2,
        timeout=15,
        message="an unreadable file is counted as a reload error",
    )
    time.sleep(1.5)
    assert published(want_a + want_b)

    # 4. Fixed (alpha only): applies again, beta's entries go.
    write_atomic(targets, targets_yaml([entry_a]))
    wait_until(
        lambda: published(want_a),
        timeout=15,
        message=lambda: f"fixed file applied: HTTP SD {wd.http_sd_targets()}, "
        f"Consul {consul_targets()}",
    )
    assert reloads(wd, "ok") == 2
    assert consul.catalog_service("beta") == []
    assert wd.alive()


def test_port_range_edit_keeps_live_entries_in_place(procs):
    """Widening a target's range (README: size it for the largest worker count) or narrowing
    it must not touch the entries of workers that stay inside it: no delete, no gap."""
    first, last = free_port_range("127.0.0.2", 10, preferred_first=19011)
    g = Gunicorn(procs, address="127.0.0.2", metrics_ports=(first, last), workers=4).start()
    ports = g.wait_for_metrics_ports(lambda p: len(p) == 4, what="4 ports")
    assert ports == list(range(first, first + 4))
    consul = ConsulDouble(procs).start()
    targets = procs.path("targets.yaml")

    def write_range(lo, hi):
        entry = {"service": "ranged", "address": "127.0.0.2", "ports": (lo, hi)}
        write_atomic(targets, targets_yaml([entry]))

    def ids(port_list):
        return {f"{NODE}:ranged:127.0.0.2:{p}" for p in port_list}

    def catalog_ids():
        return {e["ServiceID"] for e in consul.catalog_service("ranged")}

    write_range(first, first + 2)  # the 4th worker is outside the declared range
    wd = Workersd(
        procs,
        targets=targets,
        consul_addr=consul.url,
        consul_node=NODE,
        consul_resync_interval="1s",
    ).start()
    wait_until(lambda: catalog_ids() == ids(ports[:3]), message="3 entries in the first range")

    kept = ids(ports[:3])
    consul.reset_stats()
    with Sampler(catalog_ids, interval=0.05) as widening:
        write_range(first, last)
        wait_until(lambda: catalog_ids() == ids(ports), message="the 4th worker joins")
        time.sleep(1.5)
    widen_stats = consul.stats()["txn"]["ops_applied_by_verb"]

    kept_narrow = ids(ports[:2])
    consul.reset_stats()
    with Sampler(catalog_ids, interval=0.05) as narrowing:
        write_range(first, first + 1)
        wait_until(lambda: catalog_ids() == kept_narrow, message="narrowed to 2 entries")
        time.sleep(1.5)
    narrow_stats = consul.stats()["txn"]["ops_applied_by_verb"]
    print(f"widen: {widen_stats}; narrow: {narrow_stats}")

    assert wd.alive()
    gaps = [t for t, v in widening.samples if isinstance(v, BaseException) or not kept <= v]
    gaps += [
        t for t, v in narrowing.samples if isinstance(v, BaseException) or not kept_narrow <= v
    ]
    assert widen_stats == {"Service.cas": 1}, f"widening rewrote live entries: {widen_stats}"
    assert narrow_stats == {"Service.delete-cas": 2}, f"narrowing touched kept entries: {narrow_stats}"
    assert not gaps, f"{len(gaps)} catalog samples lacked entries of workers still in range"
