"""WorkerMetrics status writes of `workersd kubernetes` against the fake API server: they name
their field manager, and a restart keeps the conditions' transition times.

Helpers (kube_workersd, ...) are those of test_kubernetes_e2e.py; `cluster` is a conftest fixture.
"""

from __future__ import annotations

import time

from harness import Gunicorn, wait_until
from test_kubernetes_e2e import (
    SERVICE,
    condition,
    kube_workersd,
)


def test_kubernetes_status_survives_a_restart_and_names_workersd(procs, cluster):
    fk, consul, kube = cluster
    g = Gunicorn(procs, address="127.0.0.3", workers=2).start()
    kube.add_wm("web", {"selector": {"matchLabels": {"app": "web"}}, "service": SERVICE,
                        "containers": [{"name": "web", "ports": f"{g.metrics_first}-{g.metrics_last}"}]})
    kube.add_pod("web-1", g.address, labels={"app": "web"})
    w = kube_workersd(procs, fk, consul, leader_election=False).start()

    def ready_with(endpoints):
        wm = kube.wm("web")
        ready = condition(wm, "Ready")
        return ready and ready["status"] == "True" and (wm.get("status") or {}).get("liveEndpoints") == endpoints and wm

    wm = wait_until(lambda: ready_with(2), timeout=20, message=lambda: f"status: {kube.wm('web').get('status')}")
    since = condition(wm, "Ready")["lastTransitionTime"]
    managers = {(m["manager"], m.get("subresource")) for m in wm["metadata"]["managedFields"]}
    assert ("workersd", "status") in managers, managers

    # Restart after the clock moved on (timestamps have 1 s resolution), with a change that
    # needs a new status (a third worker), but Ready stays True.
    assert w.stop() == 0
    time.sleep(1.1)
    g.scale_up()
    g.wait_for_metrics_ports(lambda p: len(p) == 3, what="3 workers")
    w.start()
    wm = wait_until(lambda: ready_with(3), timeout=20, message=lambda: f"status: {kube.wm('web').get('status')}")
    assert condition(wm, "Ready")["lastTransitionTime"] == since, "a restart reset Ready's transition time"
    assert condition(wm, "InvalidSpec")["lastTransitionTime"] == since
