"""Relay a plain stream tunnel inside the kernel with ``splice(2)``.

On the Python path every chunk is copied from the kernel into a bytes object
and back. Once a tunnel is plain on both legs (TCP or UNIX sockets, no TLS,
no request left to read), Linux can move the bytes socket -> pipe -> socket
without them ever reaching user space, as HAProxy does. The reactor still
drives everything: the two transports keep their places in the event loop
and only their ``doRead``/``doWrite`` change (their class is swapped for a
subclass that asks the tunnel's :class:`Splicer` first), so readiness,
half-close, resets, timeouts and producer registration are Twisted's as
before. The splicer keeps the relay's promises:

* **Order.** A direction splices only while nothing is queued in Twisted's
  write buffer of its destination; otherwise it reads the ordinary way
  (``_FALLBACK``) and its bytes queue behind the earlier ones.
* **Backpressure.** Bytes the destination did not take stay in the pipe: the
  source stops reading and the destination waits for writability; at most a
  pipe's capacity (:data:`PIPE_SIZE`) is in flight per direction.
* **EOF and resets.** A splice of 0 bytes (or none possible) hands the
  read to Twisted's ``doRead``, whose ``recv`` tells EOF (a half-close) from
  TCP urgent data, where splice stops; errors are ``CONNECTION_LOST``. EOF
  is only ever seen with an empty pipe, so the FIN follows the last byte.
* **Counts and idle time** are kept per spliced chunk as per read; idle time
  also per chunk drained from a pipe.

Pipes come from a :class:`PipePool` shared by the process: a direction holds
one only while its destination is slow, so idle tunnels hold no file
descriptors and a busy process needs only a few pipes. A pipe's two
descriptors are a tunnel's worth, and the descriptor budget that sizes
``--max-connections`` counts pipes (pooled or holding bytes) as tunnels: a
new tunnel that finds the budget spent takes them back
(:meth:`PipePool.make_room`), so splicing never costs a client within the
cap its descriptors.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.main import CONNECTION_LOST

from tunnelkit.relay.write_through import has_fast_path, must_queue

if TYPE_CHECKING:
    from twisted.internet import tcp

    from tunnelkit.relay.tunnel import Leg, Tunnel

#: Capacity asked of each pipe: the kernel's default ``pipe-max-size``. On loopback,
#: 1 MiB pipes moved more bytes per CPU-second than pipes of 256 KiB
#: (docs/performance.md); the kernel fills pipe pages only with bytes in flight.
PIPE_SIZE = 1 << 20

#: A read this long (or the whole ``--read-size``, if smaller) marks a tunnel as
#: bulk for ``--splice auto``. Reads fill at most what the socket holds, so a
#: larger ``--read-size`` alone would never be reached.
BULK_READ = 256 * 1024

#: True where ``os.splice`` and ``F_SETPIPE_SZ`` exist (Linux, Python 3.10+).
AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

#: errno values meaning "splice cannot work on these descriptors": read the ordinary way.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})

#: Returned by :meth:`Splicer.read`/:meth:`Splicer.write`: let Twisted's own method do it.
_FALLBACK = object()

Pipe = tuple[int, int, int]
"""A pipe: read end, write end, capacity in bytes."""


class PipePool:
    """Empty pipes for every tunnel of the process, made on demand and reused.

    ``size`` is asked of each new pipe with ``F_SETPIPE_SZ``; the kernel may
    refuse (``/proc/sys/fs/pipe-max-size``, the per-user pipe page limits),
    and the pipe is then used at the size it has. ``keep`` bounds how many
    idle pipes stay open. With ``slots`` (the tunnels the descriptor limit
    has room for) and ``live`` (how many tunnels are live), live tunnels and
    open pipes together stay within ``slots``; ``peers`` are the pools that
    share that budget, this one among them (one per listener of a process),
    and room is made in all of them. The pool also carries the ``--splice`` policy:
    ``eager`` splices every plain tunnel from its join; otherwise a tunnel is
    spliced once one of its reads fills ``bulk_read``, so request/response
    traffic of small messages keeps the Python path (cheaper per message) and
    bulk transfers move in the kernel, like HAProxy's ``option splice-auto``.
    """

    def __init__(
        self,
        size: int = PIPE_SIZE,
        *,
        eager: bool = False,
        read_size: int = BULK_READ,
        keep: int = 16,
        slots: int = 0,
        live: Callable[[], int] | None = None,
        peers: list[PipePool] | None = None,
    ) -> None:
        self.size = size
        #: Splice every plain tunnel from its join (``--splice on``), not only bulk ones.
        self.eager = eager
        #: A read at least this long marks a tunnel as bulk: the read size, at
        #: most :data:`BULK_READ` (a larger read size may never be filled).
        self.bulk_read = min(read_size, BULK_READ)
        self.keep = keep
        self.slots = slots
        self.live = live
        #: The pools sharing the descriptor budget, this one included.
        self.peers = peers if peers is not None else [self]
        if self not in self.peers:
            self.peers.append(self)
        self._free: list[Pipe] = []
        self.made = 0
        #: Pipes made and not closed: pooled or holding bytes.
        self.open = 0
        #: What empties each pipe holding bytes (by its read end), for :meth:`make_room`.
        self._lent: dict[int, Callable[[], None]] = {}

    def _over_budget(self, more: int = 0) -> bool:
        if not (self.slots and self.live):
            return False
        return self.live() + sum(pool.open for pool in self.peers) + more > self.slots

    def take(self) -> Pipe | None:
        """An empty pipe, or ``None`` if none can be made now (out of descriptors)."""
        if self._free:
            return self._free.pop()
        if self._over_budget(1):
            return None
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        self.open += 1
        try:
            capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:
            capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        self.made += 1
        return read_end, write_end, capacity

    def give(self, pipe: Pipe) -> None:
        """Return an *empty* pipe."""
        self._lent.pop(pipe[0], None)
        if len(self._free) < self.keep and not self._over_budget():
            self._free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may hold bytes no one will read."""
        self._lent.pop(pipe[0], None)
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1

    def lend(self, pipe: Pipe, spill: Callable[[], None]) -> None:
        """``pipe`` holds bytes for a while; ``spill`` moves them out and gives it back, if its descriptors are needed."""
        self._lent[pipe[0]] = spill

    def make_room(self) -> None:
        """A tunnel was admitted: give back the descriptors pipes borrowed from its budget.

        Pooled pipes are closed first, then pipes holding bytes are emptied
        into their destinations' queues.
        """
        for pool in self.peers:
            while pool._free and self._over_budget():
                pool.discard(pool._free.pop())
        for pool in self.peers:
            while pool._lent and self._over_budget():
                spill = next(iter(pool._lent.values()))
                spill()

    def close(self) -> None:
        """Close the idle pipes (on shutdown; pipes in use belong to their tunnels)."""
        free, self._free = self._free, []
        for pipe in free:
            self.discard(pipe)


