"""The status page (`/` and `/status` on --listen) rendered by a real browser: Debian's
chromium in headless mode loads it from a running workersd (real gunicorn workers, the
Consul double), saves a screenshot as a test artifact, and the test reads the rendered DOM."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from harness import http_get, start_consul_stack, wait_until


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium): the status page test needs a real browser")
    return binary


def browse(url: str, *args: str) -> str:
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--user-data-dir=/tmp/workersd-chromium", *args, url]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{argv} -> {p.returncode}\n{p.stderr[-2000:]}"
    return p.stdout


class Dom(HTMLParser):
    """The rendered document's elements with an id or class, and the text inside them."""

    def __init__(self):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "br", "img", "link"):
            self._open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def by_id(self, ident: str) -> dict:
        (found,) = [e for e in self.elements if e.get("id") == ident]
        return found


def test_status_page_renders_targets_ports_and_consul_in_a_browser(procs):
    stack = start_consul_stack(procs, service="clever", node="workersd-status", workers=3)
    g, w = stack.gunicorn, stack.workersd
    live = sorted(g.listening_metrics_ports())
    assert len(live) == 3
    base = w.listen_url
    # /status: the same as JSON.
    status = http_get(f"{base}/status", timeout=5).json()
    (target,) = status["targets"]
    assert target["live"] == live and target["address"] == g.address
    assert status["ready"] is True and status["consul"]["failing"] is False

    screenshot = procs.path("status-page", "status.png")
    browse(f"{base}/", f"--screenshot={screenshot}", "--window-size=1280,1600")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "a PNG screenshot (kept as an artifact)"
    dom = Dom()
    dom.feed(browse(f"{base}/", "--dump-dom"))
    assert dom.by_id("readiness")["text"] == "ready"
    table = dom.by_id(f"target-{target['id']}")
    assert table["data-live"] == "3"
    assert g.address in table["text"] and "clever" in table["text"]
    for port in live:
        assert str(port) in table["text"]
    assert "ok" in dom.by_id("consul")["text"]
    rows = [e for e in dom.elements if e["tag"] == "td" and e.get("class") == "live" and e["text"].startswith("live")]
    assert len(rows) >= 3, rows

    # A worker leaves: the page follows.
    g.scale_down()
    wait_until(lambda: len(g.listening_metrics_ports()) == 2, timeout=15, message="2 workers")
    wait_until(lambda: len(http_get(f"{base}/status", timeout=5).json()["targets"][0]["live"]) == 2,
               timeout=10, interval=0.2, message="/status shows 2 live workers")
    dom = Dom()
    dom.feed(browse(f"{base}/", "--dump-dom"))
    assert dom.by_id(f"target-{target['id']}")["data-live"] == "2"
