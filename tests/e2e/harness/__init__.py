"""End-to-end test harness for workersd.

Everything here runs on loopback (127.0.0.0/8) only and every wait is bounded
in time and in iterations. One module per concern:

  waits       wait_until(...) bounded polling with a clear timeout message;
              Sampler(fn, interval) fn() sampled in a background thread (bounded)
  net         free_port(host), free_port_range(host, n), loopback checks;
              http_get / http_request (never through a proxy), parse_metric
  files       REPO_ROOT, write_atomic / targets_yaml (targets files written at once),
              readme_yaml_block(heading) (README.md's documented YAML, used verbatim)
  processes   ProcessManager: children in their own process groups, logs in files,
              all killed on teardown (the `procs` fixture); Runner, the runners' base
  gunicorn    Gunicorn: examples/gunicorn, one "pod" per 127.0.0.x address
  prometheus  VictoriaMetrics, Prometheus
  consul      ConsulDouble: testing/consul-double and its control endpoints
  workersd    Workersd: the binary under test
  kube        FakeKube (tests/support/fake_kube), kubectl_bin
  stack       start_consul_stack (gunicorn + Consul double + workersd), start_cluster
              (fake API server + Consul double + Kube, a namespace's pods and WorkerMetrics);
              the conftest fixtures `consul_stack` and `cluster` call them

Runners take the ProcessManager first; construct, then .start().
"""

from .consul import ConsulDouble, consul_double_bin
from .files import REPO_ROOT, readme_yaml_block, targets_yaml, write_atomic
from .gunicorn import EXAMPLE_DIR, Gunicorn
from .kube import SUPPORT_DIR, FakeKube, kubectl_bin
from .net import (
    free_port,
    free_port_range,
    http_get,
    http_ok,
    http_request,
    loopback_works,
    parse_metric,
    port_is_listening,
)
from .processes import ManagedProcess, ProcessManager, Runner, require_binary
from .prometheus import PROMETHEUS_BIN, VICTORIA_METRICS_BIN, Prometheus, VictoriaMetrics
from .stack import ConsulStack, Kube, start_cluster, start_consul_stack
from .waits import START_TIMEOUT, STOP_TIMEOUT, WAIT_TIMEOUT, Sampler, WaitTimeout, wait_until
from .workersd import Workersd, workersd_bin

__all__ = [
    "ConsulDouble", "ConsulStack", "Kube", "start_cluster", "start_consul_stack", "EXAMPLE_DIR", "FakeKube", "Gunicorn", "ManagedProcess", "PROMETHEUS_BIN",
    "ProcessManager", "Prometheus", "REPO_ROOT", "Runner", "START_TIMEOUT", "STOP_TIMEOUT",
    "SUPPORT_DIR", "Sampler", "VICTORIA_METRICS_BIN", "VictoriaMetrics", "WAIT_TIMEOUT",
    "WaitTimeout", "Workersd", "consul_double_bin", "free_port", "free_port_range", "http_get",
    "http_ok", "http_request", "kubectl_bin", "loopback_works", "parse_metric",
    "port_is_listening", "readme_yaml_block", "require_binary", "targets_yaml", "wait_until",
    "workersd_bin", "write_atomic",
]
