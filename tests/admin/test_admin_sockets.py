"""``--admin`` in-process, on each plane: /metrics during and after real traffic, /readyz, /healthz, the token.

The forwarder is the one of tests/loopback.py, given ``--admin`` (so its
tunnels are timed); the admin port is opened here on 127.0.0.1:0 for its
service, as ``make_service`` does for ``twistd``. Requests go from threads
(urllib) and /metrics is read with Prometheus' own parser.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

from admin_http import fetch, samples, value
from loopback import (
    IO_TIMEOUT,
    Forwarder,
    LoopbackTestCase,
    assert_echoes,
    connect,
    echo,
    recv_exactly,
    refusing_address,
)
from planes import on_each_plane
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tunnelkit.admin import service as admin_service
from tunnelkit.admin.observe import ProcessSource
from tunnelkit.config.model import ConfigError

Inline = Generator[Deferred[Any], Any, None]
T = TypeVar("T")

TOKEN = "s3cret-t0ken"
#: The forwarders' listener, named by its ``listen`` value in the metrics' labels.
LISTENER = "127.0.0.1:0"


def serve_admin(
    test: TestCase, fwd: Forwarder, token: str | None = None, interface: str = "127.0.0.1"
) -> str:
    """The admin endpoint of ``fwd``'s service on ``interface``, port 0: its base URL."""
    source = ProcessSource(fwd.service.observer)
    secret = token.encode() if token is not None else None
    port = admin_service.listen(f"tcp:0:interface={interface}", source, secret, reactor)
    test.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


@inlineCallbacks
def polled(read: Callable[[], T], check: Callable[[T], bool], what: str) -> Generator[Any, Any, T]:
    """``read()`` in a thread until ``check`` holds for what it returns (bounded)."""
    for _ in range(int(IO_TIMEOUT / 0.05)):
        found = yield deferToThread(read)
        if check(found):
            return found
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what}: not within {IO_TIMEOUT:g} s (last: {found!r})")


def joined(address: str) -> Any:
    """A client whose tunnel to an echo backend is joined (``ping`` came back)."""
    sock = connect(address)
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    return sock


