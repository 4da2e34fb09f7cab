"""Send relayed bytes straight to the socket when nothing is queued before them.

Twisted's ``transport.write`` only queues: the bytes leave on a later reactor
turn, after an ``epoll_ctl`` to watch for writability, a ``doWrite`` that sends
at most 128 KiB, and another ``epoll_ctl`` to stop watching. For a relay that
is two extra system calls, a loop iteration and about eight Python calls per
chunk. asyncio and uvloop send at once when their buffer is empty; this does
the same for Twisted's TCP transports:

* nothing is queued (no earlier bytes could be overtaken) and the transport
  is open for writing: ``socket.send`` now, and queue only what the kernel did
  not take, with the ordinary ``write`` (which keeps backpressure: a full
  queue pauses the producer exactly as before);
* anything else (queued bytes, a closing transport, a socket error, TLS or
  any non-TCP transport): the ordinary ``write``, which meets and reports
  errors on its own path.

It reads four attributes of Twisted's ``FileDescriptor`` that are not public
API (``dataBuffer``, ``offset``, ``_tempDataLen``, ``_writeDisconnecting``);
the relay test suite runs with this on and off (``--no-write-through``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_FAST_PATH_ATTRIBUTES = ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnecting", "socket")


class _WriteThrough:
    """The fast path for one transport (slots: it lives as long as the tunnel)."""

    # Only the transport is kept: two cached bound methods cost 128 bytes per
    # leg of every idle tunnel, for two attribute lookups per chunk.
    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def __call__(self, data: bytes | memoryview) -> None:
        """Send ``data`` (bytes, or a view of a buffer that is reused once this returns)."""
        transport = self._transport
        if must_queue(transport):
            transport.write(bytes(data))
            return
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            transport.write(bytes(data))
            return
        if sent < len(data):
            # Queued bytes must outlive a reused buffer: a copy (for bytes,
            # slicing copies anyway and bytes() of bytes is the same object).
            transport.write(bytes(data[sent:]))


def must_queue(transport: Any) -> bool:
    """Whether bytes for ``transport`` must go through Twisted: some are queued already, or it closes.

    Also the splice path's test (:mod:`tunnelkit.relay.splice`): bytes sent past
    Twisted would overtake the queued ones.
    """
    return bool(
        transport._tempDataLen
        or transport.offset < len(transport.dataBuffer)
        or transport.disconnecting
        or transport._writeDisconnecting
        or not transport.connected
    )


def takes_views(writer: Callable[[bytes], None]) -> bool:
    """True if ``writer`` copies what it keeps, so it may be given a view of a reused buffer."""
    return isinstance(writer, _WriteThrough)


#: Transport classes already checked for the attributes the fast path reads.
_checked: dict[type, bool] = {}


def has_fast_path(transport: Any) -> bool:
    """True for Twisted's TCP and UNIX transports with the attributes the fast paths read.

    Not for TLS wrappers or in-memory transports; also what splicing needs.
    """
    # Imported here: tunnelkit.relay.splice (which the command line reads before the
    # reactor may load) imports this module, and tcp imports the TLS stack.
    from twisted.internet import tcp

    if not isinstance(transport, tcp.Connection):
        return False
    kind = type(transport)
    usable = _checked.get(kind)
    if usable is None:
        usable = _checked[kind] = all(hasattr(transport, name) for name in _FAST_PATH_ATTRIBUTES)
    return usable


def writer_for(transport: Any, enabled: bool = True) -> Callable[[bytes], None]:
    """The function the relay calls to send to ``transport``."""
    if enabled and has_fast_path(transport):
        return _WriteThrough(transport)
    write: Callable[[bytes], None] = transport.write
    return write