class _Direction:
    """One way through the tunnel: what is read from ``source`` goes to ``dest``."""

    __slots__ = ("dest", "dest_fd", "leg", "pending", "pipe", "source", "source_fd")

    def __init__(self, leg: Leg, source: Any, dest: Any) -> None:
        self.leg = leg
        self.source = source
        self.dest = dest
        self.source_fd: int = source.fileno()
        self.dest_fd: int = dest.fileno()
        #: The pipe holding bytes ``dest`` has not taken yet, if any.
        self.pipe: Pipe | None = None
        self.pending = 0


class Splicer:
    """The splice state of one joined tunnel (both directions)."""

    __slots__ = ("_down", "_pool", "_tunnel", "_up", "enabled")

    def __init__(self, pool: PipePool, tunnel: Tunnel, client: Leg, backend: Leg) -> None:
        self._pool = pool
        self._tunnel = tunnel
        self._up = _Direction(client, client.transport, backend.transport)
        self._down = _Direction(backend, backend.transport, client.transport)
        self.enabled = True

    def read(self, source: Any) -> object:
        """``doRead`` of a spliced transport: one splice in, as much out as the peer takes."""
        d = self._up if source is self._up.source else self._down
        if d.pipe is not None:
            # Resumed while the destination still has our bytes: wait for it.
            source.stopReading()
            return None
        pipe = self._pool.take() if self.enabled and not must_queue(d.dest) else None
        if pipe is None:
            return _FALLBACK
        try:
            moved = os.splice(d.source_fd, pipe[1], pipe[2], flags=_FLAGS)
        except OSError as e:
            self._pool.give(pipe)
            return self._read_failed(e)
        if not moved:
            # Not necessarily EOF: splice stops at TCP urgent data (0 when a
            # FIN follows it, else EAGAIN while the socket stays readable).
            # Twisted's recv steps over the urgent byte and has the last word.
            self._pool.give(pipe)
            return _FALLBACK
        d.leg.received += moved
        tunnel = self._tunnel
        tunnel.last_moved = tunnel.now()
        try:
            left = _drain(pipe, d.dest_fd, moved)
        except OSError:
            # Broken: the destination's doWrite meets the error again and reports it.
            left = moved
        if left:
            # The destination is slow (or broken): its doWrite takes over.
            d.pipe = pipe
            d.pending = left
            self._pool.lend(pipe, lambda: self._spill(d))
            source.stopReading()
            d.dest.startWriting()
        else:
            self._pool.give(pipe)
        return None

    def _read_failed(self, error: OSError) -> object:
        if isinstance(error, BlockingIOError):
            return _FALLBACK  # see read(): urgent data, or nothing to read
        if error.errno in _UNSUPPORTED:
            self.enabled = False
            return _FALLBACK
        return CONNECTION_LOST

    def write(self, dest: Any) -> object:
        """``doWrite`` of a spliced transport: drain our pipe into it, then Twisted's own."""
        d = self._up if dest is self._up.dest else self._down
        pipe = d.pipe
        if pipe is None:
            return _FALLBACK
        try:
            left = _drain(pipe, d.dest_fd, d.pending)
        except OSError:
            d.pipe = None
            d.pending = 0
            self._pool.discard(pipe)
            return CONNECTION_LOST
        if left < d.pending:
            tunnel = self._tunnel
            tunnel.last_moved = tunnel.now()
        d.pending = left
        if d.pending:
            return None
        d.pipe = None
        self._pool.give(pipe)
        if not d.leg.read_done:
            d.source.resumeProducing()
        # Twisted's doWrite stops watching for writability and carries out a
        # close or half-close asked for meanwhile.
        return _FALLBACK

    def _spill(self, d: _Direction) -> None:
        """Queue what ``d``'s pipe holds in Twisted's buffer of its destination, and close the pipe."""
        pipe = d.pipe
        assert pipe is not None
        d.pipe = None
        data = _read_exactly(pipe[0], d.pending)
        d.pending = 0
        self._pool.discard(pipe)
        d.dest.write(data)
        # A queue under the high-water mark does not pause (so will not resume) the source.
        if not d.leg.read_done and not d.dest.producerPaused:
            d.source.resumeProducing()

    def in_flight(self) -> int:
        """Bytes read from one side that the other has not taken yet (held in pipes)."""
        return self._up.pending + self._down.pending

    def held_for(self, dest: Any) -> int:
        """Bytes a pipe holds for the transport ``dest``."""
        return self._up.pending if dest is self._up.dest else self._down.pending

    def close(self) -> None:
        """The tunnel ended: bytes still in a pipe can no longer be delivered.

        Each transport lets go of the splicer too: they point at each other,
        a cycle only the garbage collector would free otherwise.
        """
        for d in (self._up, self._down):
            vars(d.source).pop("_tunnelkit_splicer", None)
            if d.pipe is not None:
                self._pool.discard(d.pipe)
                d.pipe = None
                d.pending = 0


