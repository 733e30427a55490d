"""Loopback ports and addresses, HTTP (never through a proxy) and exposition parsing."""

from __future__ import annotations

import socket
import threading
from typing import Mapping

import requests
from prometheus_client.parser import text_string_to_metric_families


_reserved_lock = threading.Lock()
_reserved: set[tuple[str, int]] = set()


def _bindable(host: str, port: int) -> bool:
    """True if a listener could bind host:port now (same SO_REUSEADDR as servers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on host, not handed out before in this test session."""
    for _ in range(50):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _reserved_lock:
            if (host, port) not in _reserved:
                _reserved.add((host, port))
                return port
    raise RuntimeError(f"no free port found on {host} in 50 attempts")


def free_port_range(host: str, count: int, preferred_first: int = 19011) -> tuple[int, int]:
    """A contiguous range of `count` free ports on host, as (first, last).

    Tries `preferred_first` first, then bases below the Linux ephemeral range
    (32768+), so kernel-chosen client ports do not land in the range.
    """
    candidates = [preferred_first] + list(range(20000, 32000 - count, max(count, 10)))
    for first in candidates[:200]:
        ports = range(first, first + count)
        with _reserved_lock:
            if any((host, p) in _reserved for p in ports):
                continue
            if all(_bindable(host, p) for p in ports):
                _reserved.update((host, p) for p in ports)
                return first, first + count - 1
    raise RuntimeError(f"no free range of {count} ports on {host}")


def port_is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def loopback_works(address: str) -> bool:
    """Binding + connecting on a 127.x address works (Linux routes 127/8 to lo)."""
    try:
        with socket.socket() as srv:
            srv.bind((address, 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname(), timeout=2):
                return True
    except OSError:
        return False


def http_request(method: str, url: str, timeout: float = 5.0, **kwargs) -> requests.Response:
    """One HTTP request; ignores *_proxy environment variables (loopback only)."""
    with requests.Session() as s:
        s.trust_env = False
        return s.request(method, url, timeout=timeout, **kwargs)


def http_get(url: str, timeout: float = 5.0, **kwargs) -> requests.Response:
    return http_request("GET", url, timeout=timeout, **kwargs)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return http_get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def parse_metric(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of all samples called `name` (matching `labels`) in exposition text.

    Returns None when no such sample exists, so "absent" differs from 0.
    """
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            total = (total or 0.0) + sample.value
    return total
