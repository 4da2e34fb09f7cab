"""One port for every protocol (``--mode auto``): peek at the first bytes, hand over to the mode they name.

sslh and gost serve SOCKS, HTTP CONNECT, TLS and anything else on one port
the same way: the first bytes a client sends say what it speaks.

* ``05``: a SOCKS5 greeting, to the SOCKS5 mode;
* ``CONNECT `` (the method, then a space): an HTTP CONNECT request, to the
  CONNECT mode;
* ``16``: a TLS handshake record: terminated when the listener has
  certificates (``--tls-cert``), and the decrypted stream is peeked at
  again (CONNECT over TLS is an HTTPS proxy); else to the SNI router when
  the listener has ``--route`` rules (the TLS passes through untouched);
* anything else, to ``--to`` if given (which then gets every byte), else
  the client is closed: ``unknown protocol``.

A client that sends nothing within ``--detect-timeout`` speaks a protocol
where the server talks first (SMTP, SSH's banner comes from the server too,
MySQL): it goes to ``--to``, or is closed if there is none. The peek reads
at most a few bytes and answers nothing itself: the chosen mode identifies
the client from the same bytes (:meth:`Leg.replay
<tunnelkit.relay.tunnel.Leg.replay>`), under the one header deadline every
mode shares (:func:`~tunnelkit.relay.phases.time_left`).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred

from tunnelkit.relay.phases import Connection, Handoff, Mode, Refused, time_left
from tunnelkit.relay.tunnel import CloseKind, Tunnel

_CONNECT = b"CONNECT "
#: The most bytes a decision needs: the CONNECT method and its space.
PEEK = len(_CONNECT)
_SOCKS5 = 0x05
_TLS_HANDSHAKE = 0x16


#: ``upgrade(tunnel, first bytes, then)``: see :attr:`AutoModes.upgrade`.
Upgrade = Callable[[Tunnel, bytes, Callable[[Tunnel], None]], None]


@attrs.frozen
class AutoModes:
    """The modes an auto listener hands its clients to; ``None``: not served here."""

    socks5: Mode
    connect: Mode
    #: TLS clients: the SNI router of the listener's ``--route`` rules.
    tls: Mode | None = None
    #: Everything else, and clients that send nothing first: ``--to``.
    other: Mode | None = None
    #: Terminates TLS on a client from its first bytes, then runs the given
    #: start once the handshake is done (:class:`tunnelkit.tls.upgrade.TLSUpgrade`).
    upgrade: Upgrade | None = None


def detect(first: bytes, modes: AutoModes) -> Mode | bool | None:
    """The mode ``first`` (what the client sent so far) names.

    ``True``: too few bytes to tell yet; ``None``: nothing on this listener
    serves it.
    """
    if not first:
        return True
    lead = first[0]
    if lead == _SOCKS5:
        return modes.socks5
    if lead == _TLS_HANDSHAKE and modes.tls is not None:
        return modes.tls
    if _CONNECT.startswith(first[:PEEK]):
        if len(first) < PEEK:
            return True
        return modes.connect
    return modes.other


class _Peek:
    """One client's first bytes, until they name a mode or ``--detect-timeout`` passes."""

    def __init__(self, tunnel: Tunnel, auto: AutoMode) -> None:
        self.tunnel = tunnel
        self.auto = auto
        self.seen = b""
        self.result: Deferred[Handoff] = Deferred()

    def begin(self) -> Deferred[Handoff]:
        self.tunnel.arm("detect", self.auto.detect_timeout, self._silent)
        self.tunnel.client.intercept(self._feed)
        return self.result

    def _feed(self, data: bytes) -> None:
        if not self.seen:
            # Not silent: the header deadline, from the accept, bounds the rest.
            self.tunnel.disarm("detect")
            self.tunnel.arm(
                "header", time_left(self.tunnel, self.auto.header_timeout), self._too_slow
            )
        self.seen += data
        upgrade = self.auto.modes.upgrade
        if upgrade is not None and self.seen[0] == _TLS_HANDSHAKE:
            self._stop()
            self.result.cancel()  # this Connection ends here; another begins after the handshake
            upgrade(self.tunnel, self.seen, self.auto.start_decrypted)
            return
        chosen = detect(self.seen, self.auto.modes)
        if chosen is True:
            return
        self._hand_to(chosen if isinstance(chosen, Mode) else None, "unknown protocol")

    def _stop(self) -> None:
        self.tunnel.disarm("detect")
        self.tunnel.disarm("header")

    def _silent(self) -> None:
        self._hand_to(self.auto.modes.other, "sent nothing", CloseKind.TIMEOUT)

    def _too_slow(self) -> None:
        self._hand_to(None, "no protocol recognised in time", CloseKind.TIMEOUT)

    def _hand_to(self, mode: Mode | None, why: str, kind: CloseKind = CloseKind.ERROR) -> None:
        tunnel = self.tunnel
        self._stop()
        if mode is None:
            tunnel.client.intercept(_discard)
            self.result.errback(Refused(f"{why}: no mode of this listener serves it", kind))
            return
        tunnel.client.intercept(None)  # held for the backend, unless the mode reads them
        identifying = mode.identify(tunnel)
        tunnel.client.replay(self.seen)
        self.result.callback(Handoff(mode, identifying))


def _discard(data: bytes) -> None:
    """What a client sends once refused: never read."""


class AutoMode(Mode):
    """Identifies nothing itself: peeks at the first bytes and hands the client to the mode they name."""

    name = "auto"

    def __init__(self, modes: AutoModes, detect_timeout: float, header_timeout: float) -> None:
        self.modes = modes
        self.detect_timeout = detect_timeout
        self.header_timeout = header_timeout
        #: What a TLS client's decrypted stream is peeked at with: the same, but no TLS in TLS.
        self.decrypted = (
            AutoMode(attrs.evolve(modes, tls=None, upgrade=None), detect_timeout, header_timeout)
            if modes.upgrade is not None
            else self
        )

    def start_decrypted(self, tunnel: Tunnel) -> None:
        """A TLS client's handshake is done: the phases again, over what it sends inside."""
        Connection(tunnel, self.decrypted).start()

    def identify(self, tunnel: Tunnel) -> Deferred[Handoff]:
        return _Peek(tunnel, self).begin()
