"""Clients of the admin endpoint (``--admin``) for tests: plain HTTP from a thread, Prometheus' parser.

The requests are blocking (``urllib``), for threads beside the reactor or
for processes; each has a timeout. :func:`samples` reads ``/metrics`` with
prometheus_client's own parser, so a format error fails the test.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from processes import Process, json_events
from prometheus_client.parser import text_string_to_metric_families

#: Timeout of one admin request.
TIMEOUT = 10.0

#: A sample: its name and its labels, sorted.
Key = tuple[str, tuple[tuple[str, str], ...]]


def fetch(
    url: str, *, token: str | None = None, basic: str | None = None
) -> tuple[int, Any, bytes]:
    """``(status, headers, body)`` of a GET, with a bearer ``token`` or a Basic ``user:password``."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if basic is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def admin_base(process: Process) -> str:
    """``http://HOST:PORT`` of a ``twistd`` process's admin endpoint, once its JSON log says it listens."""

    def said(text: str) -> str | None:
        found = [e for e in json_events(text) if e.get("event") == "admin_listening"]
        return "http://" + found[0]["address"] if found else None

    return process.wait_for(said, "the admin endpoint")


def samples(base: str, **auth: str) -> dict[Key, float]:
    """Every sample of ``base``/metrics, by name and labels."""
    status, headers, body = fetch(base + "/metrics", **auth)
    assert status == 200, (status, body)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Mapping[Key, float], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``."""
    return found[(name, tuple(sorted(labels.items())))]
