"""In-memory tests of the relay's promises: producers, half-close, RST, timers, one record."""

from __future__ import annotations

from transports import HalfCloseTransport
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.config.model import Timeouts
from tunnelkit.relay.tunnel import CloseKind, Leg, Side, Tunnel, TunnelRecord


class RelayHarness:
    """A tunnel between two in-memory transports, driven by a ``Clock``."""

    def __init__(self, timeouts: Timeouts | None = None) -> None:
        self.clock = Clock()
        self.records: list[TunnelRecord] = []
        self.tunnel = Tunnel(
            self.clock,
            timeouts or Timeouts(idle=100.0, fin=30.0, close_grace=5.0),
            lambda tunnel, record: self.records.append(record),
            read_size=65536,
            backend_name="backend:80",
        )
        self.opened: list[Tunnel] = []
        self.tunnel.on_client_connected = self.opened.append
        self.client_transport = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.7", 40000)
        )
        self.backend_transport = HalfCloseTransport(
            peerAddress=IPv4Address("TCP", "198.51.100.1", 80)
        )
        self.tunnel.client.makeConnection(self.client_transport)

    def connect_backend(self) -> Leg:
        backend = self.tunnel.backend_leg()
        backend.makeConnection(self.backend_transport)
        self.tunnel.join(backend)
        return backend

    def lose(self, leg: Leg, error: type[Exception]) -> None:
        leg.connectionLost(Failure(error()))


class SetUpTests(SynchronousTestCase):
    """Before and at the moment the backend joins."""

    def test_client_held_up_to_a_read_size_while_connecting(self) -> None:
        """While the backend connects the client is still read, and paused once a read size is held."""
        h = RelayHarness()
        self.assertEqual(h.client_transport.producerState, "producing")
        self.assertEqual(h.opened, [h.tunnel])
        h.tunnel.client.dataReceived(b"x" * 65535)
        self.assertEqual(h.client_transport.producerState, "producing")
        h.tunnel.client.dataReceived(b"y")
        self.assertEqual(h.client_transport.producerState, "paused")
        h.connect_backend()
        self.assertEqual(h.client_transport.producerState, "producing")
        self.assertEqual(h.backend_transport.value(), b"x" * 65535 + b"y")

    def test_client_eof_while_connecting_is_passed_on_after_join(self) -> None:
        """EOF before the backend joins: the backend gets the early bytes, then the half-close."""
        h = RelayHarness()
        h.tunnel.pending = Deferred()
        h.tunnel.client.dataReceived(b"request")
        h.tunnel.client.readConnectionLost()
        self.assertFalse(h.client_transport.disconnecting)
        backend = h.connect_backend()
        self.assertEqual(h.backend_transport.value(), b"request")
        self.assertTrue(h.backend_transport.write_closed)
        backend.dataReceived(b"reply")
        self.assertEqual(h.client_transport.value(), b"reply")


