"""``--via`` URLs: which upstream proxy a listener's backends are reached through.

``http://[user:pass@]host:port`` (an HTTP CONNECT proxy), ``https://...`` (the
same, spoken over TLS to the proxy) and ``socks5://[user:pass@]host:port`` (a
SOCKS5 proxy; ``socks5h://`` is the same: backend names are always sent to
the proxy for it to resolve, as curl's ``socks5h`` does). Credentials are
percent-decoded, and never shown: :attr:`Via.shown` masks the password, and so
does the object's ``repr``. Pure: nothing here touches the network.
"""

from __future__ import annotations

from urllib.parse import SplitResult, unquote, urlsplit

import attrs

#: The schemes a ``--via`` URL may have, and the kind of proxy each names.
SCHEMES = {"http": "http", "https": "http", "socks5": "socks5", "socks5h": "socks5"}

#: RFC 1929 carries the user name and the password in at most 255 bytes each.
SOCKS5_FIELD = 255

FORMS = "http://[USER:PASS@]HOST:PORT, https://... or socks5://[USER:PASS@]HOST:PORT"


class ViaURLError(ValueError):
    """A ``--via`` value that cannot be used; the message never holds its password."""


@attrs.frozen
class Via:
    """An upstream proxy: its kind, where it listens, and the credentials it wants."""

    #: ``http`` (CONNECT) or ``socks5``.
    kind: str
    #: TLS to the proxy itself (``https://``).
    tls: bool
    host: str
    port: int
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """The URL for messages and logs: the password masked, the user kept."""
        scheme = ("https" if self.tls else "http") if self.kind == "http" else "socks5"
        user = "" if self.user is None else f"{self.user}:***@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"


def parse_via(text: str) -> Via:
    """The proxy ``text`` names; :class:`ViaURLError` says what is wrong, without the password."""
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme not in SCHEMES:
        raise ViaURLError(f"give {FORMS}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ViaURLError(f"{_masked(text)}: {e}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ViaURLError(f"{_masked(text)}: a proxy URL has no path, query or fragment")
    if not parts.hostname:
        raise ViaURLError(f"{_masked(text)}: the proxy's host is missing")
    if port is None or port == 0:
        raise ViaURLError(f"{_masked(text)}: give the proxy's port (e.g. {scheme}://proxy:3128)")
    user, password = _credentials(parts, text)
    kind = SCHEMES[scheme]
    if kind == "socks5" and user is not None:
        for what, value in (("user name", user), ("password", password or "")):
            if len(value.encode("utf-8")) > SOCKS5_FIELD:
                raise ViaURLError(
                    f"{_masked(text)}: a SOCKS5 {what} is at most {SOCKS5_FIELD} bytes (RFC 1929)"
                )
    return Via(kind, scheme == "https", parts.hostname, port, user, password)


def _credentials(parts: SplitResult, text: str) -> tuple[str | None, str | None]:
    if parts.username is None:
        return None, None
    user = unquote(parts.username)
    if not user:
        raise ViaURLError(f"{_masked(text)}: a password needs a user name")
    return user, unquote(parts.password or "")


def _masked(text: str) -> str:
    """``text`` with whatever stands between ``user:`` and ``@`` hidden."""
    scheme, _, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return text
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"
