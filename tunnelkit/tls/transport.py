"""The TLS layer of a relay leg: Twisted's memory-BIO TLS, with half-close and larger batches.

Twisted's ``TLSMemoryBIOProtocol`` is kept for what it does well (the
handshake, the producer membrane, buffering across renegotiation) and three
things change for a relay:

* **Half-close** (twisted#5341). Twisted answers the peer's close_notify by
  closing the whole connection, so a reply the other side sends after the
  client finished writing is lost. Here the peer's close_notify, or a TCP FIN
  without one, reaches the wrapped protocol as ``readConnectionLost``, and
  writing goes on; ``loseWriteConnection`` sends our close_notify and a TCP
  FIN. ``loseConnection`` sends close_notify and closes without waiting for
  the peer's (TLS allows it; HAProxy and nginx do the same), and an abort
  sends no close_notify at all, so a reset stays a reset.
* **Batches.** One ``SSL_write`` per chunk written (OpenSSL cuts the
  records) and one socket write of everything it produced, instead of a
  16 KiB slice and a transport write each; decrypted records read in one
  event are handed on as one chunk. For a 256 KiB read that is one write
  downstream instead of sixteen, through the relay's write-through sender.
* **Connect after the handshake** (client side, optional): the wrapped
  protocol is connected only once the handshake and the certificate check
  have succeeded, so a backend whose certificate is refused is a failed
  connection attempt (the backend group tries the next backend) rather than a
  connected leg that resets.

It reads ``TLSMemoryBIOProtocol``'s private state (``_tlsConnection``,
``_handshakeDone``, ``_aborted``, ``_lostTLSConnection``, ``_appSendBuffer``);
tests/tls/test_tls_relay.py and tests/tls/test_tls_server.py pin the behaviour down
against real OpenSSL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from tunnelkit.relay.write_through import takes_views, writer_for
from tunnelkit.tls import direct as tls_direct
from tunnelkit.tls.server import openssl_reason

#: Decrypted bytes asked for per ``SSL_read``: one TLS record is at most 16 KiB.
_RECORD = 1 << 15

#: Room for TLS record overhead when reading encrypted output (per 16 KiB record:
#: 5 header + up to 16 tag + 1 type bytes, far less than this share).
_OVERHEAD_SHIFT = 6


class TLSError(Error):
    """An OpenSSL error that reads as its reasons ("tlsv1 alert unknown ca").

    The relay logs a lost leg's error as text, and ``OpenSSL.SSL.Error``'s
    text is its error queue: ``[('SSL routines', '', 'tlsv1 alert unknown ca')]``.
    """

    def __str__(self) -> str:
        return openssl_reason(self)


@implementer(IHalfCloseableProtocol)
class RelayTLSProtocol(TLSMemoryBIOProtocol):
    """TLS for one relay leg; see the module docstring for what differs from Twisted's."""

    factory: RelayTLSFactory
    # The TCP transport below (it has the half-close and abort methods
    # ITransport does not declare), OpenSSL's connection, and a relay leg.
    transport: Any
    _tlsConnection: Any
    wrappedProtocol: Any

    #: Bytes asked of the outgoing memory BIO per read: grows with the writes.
    _bio_read_size = 1 << 16

    #: Reads what a client sends in clear before its TLS (a PROXY header, set
    #: on the instance from :attr:`RelayTLSFactory.before_tls`): ``None``
    #: while it reads, then the bytes after it, which are TLS's.
    _before_tls: Callable[[bytes], bytes | None] | None = None

    #: Move bulk data with :mod:`tunnelkit.tls.direct` when pyOpenSSL allows it
    #: (tests turn it off to run the same suite on the portable path).
    direct_openssl = tls_direct.AVAILABLE

    def __init__(self, factory: RelayTLSFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol, not factory.connect_after_handshake)  # type: ignore[no-untyped-call]
        self._send: Any = None
        self._input_ended = False
        self._close_notify_sent = False
        self._close_write_when_flushed = False
        self._wrapped_connected = False
        self._direct = False
        #: Fires with the wrapped protocol once it is connected after the handshake
        #: (only with ``connect_after_handshake``); fails if the connection is lost first.
        self.handshake: Deferred[IProtocol] | None = (
            Deferred(self._cancel_handshake) if factory.connect_after_handshake else None
        )
        if factory.before_tls is not None:
            self._before_tls = factory.before_tls(wrappedProtocol)

    def dataReceived(self, data: bytes) -> None:
        before = self._before_tls
        if before is not None:
            rest = before(data)
            if rest is None:
                return
            del self._before_tls
            if not rest:
                return
            data = rest
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    # -- set-up ------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        """``TLSMemoryBIOProtocol.makeConnection``, minus its interface loop.

        Twisted's version calls ``directlyProvides`` once per interface of the
        transport (nine for TCP), each replacing the last, and
        ``ProtocolWrapper.makeConnection`` then declares them all at once:
        about 8 % of tunnelkit's Python work per TLS handshake went into
        zope.interface. This declares them all once, then does the rest as
        Twisted does.
        """
        transport.bufferSize = self.factory.read_size
        self._send = writer_for(transport, self.factory.write_through)
        self._send_takes_views = takes_views(self._send)
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._direct = self.direct_openssl and tls_direct.usable(self._tlsConnection)
        self._checkHandshakeStatus()

    def _checkHandshakeStatus(self) -> None:
        if self._aborted:
            return
        try:
            self._tlsConnection.do_handshake()
        except WantReadError:
            self._flushSendBIO()
            return
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        self._handshakeDone = True
        if self._aborted:
            # A verification callback refused the peer during the handshake.
            return
        wrapped = self.wrappedProtocol
        if self.handshake is not None:
            handshake, self.handshake = self.handshake, None
            self._wrapped_connected = True
            wrapped.makeConnection(self)
            handshake.callback(wrapped)
        elif IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        # Only a plain Error carries the error queue (a SysCallError is errno, text).
        if reason is not None and type(reason.value) is Error:
            reason = Failure(TLSError(*reason.value.args))
        super()._tlsShutdownFinished(reason)  # type: ignore[no-untyped-call]

    def _cancel_handshake(self, _: Deferred[IProtocol]) -> None:
        # The Deferred is failed by cancel() itself; the wrapped protocol,
        # never connected, must not hear of the loss either.
        self.handshake = None
        self.abortConnection()

    # -- moving bytes --------------------------------------------------------

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        if self._direct:
            output = tls_direct.read_output(connection, self._bio_read_size)
            if output:
                self._send(output if self._send_takes_views else bytes(output))
            return
        chunks = []
        while True:
            try:
                chunks.append(connection.bio_read(self._bio_read_size))
            except WantReadError:
                break
        if chunks:
            self._send(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        size = len(data)
        view = memoryview(data)
        # The direct path takes what OpenSSL accepts at once; anything it
        # stopped at (mid-handshake, an error) the loop below meets again.
        done = tls_direct.write_records(connection, data) if self._direct else 0
        while done < size:
            try:
                done += connection.send(view[done:] if done else data)
            except WantReadError:
                self._bufferedWrite(data[done:])  # type: ignore[no-untyped-call]
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._bio_read_size = max(1 << 16, size + (size >> _OVERHEAD_SHIFT))
        self._flushSendBIO()

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        if (
            self._direct
            and not self._lostTLSConnection
            and not self._input_ended
            and tls_direct.read_records(
                connection, self.factory.read_size, self._deliver_one, self._views_welcome()
            )
        ):
            self._flushSendBIO()
            return
        chunks: list[bytes] = []
        ended = False
        while not self._lostTLSConnection and not self._input_ended:
            try:
                chunks.append(connection.recv(_RECORD))
            except WantReadError:
                break
            except ZeroReturnError:
                ended = True
                break
            except Error:
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(Failure())
        self._deliver(chunks)
        if ended:
            self._end_input()
        if self._tlsConnection is not None:
            self._flushSendBIO()

    def _views_welcome(self) -> bool:
        takes = getattr(self.wrappedProtocol, "takes_views", None)
        return bool(takes is not None and takes())

    def _deliver_one(self, data: bytes) -> None:
        if not self._aborted:
            self.wrappedProtocol.dataReceived(data)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _end_input(self) -> None:
        if self._input_ended or self._aborted:
            return
        self._input_ended = True
        if self._connectWrapped or self._wrapped_connected:
            self.wrappedProtocol.readConnectionLost()

    # -- half-close, from below (TCP) and from above (the relay) ----------------

    def readConnectionLost(self) -> None:
        """The peer's TCP FIN: its input ends here, close_notify or not.

        The records already complete are delivered; OpenSSL is not told of
        the EOF (``bio_shutdown``), which would make it fail the connection
        as truncated and refuse to send the reply this half-close is for.
        """
        if self._input_ended or self._lostTLSConnection:
            return
        if not self._handshakeDone:
            self.transport.loseConnection()
            return
        self._flushReceiveBIO()
        self._end_input()

    def writeConnectionLost(self) -> None:
        """Our TCP FIN is sent; nothing to do."""

    def loseWriteConnection(self) -> None:
        """Send close_notify and a TCP FIN; keep reading the peer."""
        if self._close_notify_sent or self.disconnecting:
            return
        if self._appSendBuffer:
            self._close_write_when_flushed = True
            return
        self._send_close_notify()
        self.transport.loseWriteConnection()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()  # type: ignore[no-untyped-call]
        if self._close_write_when_flushed and not self._appSendBuffer:
            self._close_write_when_flushed = False
            self.loseWriteConnection()

    def _send_close_notify(self) -> None:
        self._close_notify_sent = True
        # Mid-handshake OpenSSL refuses to shut down: nothing to say then.
        with contextlib.suppress(Error):
            self._tlsConnection.shutdown()
        self._flushSendBIO()

    def _shutdownTLS(self) -> None:
        # Twisted calls this once the connection is to close (disconnecting is
        # set) and waits for the peer's close_notify; we send ours and close.
        if not self._close_notify_sent:
            self._send_close_notify()
        if self.disconnecting:
            self.transport.loseConnection()

    def loseConnection(self) -> None:
        """Close cleanly now: the relay writes nothing more, so no producer is waited for."""
        if self._producer is not None:
            self.unregisterProducer()  # type: ignore[no-untyped-call]
        super().loseConnection()  # type: ignore[no-untyped-call]

    def abortConnection(self) -> None:
        """Reset the connection: no close_notify, which would make it look clean."""
        self._aborted = True
        self._close_notify_sent = True
        self.disconnecting = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._connectWrapped or self._wrapped_connected:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
            return
        # The wrapped protocol was never connected: the attempt failed (or
        # was cancelled, which failed the Deferred already).
        failure = self._reason or reason
        self._lostTLSConnection = True
        self.connected = False
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
        self._tlsConnection = None
        handshake, self.handshake = self.handshake, None
        if handshake is not None:
            handshake.errback(failure)


class RelayTLSFactory(TLSMemoryBIOFactory):
    """Wraps a leg factory in :class:`RelayTLSProtocol`.

    ``read_size`` and ``write_through`` apply to the TCP connection under
    TLS, as the relay applies them to plain legs. With
    ``connect_after_handshake`` each protocol's :attr:`RelayTLSProtocol.handshake`
    tells when (and whether) its wrapped protocol got connected. With
    ``before_tls``, each client's first bytes are read by what it makes for
    the wrapped protocol (``--accept-proxy-protocol``'s header) before TLS.
    """

    protocol = RelayTLSProtocol

    def __init__(
        self,
        creator: Any,
        is_client: bool,
        wrapped: Any,
        *,
        read_size: int,
        write_through: bool = True,
        connect_after_handshake: bool = False,
        before_tls: Callable[[Any], Callable[[bytes], bytes | None]] | None = None,
    ) -> None:
        super().__init__(creator, is_client, wrapped)
        #: Given a connection's wrapped protocol, what reads the bytes before its TLS, if any.
        self.before_tls = before_tls
        self.creator = creator
        self.read_size = read_size
        self.write_through = write_through
        self.connect_after_handshake = connect_after_handshake