@on_each_plane
class MetricsTests(LoopbackTestCase):
    """/metrics, /readyz and /healthz of one process"""

    @inlineCallbacks
    def test_metrics_match_the_traffic(self) -> Inline:
        """A live tunnel shows as active; after SHA-256-checked echoes, bytes, tunnels and durations match what was sent."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address, "--admin", "127.0.0.1:0", "--no-access-log")
        base = serve_admin(self, fwd)
        listener = LISTENER
        live = yield deferToThread(joined, fwd.address)
        self.addCleanup(live.close)
        found = yield deferToThread(samples, base)
        plane = "engine" if fwd.native else "twisted"
        assert value(found, "tunnelkit_listener_info", listener=listener, plane=plane) == 1
        assert value(found, "tunnelkit_connections_active", listener=listener) == 1
        at_backend = {"listener": listener, "group": "", "backend": backend.address}
        assert value(found, "tunnelkit_backend_active_connections", **at_backend) == 1
        sizes = [1, 65536, 1 << 20, 3 * (1 << 20) + 17]
        for size in sizes:
            yield deferToThread(assert_echoes, fwd.address, size)
        live.close()
        found = yield polled(
            lambda: samples(base),
            lambda f: value(f, "tunnelkit_connections_active", listener=listener) == 0,
            "every tunnel ended",
        )
        sent = sum(sizes) + 4  # and the live tunnel's ping
        tunnels = len(sizes) + 1
        for direction in ("up", "down"):
            assert (
                value(found, "tunnelkit_bytes_total", listener=listener, direction=direction)
                == sent
            )
        assert value(found, "tunnelkit_connections_accepted_total", listener=listener) == tunnels
        assert value(found, "tunnelkit_tunnel_duration_seconds_count", listener=listener) == tunnels
        assert value(found, "tunnelkit_backend_connections_total", **at_backend) == tunnels
        assert value(found, "tunnelkit_backend_active_connections", **at_backend) == 0
        assert value(found, "tunnelkit_backend_up", **at_backend) == 1
        refused = {"listener": listener, "reason": "connection_limit"}
        assert value(found, "tunnelkit_connections_refused_total", **refused) == 0
        assert value(found, "tunnelkit_ready") == 1
        # The forwarders of tests/loopback.py are given --max-connections 4096.
        assert value(found, "tunnelkit_connections_max") == 4096
        assert value(found, "tunnelkit_process_open_fds") > 0
        assert value(found, "tunnelkit_process_cpu_seconds_total") > 0

    @inlineCallbacks
    def test_readyz_fails_when_every_backend_is_down(self) -> Inline:
        """Health checks take the only backend down: /readyz 503 names the listener, /healthz stays 200."""
        with refusing_address() as dead:
            fwd = self.forward("--to", dead, "--health-interval", "0.05", "--fall", "1")
            base = serve_admin(self, fwd)
            status, _, body = yield polled(
                lambda: fetch(base + "/readyz"), lambda answer: answer[0] == 503, "/readyz 503"
            )
            assert body.decode() == f"listener {LISTENER}: no backend is up\n"
            status, _, body = yield deferToThread(fetch, base + "/healthz")
            assert (status, body) == (200, b"ok\n")
            found = yield deferToThread(samples, base)
        at_backend = {"listener": LISTENER, "group": "", "backend": dead}
        assert value(found, "tunnelkit_backend_up", **at_backend) == 0
        assert value(found, "tunnelkit_backend_health_check_failures_total", **at_backend) >= 1
        assert value(found, "tunnelkit_listener_ready", listener=LISTENER) == 0
        assert value(found, "tunnelkit_ready") == 0

    @inlineCallbacks
    def test_healthz_fails_while_draining(self) -> Inline:
        """Once stopping, with a tunnel still live: /healthz and /readyz answer 503, then the tunnel ends the drain."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        base = serve_admin(self, fwd)
        status, _, _ = yield deferToThread(fetch, base + "/healthz")
        assert status == 200
        live = yield deferToThread(joined, fwd.address)
        stopped = fwd.stop()
        try:
            status, _, body = yield deferToThread(fetch, base + "/healthz")
            assert (status, body) == (503, b"draining\n")
            status, _, body = yield deferToThread(fetch, base + "/readyz")
            assert (status, body) == (503, b"draining\n")
        finally:
            live.close()
        yield stopped


class AccessTests(LoopbackTestCase):
    """Who may read the admin endpoint: a token, loopback."""

    @inlineCallbacks
    def test_token_is_required(self) -> Inline:
        """With a token: 401 (and a Basic challenge for browsers) without it or with another; 200 with it, as bearer or Basic password."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        base = serve_admin(self, fwd, token=TOKEN)
        for auth in ({}, {"token": "wrong"}, {"basic": "admin:wrong"}, {"token": TOKEN[:-1]}):
            status, headers, _ = yield deferToThread(lambda a=auth: fetch(base + "/metrics", **a))
            assert status == 401, auth
            assert 'Basic realm="tunnelkit admin"' in headers.get_all("WWW-Authenticate")
        for auth in ({"token": TOKEN}, {"basic": f"anyone:{TOKEN}"}):
            status, _, body = yield deferToThread(lambda a=auth: fetch(base + "/readyz", **a))
            assert (status, body) == (200, b"ready\n"), auth

    def test_beyond_loopback_needs_a_token(self) -> None:
        """An admin endpoint on every interface is refused without a token, served with one."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        with self.assertRaises(ConfigError) as refused:
            serve_admin(self, fwd, interface="0.0.0.0")
        [problem] = refused.exception.problems
        assert problem.as_flag({}).startswith("--admin listens on 0.0.0.0:"), problem
        assert "--admin-token" in problem.as_flag({})
        serve_admin(self, fwd, token=TOKEN, interface="0.0.0.0")

    @inlineCallbacks
    def test_paths(self) -> Inline:
        """/ leads to the status page, which forbids every outside asset; an unknown path is 404."""
        backend = self.serve(echo)
        fwd = self.forward("--to", backend.address)
        base = serve_admin(self, fwd)
        status, headers, page = yield deferToThread(fetch, base + "/")
        assert status == 200 and b"<title>tunnelkit status</title>" in page
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, _, _ = yield deferToThread(fetch, base + "/nothing")
        assert status == 404