def _read_exactly(fd: int, count: int) -> bytes:
    """The ``count`` bytes a pipe holds (they are there: no wait)."""
    chunks = []
    while count:
        chunk = os.read(fd, count)
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _drain(pipe: Pipe, dest_fd: int, count: int) -> int:
    """Splice up to ``count`` bytes from ``pipe`` to ``dest_fd``; return how many are left.

    Stops when the destination would block; raises ``OSError`` when it is broken.
    """
    try:
        while count:
            count -= os.splice(pipe[0], dest_fd, count, flags=_FLAGS)
    except (BlockingIOError, InterruptedError):
        pass
    return count


_spliced_classes: dict[type[tcp.Connection], type] = {}


def _spliced_class(kind: type[tcp.Connection]) -> type:
    """``kind`` with ``doRead``/``doWrite`` that ask the tunnel's splicer first."""
    spliced = _spliced_classes.get(kind)
    if spliced is not None:
        return spliced
    # Twisted's FileDescriptor methods are untyped.
    base_read: Callable[[Any], object] = kind.doRead
    base_write: Callable[[Any], object] = kind.doWrite

    def doRead(self: Any) -> object:
        why = self._tunnelkit_splicer.read(self)
        return base_read(self) if why is _FALLBACK else why

    def doWrite(self: Any) -> object:
        why = self._tunnelkit_splicer.write(self)
        return base_write(self) if why is _FALLBACK else why

    spliced = type(f"Spliced{kind.__name__}", (kind,), {"doRead": doRead, "doWrite": doWrite})
    _spliced_classes[kind] = spliced
    return spliced


def start_splicing(pool: PipePool, tunnel: Tunnel, client: Leg, backend: Leg) -> Splicer | None:
    """Splice ``tunnel`` from now on if both of its transports allow it."""
    transports = (client.transport, backend.transport)
    if not all(has_fast_path(t) for t in transports):
        return None
    splicer = Splicer(pool, tunnel, client, backend)
    for transport in transports:
        # On the transport, not reached through its protocol: a backend from
        # Twisted's unix: endpoint has a _WrappingProtocol in between.
        transport._tunnelkit_splicer = splicer
        transport.__class__ = _spliced_class(type(transport))
    return splicer
