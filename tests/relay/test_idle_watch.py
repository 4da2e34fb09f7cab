"""The shared idle timer: one delayed call for every tunnel, closes at most idle/16 late."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from tunnelkit.relay.idle_watch import IdleWatch


class FakeTunnel:
    def __init__(self, clock: Clock) -> None:
        self.last_moved = clock.seconds()
        self.expired_at: float | None = None
        self.clock = clock

    def idle_expired(self) -> None:
        self.expired_at = self.clock.seconds()


def watch(clock: Clock, *tunnels: Any) -> IdleWatch:
    idle = IdleWatch(clock, 16.0)
    for tunnel in tunnels:
        idle.add(tunnel)
    return idle


def test_one_timer_for_all_tunnels() -> None:
    clock = Clock()
    tunnels = [FakeTunnel(clock) for _ in range(1000)]
    watch(clock, *tunnels)
    assert len(clock.getDelayedCalls()) == 1


def test_quiet_tunnels_expire_within_one_tick() -> None:
    clock = Clock()
    quiet, busy = FakeTunnel(clock), FakeTunnel(clock)
    idle = watch(clock, quiet, busy)
    clock.advance(15.9)
    busy.last_moved = clock.seconds()
    clock.advance(0.1)
    assert quiet.expired_at == 16.0
    assert busy.expired_at is None
    assert idle.tunnels == {busy}
    # busy moved its last byte at 15.9: closed at the first sweep at or after 31.9.
    for _ in range(40):
        clock.advance(0.5)
    assert busy.expired_at == 32.0
    assert clock.getDelayedCalls() == [] and not idle.tunnels


def test_timer_stops_when_nothing_is_watched() -> None:
    clock = Clock()
    tunnel = FakeTunnel(clock)
    idle = watch(clock, tunnel)
    idle.discard(tunnel)
    assert clock.getDelayedCalls() == []
    idle.add(tunnel)
    assert len(clock.getDelayedCalls()) == 1


def test_cadence_survives_a_late_sweep() -> None:
    """A reactor that runs the sweep late does not push later sweeps back."""
    clock = Clock()
    tunnel = FakeTunnel(clock)
    watch(clock, tunnel)
    clock.advance(9.9)
    [call] = clock.getDelayedCalls()
    assert call.getTime() == 10.0
