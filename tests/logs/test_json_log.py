"""The JSON log observer for ``twistd --logger``."""

from __future__ import annotations

import io
import json
import sys

import pytest
from records import a_record

from tunnelkit import json_log
from tunnelkit.logs.tunnel_log import log_tunnel_closed


def test_tunnel_closed_as_json_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tunnel_closed event becomes one JSON object carrying every documented field."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    observer = json_log.observer()
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(observer)
    try:
        log_tunnel_closed(
            a_record(reason="client sent FIN {not a field}"),
            "8888",
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    [line] = [raw for raw in out.getvalue().split("\x1e") if raw.strip()]
    event = json.loads(line)
    assert event["event"] == "tunnel_closed"
    expected = {
        "listener": "8888",
        "client": "127.0.0.1:5",
        "backend": "b:80",
        "backend_address": "127.0.0.1:80",
        "bytes_up": 3,
        "bytes_down": 4,
        "duration": 1.5,
        "connect_time": 0.01,
        "closed_by": "client",
        "close_kind": "FIN",
        "reason": "client sent FIN {not a field}",
        "text": "127.0.0.1:5 -> b:80 (127.0.0.1:80) FIN by client after 1.500s:"
        " up 3 B, down 4 B; client sent FIN {not a field}",
    }
    assert {k: event[k] for k in expected} == expected