class CloseTests(SynchronousTestCase):
    """Half-close, abortive close and the single end record."""

    def test_client_eof_half_closes_backend_and_reply_still_flows(self) -> None:
        """Client EOF becomes loseWriteConnection on the backend; its reply still reaches the client."""
        h = RelayHarness()
        backend = h.connect_backend()
        h.tunnel.client.dataReceived(b"request")
        h.tunnel.client.readConnectionLost()
        self.assertTrue(h.backend_transport.write_closed)
        self.assertIsNone(h.backend_transport.producer)
        self.assertFalse(h.backend_transport.disconnecting)
        self.assertFalse(h.client_transport.disconnecting)
        backend.dataReceived(b"response")
        self.assertEqual(h.client_transport.value(), b"response")

    def test_backend_eof_half_closes_client(self) -> None:
        """Backend EOF becomes loseWriteConnection on the client; the client may still send."""
        h = RelayHarness()
        backend = h.connect_backend()
        backend.readConnectionLost()
        self.assertTrue(h.client_transport.write_closed)
        h.tunnel.client.dataReceived(b"more")
        self.assertEqual(h.backend_transport.value(), b"more")

    def test_both_eofs_close_both_and_record_once(self) -> None:
        """When both directions are done both legs close, and one record says who began."""
        h = RelayHarness()
        backend = h.connect_backend()
        h.tunnel.client.dataReceived(b"abc")
        h.clock.advance(2)
        h.tunnel.client.readConnectionLost()
        backend.dataReceived(b"defg")
        backend.readConnectionLost()
        self.assertTrue(h.client_transport.disconnecting)
        self.assertTrue(h.backend_transport.disconnecting)
        h.lose(h.tunnel.client, ConnectionDone)
        self.assertEqual(h.records, [])
        h.lose(backend, ConnectionDone)
        [record] = h.records
        self.assertEqual(record.closed_by, Side.CLIENT)
        self.assertEqual(record.close_kind, CloseKind.FIN)
        self.assertEqual((record.bytes_up, record.bytes_down), (3, 4))
        self.assertEqual(record.client, "192.0.2.7:40000")
        self.assertEqual(record.backend_address, "198.51.100.1:80")
        self.assertEqual(record.duration, 2)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_repeated_eof_is_handled_once(self) -> None:
        """A second EOF report for the same leg changes nothing."""
        h = RelayHarness()
        h.connect_backend()
        h.tunnel.client.readConnectionLost()
        h.tunnel.client.readConnectionLost()
        self.assertFalse(h.client_transport.disconnecting)

    def test_client_reset_aborts_backend(self) -> None:
        """An RST from the client becomes abortConnection towards the backend."""
        h = RelayHarness()
        backend = h.connect_backend()
        h.lose(h.tunnel.client, ConnectionLost)
        self.assertTrue(h.backend_transport.aborted)
        h.lose(backend, ConnectionAborted)
        [record] = h.records
        self.assertEqual((record.closed_by, record.close_kind), (Side.CLIENT, CloseKind.RST))

    def test_backend_reset_aborts_client(self) -> None:
        """An RST from the backend becomes abortConnection towards the client."""
        h = RelayHarness()
        backend = h.connect_backend()
        h.lose(backend, ConnectionLost)
        self.assertTrue(h.client_transport.aborted)

    def test_reset_after_complete_send_closes_cleanly(self) -> None:
        """A leg that reset after sending all of its data (EOF seen) gets a clean close, not an RST."""
        h = RelayHarness()
        backend = h.connect_backend()
        backend.readConnectionLost()
        h.lose(backend, ConnectionLost)
        self.assertFalse(h.client_transport.aborted)
        self.assertTrue(h.client_transport.write_closed)

    def test_clean_close_of_one_leg_closes_the_other_cleanly(self) -> None:
        """A leg closed cleanly closes its peer cleanly: a FIN, then a close at the peer's EOF."""
        h = RelayHarness()
        backend = h.connect_backend()
        h.lose(backend, ConnectionDone)
        self.assertTrue(h.client_transport.write_closed)
        self.assertFalse(h.client_transport.aborted)
        h.tunnel.client.readConnectionLost()
        self.assertTrue(h.client_transport.disconnecting)

    def test_closed_leg_that_still_sends_lingers(self) -> None:
        """A leg closed before its EOF gets a FIN and is read: what it sends is dropped, its EOF closes it."""
        h = RelayHarness(Timeouts(idle=100.0, fin=30.0, close_grace=5.0, half_close=False))
        backend = h.connect_backend()
        h.tunnel.client.dataReceived(b"request")
        backend.dataReceived(b"answer")
        backend.readConnectionLost()
        self.assertTrue(h.backend_transport.disconnecting)
        self.assertTrue(h.client_transport.write_closed)
        self.assertFalse(h.client_transport.disconnecting)
        self.assertEqual(h.client_transport.producerState, "producing")
        h.tunnel.client.dataReceived(b"more of the request")
        self.assertEqual(h.backend_transport.value(), b"request")
        h.tunnel.client.readConnectionLost()
        self.assertTrue(h.client_transport.disconnecting)
        h.lose(backend, ConnectionDone)
        h.lose(h.tunnel.client, ConnectionDone)
        [record] = h.records
        self.assertEqual((record.closed_by, record.close_kind), (Side.BACKEND, CloseKind.FIN))
        self.assertEqual((record.bytes_up, record.bytes_down), (7, 6))

    def test_pending_connect_cancelled_when_client_leaves(self) -> None:
        """A client that leaves while the backend connect is pending cancels it, and the tunnel ends."""
        h = RelayHarness()
        cancelled: list[bool] = []
        h.tunnel.pending = Deferred(lambda d: cancelled.append(True))
        h.tunnel.pending.addErrback(lambda f: None)
        h.lose(h.tunnel.client, ConnectionDone)
        self.assertEqual(cancelled, [True])
        [record] = h.records
        self.assertEqual(record.closed_by, Side.CLIENT)
        self.assertIsNone(record.connect_time)

    def test_backend_that_joins_after_client_left_is_closed(self) -> None:
        """A backend connection completing after the client left is closed, not relayed."""
        h = RelayHarness()
        h.lose(h.tunnel.client, ConnectionDone)
        backend = h.tunnel.backend_leg()
        backend.makeConnection(h.backend_transport)
        h.tunnel.join(backend)
        self.assertTrue(h.backend_transport.disconnecting)
        self.assertIsNone(h.backend_transport.producer)

    def test_fail_closes_client_with_reason(self) -> None:
        """A backend that cannot be opened closes the client and records why."""
        h = RelayHarness()
        h.tunnel.fail("no backend connected: refused")
        self.assertTrue(h.client_transport.disconnecting)
        h.lose(h.tunnel.client, ConnectionDone)
        [record] = h.records
        self.assertEqual((record.closed_by, record.close_kind), (Side.PROXY, CloseKind.ERROR))
        self.assertEqual(record.reason, "no backend connected: refused")

    def test_abort_resets_both_legs(self) -> None:
        """Tunnel.abort (the drain deadline) resets both legs."""
        h = RelayHarness()
        h.connect_backend()
        h.tunnel.abort("shutdown")
        self.assertTrue(h.client_transport.aborted)
        self.assertTrue(h.backend_transport.aborted)


