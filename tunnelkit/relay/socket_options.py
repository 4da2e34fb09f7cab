"""The TCP socket options of both legs, as the command line gives them.

Kept apart from :mod:`tunnelkit.relay.tcp_tuning` (which tunes Twisted's transports)
so that parsing the command line imports nothing of the reactor.
"""

from __future__ import annotations

import socket

import attrs

#: Bytes read per readiness event on each leg. It is also Twisted's
#: per-transport write-buffer high-water mark, so a tunnel holds at most about
#: twice this per direction in user space. 256 KiB measured best on loopback
#: (see docs/performance.md): 64 KiB costs a third more CPU per megabyte.
DEFAULT_READ_SIZE = 256 * 1024

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@attrs.frozen
class SocketOptions:
    """What ``--nodelay``, ``--keepalive``, ``--sndbuf``, ``--rcvbuf``, ``--mss``
    and ``--read-size`` ask for; ``None`` leaves the kernel's default."""

    nodelay: bool = True
    keepalive: int | None = None
    sndbuf: int | None = None
    rcvbuf: int | None = None
    mss: int | None = None
    read_size: int = DEFAULT_READ_SIZE

    def apply(self, sock: socket.socket) -> None:
        """Set the options on a TCP socket; other families are left alone.

        Raises ``OSError`` when the kernel refuses a value (an MSS out of
        range, say), so a bad option fails at start-up, not per connection.
        """
        if sock.family not in _TCP_FAMILIES:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        if self.keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.keepalive)
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)
