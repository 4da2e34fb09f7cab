"""What the native engine needs to terminate TLS, from pyOpenSSL.

A TLS handshake through Twisted's path costs about 1,000 µs of proxy CPU,
twice HAProxy's 475 µs; OpenSSL's own work is about 300 µs of it, the rest
is the interpreter (the memory-BIO wrapper, the relay, the tunnel's set-up).
So the engine drives the handshake and the relay itself, on the socket, but
every decision stays where it is: each client's connection is made here by
pyOpenSSL from :class:`~tunnelkit.tls.server.ServerTLS`'s current contexts
(certificates, SNI choice, ALPN, client certificates, versions, ciphers,
reloads on SIGHUP), and the access log reads the negotiated details from
that same object when the tunnel ends.

The engine calls OpenSSL through the addresses of the functions pyOpenSSL
itself binds (cryptography's OpenSSL, which made the SSL object): no OpenSSL
headers at build time, and no second libssl in the process. Like
:mod:`tunnelkit.tls.direct` this reads pyOpenSSL's non-public ``_ssl`` and
``OpenSSL._util`` bindings; when any is missing, :func:`unavailable` says so
and Twisted's path terminates TLS as before.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL

from tunnelkit.tls.server import ServerTLS

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without these bindings
    _ffi = _lib = None

#: The functions the engine calls, in the order it takes their addresses.
FUNCTIONS = (
    "SSL_do_handshake",
    "SSL_read",
    "SSL_write",
    "SSL_shutdown",
    "SSL_get_error",
    "ERR_clear_error",
    "ERR_get_error",
    "ERR_reason_error_string",
)


def unavailable() -> str | None:
    """Why this pyOpenSSL cannot lend the engine its OpenSSL, or ``None`` if it can."""
    if _lib is None:
        return "this pyOpenSSL has no OpenSSL._util bindings"
    missing = [name for name in (*FUNCTIONS, "SSL_set_options") if not hasattr(_lib, name)]
    if missing or not hasattr(_lib, "SSL_OP_IGNORE_UNEXPECTED_EOF"):
        return (
            f"this pyOpenSSL does not bind {', '.join(missing) or 'SSL_OP_IGNORE_UNEXPECTED_EOF'}"
        )
    return None


class EngineTLS:
    """The engine's ``tls`` argument: OpenSSL's functions and a connection per client."""

    def __init__(self, tls: ServerTLS) -> None:
        self.server = tls
        self.functions = tuple(
            int(_ffi.cast("uintptr_t", _ffi.cast("void *", getattr(_lib, name))))
            for name in FUNCTIONS
        )

    def argument(self) -> tuple[tuple[int, ...], Any, float]:
        """``Engine(tls=...)``."""
        return self.functions, self.connection, self.server.settings.handshake_timeout

    def connection(self, fd: int) -> tuple[int, SSL.Connection]:
        """A new client's server-side connection on socket ``fd``, and its SSL address.

        A bare FIN from the client reads as its EOF, as on Twisted's path
        (which sees the FIN before OpenSSL does), not as an error.
        """
        # pyOpenSSL takes a descriptor as well as a socket object (SSL_set_fd).
        connection = SSL.Connection(self.server.certificates.default, fd)  # type: ignore[arg-type]
        connection.set_accept_state()
        ssl = connection._ssl
        _lib.SSL_set_options(ssl, _lib.SSL_OP_IGNORE_UNEXPECTED_EOF)
        return int(_ffi.cast("uintptr_t", ssl)), connection