def buffered(transport: HalfCloseTransport, size: int) -> bytes:
    """Make ``transport`` hold ``size`` unsent bytes in Twisted's write buffer, as a slow reader leaves them."""
    transport.dataBuffer = b"u" * size
    transport.offset = 0
    transport._tempDataLen = 0
    return transport.dataBuffer


class TimerTests(SynchronousTestCase):
    """Idle, fin and close-grace timers on a Clock."""

    def test_idle_timer_fires_after_quiet_period(self) -> None:
        """A tunnel that moves no byte for the idle timeout is closed: a FIN to each side."""
        h = RelayHarness(Timeouts(idle=10.0, fin=30.0, close_grace=5.0))
        h.connect_backend()
        h.clock.advance(9.9)
        self.assertFalse(h.client_transport.write_closed)
        h.clock.advance(0.1)
        self.assertTrue(h.client_transport.write_closed)
        self.assertTrue(h.backend_transport.write_closed)

    def test_traffic_postpones_idle_timer(self) -> None:
        """Bytes moved restart the idle period; the close comes a full period after the last byte.

        The watch looks every idle/16 s, so the close is at most that late.
        """
        h = RelayHarness(Timeouts(idle=10.0, fin=30.0, close_grace=5.0))
        backend = h.connect_backend()
        h.clock.advance(6)
        backend.dataReceived(b"x")
        h.clock.advance(9.99)
        self.assertFalse(h.client_transport.write_closed)
        h.clock.advance(0.01 + 10 / 16)
        self.assertTrue(h.client_transport.write_closed)

    def test_idle_close_aborts_when_stalled_for_a_grace(self) -> None:
        """A closing leg whose reader takes nothing for a whole grace is aborted; the record drops its bytes."""
        h = RelayHarness(Timeouts(idle=10.0, fin=30.0, close_grace=5.0))
        backend = h.connect_backend()
        backend.dataReceived(b"x" * 1000)
        unsent = buffered(h.client_transport, 600)
        h.clock.advance(10)
        h.clock.advance(5)
        self.assertFalse(h.client_transport.aborted)
        h.clock.advance(5)
        self.assertTrue(h.client_transport.aborted)
        self.assertTrue(h.backend_transport.aborted)
        h.lose(h.tunnel.client, ConnectionAborted)
        h.lose(backend, ConnectionAborted)
        [record] = h.records
        self.assertEqual(record.bytes_down, 1000 - len(unsent))

    def test_close_grace_spares_a_reader_that_reads(self) -> None:
        """A closing leg whose reader keeps taking bytes is not aborted by the grace, only by the fin timer."""
        h = RelayHarness(Timeouts(idle=None, fin=60.0, close_grace=5.0))
        backend = h.connect_backend()
        h.tunnel.client.readConnectionLost()
        backend.dataReceived(b"x" * 1000)
        backend.readConnectionLost()
        for left in range(900, 0, -100):
            buffered(h.client_transport, left)
            h.clock.advance(5)
            self.assertFalse(h.client_transport.aborted, left)
        self.assertTrue(h.client_transport.disconnecting)
        h.clock.advance(15)
        self.assertTrue(h.client_transport.aborted)

    def test_lingering_peer_owing_nothing_is_closed_without_reset(self) -> None:
        """A peer that neither closes nor is owed anything after our FIN is closed after the grace, not reset."""
        h = RelayHarness(Timeouts(idle=10.0, fin=None, close_grace=5.0))
        h.connect_backend()
        h.clock.advance(10)
        self.assertTrue(h.client_transport.write_closed)
        h.clock.advance(5)
        self.assertTrue(h.client_transport.disconnecting)
        self.assertTrue(h.backend_transport.disconnecting)
        self.assertFalse(h.client_transport.aborted)

    def test_idle_timeout_is_recorded(self) -> None:
        """The record of an idle-closed tunnel says the proxy closed it on a timeout."""
        h = RelayHarness(Timeouts(idle=10.0, fin=None, close_grace=5.0))
        backend = h.connect_backend()
        h.clock.advance(10)
        h.lose(h.tunnel.client, ConnectionDone)
        h.lose(backend, ConnectionDone)
        [record] = h.records
        self.assertEqual((record.closed_by, record.close_kind), (Side.PROXY, CloseKind.TIMEOUT))
        self.assertIn("idle timeout", record.reason)

    def test_no_idle_timer_when_disabled(self) -> None:
        """idle=None schedules no idle timer."""
        h = RelayHarness(Timeouts(idle=None, fin=None, close_grace=5.0))
        h.connect_backend()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_fin_timer_aborts_half_closed_tunnel(self) -> None:
        """A tunnel half-closed for longer than the fin timeout is aborted."""
        h = RelayHarness(Timeouts(idle=None, fin=30.0, close_grace=5.0))
        h.connect_backend()
        h.tunnel.client.readConnectionLost()
        h.clock.advance(29)
        self.assertFalse(h.backend_transport.aborted)
        h.clock.advance(1)
        self.assertTrue(h.backend_transport.aborted)
        self.assertTrue(h.client_transport.aborted)

    def test_timers_cancelled_when_tunnel_ends(self) -> None:
        """No delayed call outlives the tunnel."""
        h = RelayHarness(Timeouts(idle=10.0, fin=30.0, close_grace=5.0))
        backend = h.connect_backend()
        h.tunnel.client.readConnectionLost()
        h.lose(h.tunnel.client, ConnectionLost)
        h.lose(backend, ConnectionAborted)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(len(h.records), 1)
