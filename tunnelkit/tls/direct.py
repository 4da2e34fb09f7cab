"""Bulk TLS work straight through OpenSSL's C API, without pyOpenSSL's per-call wrappers.

A relayed 256 KiB chunk is sixteen TLS records. Through pyOpenSSL each
record costs a Python-level ``recv``/``send`` with its own error checks, a
fresh 32 KiB buffer per ``recv`` and a join afterwards, and each flush of the
outgoing memory BIO allocates a buffer as large as the chunk (big enough for
glibc to hand it back to the kernel every time, so its pages fault in again).
Here the same OpenSSL calls (``SSL_read``, ``SSL_write``, ``BIO_read``) are
made through pyOpenSSL's own cffi bindings, into one scratch buffer that the
whole process shares (the reactor runs one protocol at a time and every
result is copied out before returning).

Only the fast, common case is done here: when OpenSSL reports anything but
"want more input" (close_notify, an alert, a renegotiation request), the
caller runs its ordinary pyOpenSSL path, which meets the same condition and
handles and reports it exactly as before.

It reads three attributes of ``OpenSSL.SSL.Connection`` that are not public
(``_ssl``, ``_from_ssl``, and ``OpenSSL._util``'s ``ffi``/``lib``); when they
are missing :data:`AVAILABLE` is false and the caller never comes here. The
TLS test suites run with it on and off.
"""

from __future__ import annotations

from typing import Any

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without these bindings
    _ffi = _lib = None

#: True when this pyOpenSSL exposes what the fast path needs.
AVAILABLE = _lib is not None and all(
    hasattr(_lib, name) for name in ("SSL_read", "SSL_write", "BIO_read", "SSL_get_error")
)

#: Room left in the scratch buffer before reading another record (16 KiB + slack).
_RECORD_ROOM = 1 << 15

_scratch: Any = None
_scratch_size = 0


def _buffer(size: int) -> Any:
    global _scratch, _scratch_size
    if size > _scratch_size:
        _scratch = _ffi.new("char[]", size)
        _scratch_size = size
    return _scratch


def usable(connection: Any) -> bool:
    """True if ``connection`` is a memory-BIO pyOpenSSL connection this module can drive."""
    return AVAILABLE and getattr(connection, "_from_ssl", None) is not None


def read_records(connection: Any, size: int, deliver: Any, views: bool = False) -> bool:
    """Decrypt what the connection holds, handing it to ``deliver`` in chunks of up to ``size``.

    With ``views``, each chunk is a view of the scratch buffer, valid only
    during the call (for a receiver that sends it on at once or copies it);
    otherwise bytes. Returns True if OpenSSL simply wants more input; False if
    it stopped for another reason, which the caller's pyOpenSSL path must
    then meet.
    """
    take = _view if views else _copy
    ssl = connection._ssl
    capacity = size + _RECORD_ROOM
    buffer = _buffer(capacity)
    total = 0
    while True:
        count = _lib.SSL_read(ssl, buffer + total, capacity - total)
        if count > 0:
            total += count
            if capacity - total < _RECORD_ROOM:
                deliver(take(buffer, total))
                # ``deliver`` may have run other TLS work through the buffer.
                buffer = _buffer(capacity)
                total = 0
            continue
        if total:
            deliver(take(buffer, total))
        return bool(_lib.SSL_get_error(ssl, count) == _lib.SSL_ERROR_WANT_READ)


def _view(buffer: Any, size: int) -> memoryview:
    return memoryview(_ffi.buffer(buffer, size))


def _copy(buffer: Any, size: int) -> bytes:
    data: bytes = _ffi.buffer(buffer, size)[:]
    return data


def write_records(connection: Any, data: bytes) -> int:
    """Encrypt as much of ``data`` as OpenSSL takes now; how many bytes it took."""
    ssl = connection._ssl
    pointer = _ffi.from_buffer(data)
    size = len(data)
    done = 0
    while done < size:
        count = _lib.SSL_write(ssl, pointer + done, size - done)
        if count <= 0:
            break
        done += count
    return done


def read_output(connection: Any, hint: int) -> bytes | memoryview:
    """Everything waiting in the outgoing memory BIO (``hint``: its likely size).

    Usually a view of the scratch buffer, valid until the next call into this
    module: the caller sends it at once, copying only what it must keep.
    """
    bio = connection._from_ssl
    capacity = max(hint, 1 << 16)
    buffer = _buffer(capacity)
    total = 0
    while total < capacity:
        count = _lib.BIO_read(bio, buffer + total, capacity - total)
        if count <= 0:
            return memoryview(_ffi.buffer(buffer, total))
        total += count
    # Full, and more may wait (the hint was short): copies from here on.
    chunks = [_ffi.buffer(buffer, total)[:]]
    while (count := _lib.BIO_read(bio, buffer, capacity)) > 0:
        chunks.append(_ffi.buffer(buffer, count)[:])
    return b"".join(chunks)
