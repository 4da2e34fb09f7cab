"""In-memory tests of backend names resolved again while running (--resolve-interval)."""

from __future__ import annotations

import ipaddress
from random import Random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.app import resolving
from tunnelkit.backends import resolver
from tunnelkit.backends.endpoints import AddressEndpoint
from tunnelkit.backends.group import Backend, BackendGroup, Balancing
from tunnelkit.backends.health import HealthSettings
from tunnelkit.config.addresses import HostPort
from tunnelkit.config.model import BackendSpec

DB = BackendSpec("db:5432", HostPort("db", 5432), False)
#: db's addresses at start.
TWO = ("10.0.0.1", "10.0.0.2")
FIXED = BackendSpec("10.0.0.9:5432", HostPort("10.0.0.9", 5432), False)


class Names:
    """A fake resolver: ``answers[host]`` is a list of addresses, or an error message."""

    def __init__(self, **answers: list[str] | str) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Deferred[list[resolver.IPAddress]]:
        self.asked.append((host, port))
        answer = self.answers[host]
        if isinstance(answer, str):
            return fail(resolver.ResolveError(answer))
        return succeed([ipaddress.ip_address(a) for a in answer])


class RefresherTests(SynchronousTestCase):
    """Every interval the names are resolved again; a changed set of addresses is swapped in."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.swaps = 0
        #: Why the plane refuses new sets, if it does.
        self.refuse: str | None = None
        self.reactor = MemoryReactorClock()

    def refresher(self, names: Names, *at_start: str, **options: Any) -> resolving.Refresher:
        """A started refresher of ``db`` (at ``at_start``, or as written) and a fixed address."""
        start = [ipaddress.ip_address(a) for a in at_start]
        db = resolving.named(DB, start) if start else ((DB.text, DB),)
        resolved = [(DB, db), (FIXED, ((FIXED.text, FIXED),))]
        make = self.make_backend
        backends = [make(name, spec) for _, entries in resolved for name, spec in entries]
        group = BackendGroup(backends, self.reactor, 5.0, Balancing("first"), listener="l")
        refresher = resolving.Refresher(
            group,
            resolved,
            10.0,
            resolve=names,
            make_backend=make,
            swap=lambda backends: self.swap(group, backends),
            random=Random(15),
            **options,
        )
        refresher.start()
        self.addCleanup(refresher.stop)
        return refresher

    def make_backend(self, name: str, spec: BackendSpec) -> Backend:
        assert isinstance(spec.address, HostPort)
        endpoint = AddressEndpoint(self.reactor, spec.address.host, spec.address.port)
        return Backend(name, endpoint, spec.weight, spec.backup)

    def swap(self, group: BackendGroup, backends: list[Backend]) -> None:
        """As the engine's plane does: refuse a set it cannot serve, else replace (and count)."""
        if self.refuse is not None:
            raise resolving.Unservable(self.refuse)
        group.replace(backends)
        self.swaps += 1

    def named(self, event: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("event") == event]

    def test_unchanged_addresses_swap_nothing(self) -> None:
        """The same answer, in any round: the group keeps its very backends, nothing is logged."""
        names = Names(db=["10.0.0.1", "10.0.0.2"])
        refresher = self.refresher(names, *TWO)
        backends = refresher.group.backends
        for _ in range(3):
            refresher.clock.advance(11.0)
        self.assertEqual(names.asked, [("db", 5432)] * 3)
        self.assertIs(refresher.group.backends, backends)
        self.assertEqual((self.swaps, self.named("backends_changed")), (0, []))

    def test_changed_addresses_are_swapped_in(self) -> None:
        """A new address joins, a gone one leaves, the rest keep their state; the engine is told."""
        names = Names(db=["10.0.0.2", "10.0.0.3"])
        refresher = self.refresher(names, *TWO)
        group = refresher.group
        kept = group.states[1]
        refresher.clock.advance(11.0)
        self.assertEqual(
            [b.name for b in group.backends],
            ["db:5432 (10.0.0.2)", "db:5432 (10.0.0.3)", "10.0.0.9:5432"],
        )
        self.assertIs(group.states[0], kept)
        self.assertEqual(self.swaps, 1)
        [changed] = self.named("backends_changed")
        self.assertEqual(
            (changed["added"], changed["removed"]), (["db:5432 (10.0.0.3)"], ["db:5432 (10.0.0.1)"])
        )

    def test_one_address_keeps_the_name_as_written(self) -> None:
        """Down to one address, the name is db:5432 again (as at start), at that address."""
        refresher = self.refresher(Names(db=["10.0.0.7"]), *TWO)
        refresher.clock.advance(11.0)
        self.assertEqual([b.name for b in refresher.group.backends], ["db:5432", "10.0.0.9:5432"])

    def test_a_failure_keeps_the_addresses_and_warns_once(self) -> None:
        """A name that does not resolve keeps its addresses; one warning per streak of failures."""
        names = Names(db="cannot resolve 'db'")
        refresher = self.refresher(names, *TWO)
        backends = refresher.group.backends
        for _ in range(3):
            refresher.clock.advance(11.0)
        self.assertIs(refresher.group.backends, backends)
        self.assertEqual(len(names.asked), 3)
        [warned] = self.named("backend_unresolved")
        self.assertEqual((warned["backend"], warned["error"]), ("db:5432", "cannot resolve 'db'"))
        names.answers["db"] = ["10.0.0.1"]
        refresher.clock.advance(11.0)
        names.answers["db"] = "again"
        refresher.clock.advance(11.0)
        self.assertEqual(len(self.named("backend_unresolved")), 2)
        self.assertEqual(len(refresher.group.backends), 2)

    def test_a_set_the_plane_cannot_serve_keeps_the_old_one(self) -> None:
        """Refused (the engine's limits): the old backends stay, warned once; a later round swaps."""
        names = Names(db=["10.0.0.3"])
        refresher = self.refresher(names, *TWO)
        backends = refresher.group.backends
        self.refuse = "it takes at most 64 backends"
        refresher.clock.advance(11.0)
        refresher.clock.advance(11.0)
        self.assertIs(refresher.group.backends, backends)
        [warned] = self.named("backends_unchanged")
        self.assertEqual(warned["error"], "it takes at most 64 backends")
        self.refuse = None
        refresher.clock.advance(11.0)
        self.assertEqual(self.swaps, 1)
        self.assertEqual([b.name for b in refresher.group.backends], ["db:5432", "10.0.0.9:5432"])

    def test_the_interval_is_jittered(self) -> None:
        """Each round comes within 10 % of the interval, not on a fixed beat."""
        refresher = self.refresher(Names(db=["10.0.0.1", "10.0.0.2"]), *TWO)
        [call] = refresher.clock.getDelayedCalls()
        self.assertTrue(9.0 <= call.getTime() <= 11.0)
        self.assertNotEqual(call.getTime(), 10.0)

    def test_health_checks_restart_on_the_new_backends(self) -> None:
        """The checker reads its backends at start: a swap stops it and starts one on the new set."""
        health = HealthSettings(interval=5.0, timeout=1.0)
        refresher = self.refresher(Names(db=["10.0.0.3"]), *TWO, health=health)
        first = refresher.checker
        assert first is not None and first.running
        refresher.clock.advance(11.0)
        second = refresher.checker
        assert second is not None and second is not first
        self.assertFalse(first.running)
        self.assertTrue(second.running)
        refresher.stop()
        self.assertFalse(second.running)
        self.assertEqual(refresher.clock.getDelayedCalls(), [])

    def test_a_round_answered_after_stop_changes_nothing(self) -> None:
        """A resolution still in the thread pool when the service stops is ignored."""
        pending: Deferred[list[resolver.IPAddress]] = Deferred()
        refresher = self.refresher(Names(), *TWO)
        refresher.resolve = lambda host, port: pending
        refresher.clock.advance(11.0)
        refresher.stop()
        pending.callback([ipaddress.ip_address("10.0.0.5")])
        self.assertEqual((self.swaps, refresher.clock.getDelayedCalls()), (0, []))
        self.assertEqual(len(refresher.group.backends), 3)

    def test_a_name_unresolved_at_start_gets_its_address(self) -> None:
        """db did not resolve at start (dialed by name); once it does, clients go to its address."""
        refresher = self.refresher(Names(db=["10.0.0.4"]))
        self.assertEqual(self.swaps, 0)
        refresher.clock.advance(11.0)
        self.assertEqual([b.name for b in refresher.group.backends], ["db:5432", "10.0.0.9:5432"])
        refresher.group.dial(Factory())
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.4", 5432))
