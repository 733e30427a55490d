"""pytest wiring for the e2e harness (see harness/__init__.py).

Fixtures:
  procs         a ProcessManager rooted in the test's tmp dir; every process started
                through it (directly or by a runner) is killed at teardown, and a
                failing test's report gets each process's log tail attached.
  consul_stack  start_consul_stack bound to `procs`: consul_stack(service, node, workers=4,
                gunicorn={...}, **workersd_flags) -> (gunicorn, consul, workersd), started
  cluster       (fake API server, Consul double, Kube helper for namespace "shop"), started
"""

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ProcessManager, loopback_works, start_cluster, start_consul_stack  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        manager = item.funcargs.get("procs") if hasattr(item, "funcargs") else None
        if manager is not None and manager.processes:
            report.sections.append(
                (f"process logs ({report.when}); full logs in {manager.log_dir}", manager.report())
            )


@pytest.fixture
def procs(tmp_path):
    manager = ProcessManager(tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def consul_stack(procs):
    return functools.partial(start_consul_stack, procs)


@pytest.fixture
def cluster(procs):
    return start_cluster(procs)


@pytest.fixture(scope="session", autouse=True)
def _loopback_aliases():
    """Tests put "pods" on 127.0.0.2, 127.0.0.3, ...: fail early if that breaks."""
    for addr in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        if not loopback_works(addr):
            pytest.fail(f"cannot bind+connect on {addr}: the e2e tests need 127.0.0.0/8 on lo")
