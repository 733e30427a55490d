"""The shipped examples stay true: their targets files pass `workersd check`, every flag they
pass exists, and the Prometheus configs pass promtool. (Nomad, Docker and systemd do not run
on the test machines; what they would hand workersd is checked instead.)"""

import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from harness import workersd_bin

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _help_flags(mode: str) -> set[str]:
    out = subprocess.run([str(workersd_bin()), mode, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", out))


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "targets.yaml"
    path.write_text(text)
    return subprocess.run([str(workersd_bin()), "check", "--targets", str(path)], capture_output=True, text=True)


def test_nomad_template_renders_a_valid_targets_file_and_flags_exist(tmp_path):
    job = (EXAMPLES / "nomad" / "clever.nomad.hcl").read_text()
    template = re.search(r"data\s*=\s*<<-EOT\n(.*?)\n\s*EOT", job, re.S).group(1)
    env = {"NOMAD_IP_http": "10.0.3.7", "NOMAD_ALLOC_ID": "5c4f1f2e-8a3b-4a57-b1f6-0d2b6d9a7c11",
           "NOMAD_JOB_NAME": "clever"}
    rendered = re.sub(r'\{\{\s*env\s+"(\w+)"\s*\}\}', lambda m: env[m.group(1)], textwrap.dedent(template))
    result = _check(tmp_path, rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    parsed = yaml.safe_load(rendered)["targets"][0]
    assert parsed["address"] == "10.0.3.7" and parsed["meta"]["nomad-alloc"] == env["NOMAD_ALLOC_ID"]
    workersd_task = job[job.index('task "workersd"'):]
    args = re.findall(r'"(--[a-z-]+)"', workersd_task)
    assert "--deregister-on-exit" in args and "--owner-id" in args
    assert set(args) <= _help_flags("standalone"), set(args) - _help_flags("standalone")


def test_compose_demo_targets_prometheus_config_and_flags(tmp_path):
    compose = yaml.safe_load((EXAMPLES / "compose" / "compose.yaml").read_text())
    command = compose["services"]["workersd"]["command"]
    assert command[0] == "standalone"
    flags = {arg.split("=", 1)[0] for arg in command[1:]}
    assert flags <= _help_flags("standalone"), flags - _help_flags("standalone")
    result = _check(tmp_path, (EXAMPLES / "compose" / "targets.yaml").read_text())
    assert result.returncode == 0, result.stdout
    app_ip = compose["services"]["app"]["networks"]["demo"]["ipv4_address"]
    assert yaml.safe_load((EXAMPLES / "compose" / "targets.yaml").read_text())["targets"][0]["address"] == app_ip
    promtool = subprocess.run(["promtool", "check", "config", str(EXAMPLES / "compose" / "prometheus.yml")],
                              capture_output=True, text=True)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr


def test_systemd_unit_runs_existing_flags():
    unit = (EXAMPLES / "systemd" / "workersd.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    argv = shlex.split(exec_start)
    assert argv[1] == "standalone"
    flags = {a for a in argv[2:] if a.startswith("--")}
    assert flags <= _help_flags("standalone")


@pytest.mark.parametrize("name", ["targets.yaml"])
def test_quick_start_targets_file_is_valid(tmp_path, name):
    result = _check(tmp_path, (EXAMPLES / name).read_text())
    assert result.returncode == 0 and "OK, 1 target(s)" in result.stdout, result.stdout


def test_nomad_system_job_flags_exist_and_the_meta_job_declares_a_range():
    job = (EXAMPLES / "nomad" / "workersd.nomad.hcl").read_text()
    assert 'type        = "system"' in job
    args = re.findall(r'"(--[a-z-]+)"', job)
    assert "--consul-registration" in args
    assert set(args) <= _help_flags("nomad"), set(args) - _help_flags("nomad")
    meta_job = (EXAMPLES / "nomad" / "clever-meta.nomad.hcl").read_text()
    keys = dict(re.findall(r"^\s*(workersd_\w+)\s*=\s*\"([^\"]*)\"", meta_job, re.M))
    assert keys == {"workersd_service": "clever", "workersd_tags": "gunicorn", "workersd_ports": "9011-9014"}
    reserved = sorted(int(p) for p in re.findall(r"static = (\d+)", meta_job))
    assert reserved == list(range(9011, 9015)), "the declared range is reserved on the host"
