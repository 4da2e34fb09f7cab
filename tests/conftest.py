"""Shared pytest set-up: tunnelkit's reactor, a deterministic Hypothesis profile, the ``serve`` fixture.

Parser properties must give the same verdict on every CI run, so examples are
derived from each test's source rather than drawn at random, and no deadline
applies (shared CI machines stall). ``HYPOTHESIS_PROFILE=default`` brings back
random exploration for local fuzzing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from tunnelkit.app.reactor import installed as installed_reactor

if TYPE_CHECKING:
    from loopback import Serve, ThreadedServer

# The in-process tests run on the reactor tunnelkit installs in production
# (tests/app/test_reactor.py checks, and runs the relay suite once more on
# Twisted's own with TUNNELKIT_TEST_REACTOR=twisted).
if os.environ.get("TUNNELKIT_TEST_REACTOR", "tunnelkit") == "tunnelkit":
    installed_reactor()

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start threaded backends on demand (arguments of ThreadedServer); all are closed after the test."""
    # Imported when used: this file is loaded for every test, loopback loads the forwarder.
    from loopback import ThreadedServer

    made: list[ThreadedServer] = []

    def make(handler: Callable[[socket.socket], Any], **options: Any) -> ThreadedServer:
        server = ThreadedServer(handler, **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
