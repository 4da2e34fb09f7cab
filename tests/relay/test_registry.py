"""The live-tunnel registry: connection cap and drain."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.app.service import default_max_tunnels
from tunnelkit.backends.group import Backend, BackendGroup
from tunnelkit.config.model import Timeouts
from tunnelkit.modes.forward import ForwardMode
from tunnelkit.relay.factory import TunnelFactory
from tunnelkit.relay.registry import TunnelRegistry
from tunnelkit.relay.tunnel import Tunnel


def tunnel(clock: Clock) -> Tunnel:
    return Tunnel(clock, Timeouts(), lambda t, r: None, read_size=1024)


class RegistryTests(SynchronousTestCase):
    """Admission, counters and draining."""

    def test_cap_refuses_and_counts(self) -> None:
        """Past the cap new tunnels are refused and counted."""
        clock = Clock()
        registry = TunnelRegistry(clock, max_tunnels=2)
        first, second, third = tunnel(clock), tunnel(clock), tunnel(clock)
        self.assertTrue(registry.admit(first))
        self.assertTrue(registry.admit(second))
        self.assertFalse(registry.admit(third))
        self.assertEqual((registry.accepted, registry.refused), (2, 1))
        registry.discard(first)
        self.assertTrue(registry.admit(third))

    def test_factory_returns_none_when_full(self) -> None:
        """A full registry makes the listener close the new socket (buildProtocol returns None)."""
        clock = Clock()
        registry = TunnelRegistry(clock, max_tunnels=1)
        factory = TunnelFactory(
            listener="l",
            mode=ForwardMode(BackendGroup([Backend("b", object())], clock, 1.0)),  # type: ignore[arg-type]
            registry=registry,
            clock=clock,
            timeouts=Timeouts(),
            read_size=1024,
        )
        addr = IPv4Address("TCP", "127.0.0.1", 1)
        self.assertIsNotNone(factory.buildProtocol(addr))
        self.assertIsNone(factory.buildProtocol(addr))

    def test_drain_waits_for_tunnels_to_end(self) -> None:
        """Drain fires when the last tunnel ends, before the deadline."""
        clock = Clock()
        registry = TunnelRegistry(clock, max_tunnels=5)
        t = tunnel(clock)
        registry.admit(t)
        fired: list[None] = []
        registry.drain(30).addCallback(fired.append)
        clock.advance(10)
        self.assertEqual(fired, [])
        registry.discard(t)
        self.assertEqual(fired, [None])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_aborts_at_deadline(self) -> None:
        """Tunnels still live at the drain deadline are aborted."""
        clock = Clock()
        registry = TunnelRegistry(clock, max_tunnels=5)
        t = tunnel(clock)
        aborted: list[str] = []
        t.abort = lambda reason, kind=None: aborted.append(reason)  # type: ignore[method-assign]
        registry.admit(t)
        registry.drain(30)
        clock.advance(30)
        self.assertEqual(aborted, ["shutdown: drain deadline (30 s)"])

    def test_drain_messages_count_in_words(self) -> None:
        """The drain's messages say "1 tunnel" and "2 tunnels"."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for count in (1, 2):
            clock = Clock()
            registry = TunnelRegistry(clock, max_tunnels=5)
            for _ in range(count):
                t = tunnel(clock)
                t.abort = lambda reason, kind=None: None  # type: ignore[method-assign]
                registry.admit(t)
            registry.drain(30)
            clock.advance(30)
        texts = [formatEvent(e) for e in events if e.get("event", "").startswith("drain_")]
        self.assertEqual(
            texts,
            [
                "draining 1 tunnel for up to 30 s",
                "drain deadline reached; aborting 1 tunnel",
                "draining 2 tunnels for up to 30 s",
                "drain deadline reached; aborting 2 tunnels",
            ],
        )

    def test_drain_with_nothing_live_is_immediate(self) -> None:
        """With no live tunnel the drain is already done."""
        fired: list[None] = []
        TunnelRegistry(Clock(), 5).drain(30).addCallback(fired.append)
        self.assertEqual(fired, [None])

    def test_default_cap_leaves_descriptors_in_reserve(self) -> None:
        """The default cap is two descriptors per tunnel below the fd limit, minus a reserve."""
        self.assertEqual(default_max_tunnels(1024), (1024 - 64) // 2)
        self.assertEqual(default_max_tunnels(10), 1)
