"""What a ``udp:`` listener is told: its addresses, its backends' balancing, its session limits."""

from __future__ import annotations

import attrs


@attrs.frozen
class UdpSettings:
    """The UDP part of a listener's settings (the rest: ``to``, ``balance``, client policy)."""

    #: ``(interface, port)`` of each ``listen`` value.
    addresses: tuple[tuple[str, int], ...]
    #: Seconds without a datagram either way after which a session ends.
    idle_timeout: float = 60.0
    #: Datagrams from the backend after which a session ends (``None``: no limit).
    replies: int | None = None
    #: Sessions one client address (all its ports together) may have at once.
    sessions_per_source: int = 64
    #: New sessions per second one client address may open, with a burst of as many.
    session_rate: int = 20
