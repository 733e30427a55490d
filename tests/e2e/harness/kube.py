"""The fake Kubernetes API server (tests/support/fake_kube) as a runner, and kubectl."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Sequence

from .files import REPO_ROOT
from .net import http_ok
from .processes import ProcessManager, Runner, safe_check
from .waits import START_TIMEOUT


SUPPORT_DIR = REPO_ROOT / "tests" / "support"


def _fake_kube_client_class():
    if str(SUPPORT_DIR) not in sys.path:
        sys.path.insert(0, str(SUPPORT_DIR))
    from fake_kube.client import FakeKube as client_class

    return client_class


class FakeKube(Runner):
    """tests/support/fake_kube/server.py under the ProcessManager (its log is attached to a
    failing test's report), driven through fake_kube.client.FakeKube.

    FakeKube(procs, bookmark_interval=None, history_limit=None, extra_args=())

    .url, .kubeconfig (for KUBECONFIG= / kubectl --kubeconfig) and every method of the
    client (api, ok, compact, drop_watches, watches, wait_for_watch, requests, add_fault,
    set_pod_status, terminate_pod, ...) are available on the runner itself.
    """

    name = "fake-kube"

    def __init__(
        self,
        procs: ProcessManager,
        bookmark_interval: float | None = None,
        history_limit: int | None = None,
        extra_args: Sequence[str] = (),
    ):
        super().__init__(procs)
        workdir = procs.path(procs.unique_name("fake-kube"), "x").parent
        self.client = _fake_kube_client_class()(
            workdir,
            bookmark_interval=bookmark_interval,
            history_limit=history_limit,
            extra_args=extra_args,
        )
        self.kubeconfig = self.client.kubeconfig

    def start(self, timeout: float = START_TIMEOUT) -> "FakeKube":
        ready_file = self.client.ready_file
        ready_file.unlink(missing_ok=True)
        self._launch(self.client.args)

        def ready():
            text = ready_file.read_text().strip() if ready_file.exists() else ""
            return bool(text) and http_ok(f"{text}/healthz")

        self._wait_ready(safe_check(ready), f"fake_kube ready file {ready_file}", timeout)
        self.client.url = ready_file.read_text().strip()
        return self

    @property
    def url(self) -> str:
        return self.client.url

    def __getattr__(self, attr: str) -> Any:
        # Only called for attributes the runner lacks: delegate to the client.
        if attr == "client":
            raise AttributeError(attr)
        return getattr(self.client, attr)


def kubectl_bin() -> str | None:
    """Debian's kubectl (kubernetes-client), as tests/support/test_fake_kube.py finds it:
    KUBECTL, else /opt/kubernetes-client (install_kubectl.sh), else /usr/bin/kubectl when
    the kubernetes-client package owns it."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    unpacked = "/opt/kubernetes-client/usr/bin/kubectl"
    if os.access(unpacked, os.X_OK):
        return unpacked
    probe = subprocess.run(["dpkg", "-s", "kubernetes-client"], capture_output=True)
    if probe.returncode == 0 and os.access("/usr/bin/kubectl", os.X_OK):
        return "/usr/bin/kubectl"
    return None
