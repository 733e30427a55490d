"""A small Flask app served by several gunicorn worker processes.

Every request to ``/`` or ``/work`` is timed by the Summary
``request_processing_seconds`` (so ``request_processing_seconds_count`` counts
requests). Each worker process has its own counters: prometheus_client keeps
them in the process's default registry.

``/metrics`` on the app port is the NAIVE setup this example exists to show
the problem with: the request is load-balanced to whichever worker accepts it,
so each scrape sees one worker's numbers only (100 requests served by four
workers read as roughly 25). The per-worker metrics servers started by
``gunicorn.conf.py`` (one port per worker) are the fix; workersd finds them and
publishes them as scrape targets.

Environment:
  APP_WORK_SECONDS  seconds each request sleeps to simulate work (default 0.02),
                    so concurrent requests really spread over the workers.
"""

import os
import time

from flask import Flask, Response
from prometheus_client import Summary, generate_latest

WORK_SECONDS = float(os.environ.get("APP_WORK_SECONDS", "0.02"))

REQUEST_TIME = Summary(
    "request_processing_seconds", "Time spent processing a request to / or /work"
)

# generate_latest() renders the classic text exposition format, version 0.0.4.
TEXT_FORMAT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"

app = Flask(__name__)


def _work():
    with REQUEST_TIME.time():
        if WORK_SECONDS > 0:
            time.sleep(WORK_SECONDS)
    return f"served by worker pid {os.getpid()}\n"


@app.route("/")
def index():
    return _work()


@app.route("/work")
def work():
    return _work()


@app.route("/metrics")
def naive_metrics():
    # Anti-pattern kept on purpose: this shows ONE worker's registry, whichever
    # worker happened to accept this scrape.
    return Response(generate_latest(), content_type=TEXT_FORMAT_0_0_4)
