"""The harness maps Workersd keyword arguments to workersd flags generically (no process runs)."""

import pytest
from harness import ProcessManager, Workersd
from harness.workersd import cli_flags

pytestmark = pytest.mark.harness


def test_keywords_become_flags():
    assert cli_flags(
        {"probe_interval": "1s", "deregister_on_exit": True, "owner_id": None, "allow_host_network": False,
         "namespaces": ["a", "b"], "probe_concurrency": 64, "leader_election": "false"}
    ) == ["--probe-interval", "1s", "--deregister-on-exit", "--namespaces", "a", "--namespaces", "b",
          "--probe-concurrency", "64", "--leader-election", "false"]


def test_runner_argv_defaults_and_overrides(tmp_path):
    procs = ProcessManager(tmp_path)
    wd = Workersd(procs, targets=tmp_path / "t.yaml", probe_interval=None, consul_token="s3cret")
    argv = wd.argv()
    assert argv[1] == "standalone"
    assert argv[argv.index("--listen") + 1] == f"127.0.0.1:{wd.listen_port}"
    assert argv[argv.index("--http-sd-listen") + 1] == f"127.0.0.1:{wd.http_sd_port}"
    assert "--probe-interval" not in argv  # None: workersd's own default
    token_file = argv[argv.index("--consul-token-file") + 1]
    assert open(token_file).read() == "s3cret\n"
    assert Workersd(procs).argv().count("--probe-interval") == 1  # the harness default, 1s
    with pytest.raises(TypeError):
        Workersd(procs, listen="127.0.0.1:1")
