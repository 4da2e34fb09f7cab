"""Keep the TLS stack out of a process whose options use no TLS.

``twisted.internet.tcp`` (and so the reactor) and ``twisted.internet.endpoints``
import pyOpenSSL whenever it is installed, and with it cryptography's OpenSSL
bindings: about 12 MB of a plain TCP forwarder's 44 MB, in every process and
every ``--workers`` worker. Twisted treats pyOpenSSL as optional (each import
is guarded), so a process that decides, before the reactor is imported, that
it will not use TLS can make the import fail and run without it. The
decision is made from the command line: TLS options, ``ssl:``/``tls:``
endpoints, and any endpoint type other than the plain built-ins (a plugin's
endpoint may need TLS) keep the stack available.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

#: Endpoint types that never involve TLS.
PLAIN_TYPES = frozenset({"tcp", "tcp6", "unix", "systemd"})
#: Endpoint types that are TLS (a host named ``ssl`` would need the ``tcp:`` form).
TLS_TYPES = frozenset({"ssl", "tls"})


def _endpoint_type(text: str) -> str | None:
    """``tcp`` for ``tcp:80``, ``ssl`` for ``ssl:443``; None for short forms (``80``, ``host:80``, ``[::1]:80``)."""
    head, sep, rest = text.partition(":")
    kind = head.lower()
    if kind in PLAIN_TYPES or kind in TLS_TYPES:
        return kind
    if not sep or head.isdigit() or text.startswith("[") or rest.isdigit():
        return None
    return kind


def needed(listen: Iterable[str], to: Iterable[str], tls_options: bool) -> bool:
    """Whether a process with these ``--listen``/``--to`` values and TLS options may use TLS."""
    if tls_options:
        return True
    for text in (*listen, *to):
        kind = _endpoint_type(text)
        if kind is not None and kind not in PLAIN_TYPES:
            return True
    return False


def needed_by(listeners: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any listener may use TLS, from its raw values: the flags, or a file's table.

    Raw, because the answer must come before anything imports Twisted's
    endpoints (and with them, where it can, pyOpenSSL).
    """
    return any(
        needed(
            _strings(values.get("listen")),
            _strings(values.get("to")),
            bool(values.get("tls-cert") or values.get("backend-tls")),
        )
        for values in listeners
    )


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def keep_out() -> bool:
    """Make pyOpenSSL unimportable in this process, unless it or the reactor is loaded already.

    Returns whether it did. A process that has the reactor already (a test
    run, an embedding application) is left as it is.
    """
    if "OpenSSL" in sys.modules or "twisted.internet.tcp" in sys.modules:
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    return True
