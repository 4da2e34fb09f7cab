"""How many relayed bytes a leg's peer has not taken yet, wherever they wait.

A closing tunnel needs the answer twice (the native engine asks the same
questions in C, ``owed_to`` in ``tunnelkit/engine/_engine.c``):

* **Is the reader still reading?** The close grace resets a leg whose peer
  took nothing for a whole grace period, but not one that drains slowly: only
  a shrinking count tells them apart.
* **What did a reset drop?** An abort (``SO_LINGER`` 0) discards Twisted's
  buffer, a TLS layer's and the kernel's send queue; the access log must not
  count those bytes as handed over.

Bytes wait in four places: a TLS layer's plaintext buffer (Twisted's
``_appSendBuffer``, used during renegotiation), the TCP transport's write
buffer, a splice pipe (:mod:`tunnelkit.relay.splice`), and the socket's send queue
(``SIOCOUTQNSD``: bytes not sent yet, which a reset drops; those already
sent reach the peer before the RST, acknowledged or not; a UNIX peer reads
what was queued even after a close, so only TCP counts). A TLS socket queues
records, not bytes, and a record cut short cannot be decrypted: the count
left out then includes one record more, so it never exceeds what the peer
could read.
"""

from __future__ import annotations

import fcntl
import struct
from typing import Any

#: Largest TLS record's plaintext: what one record cut short may take with it.
TLS_RECORD = 16384

#: ``ioctl`` request for the bytes of a TCP socket's send queue not sent yet
#: (``linux/sockios.h``; Python's ``termios`` has only ``TIOCOUTQ``, sent or not).
SIOCOUTQNSD = 0x894B


def unsent(transport: Any, piped: int = 0) -> int:
    """Bytes written to ``transport`` that its peer has not taken; ``piped`` more wait in a splice pipe.

    For a TLS transport the count is in plaintext bytes, rounded up by one
    record when any ciphertext waits (see the module docstring).
    """
    tls_buffer = getattr(transport, "_appSendBuffer", None)
    if tls_buffer is None:
        return piped + _buffered(transport) + _socket_queue(transport)
    below = transport.transport
    ciphertext = _buffered(below) + _socket_queue(below) + piped
    plaintext = sum(len(chunk) for chunk in tls_buffer)
    return plaintext + ciphertext + (TLS_RECORD if ciphertext else 0)


def _buffered(transport: Any) -> int:
    """Bytes in Twisted's write buffer of a TCP/UNIX transport (0 for other kinds)."""
    data = getattr(transport, "dataBuffer", None)
    if data is None:
        return 0
    waiting: int = len(data) - transport.offset + transport._tempDataLen
    return waiting


def _socket_queue(transport: Any) -> int:
    """Bytes the TCP socket has not sent yet (``SIOCOUTQNSD``); 0 once closed, or for UNIX sockets."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return 0
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0
    return max(queued, 0)
