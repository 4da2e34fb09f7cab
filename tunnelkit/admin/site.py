"""The admin endpoint's HTTP side: one resource answering every path, behind an optional token.

Each answer is made from a fresh snapshot (``Source.snapshot``), which a
supervisor gathers from its workers: so every path but ``/healthz``
answers asynchronously. Nothing is cached; a scrape costs what reading the
counters costs (docs/admin.md measures it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import Request

from tunnelkit.admin import metrics
from tunnelkit.admin.snapshot import Snapshot

log = Logger(namespace="tunnelkit.admin")

#: The status page: one self-contained file (inline CSS, script and SVG; no external asset).
STATUS_PAGE = resources.files("tunnelkit.admin").joinpath("status.html").read_bytes()

#: What the status page may load: only its own inline parts and /status.json.
STATUS_POLICY = (
    b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline';"
    b" connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)

TEXT = b"text/plain; charset=utf-8"

#: Seconds an idle admin connection is kept (longer than any scrape interval).
IDLE_TIMEOUT = 300


class Source(Protocol):
    """Where the admin endpoint's answers come from: one process, or a supervisor's workers."""

    def accepting(self) -> bool:
        """Started and not draining (``/healthz``)."""
        ...

    def snapshot(self) -> Deferred[Snapshot]:
        """The numbers now."""
        ...


class AdminResource(resource.Resource):
    """``/metrics``, ``/healthz``, ``/readyz``, ``/status`` and ``/status.json``.

    With a ``token``, every request must present it, as a bearer token
    (Prometheus' ``authorization``) or as the password of HTTP Basic
    authentication (a browser asks for it, and the status page's own
    requests then carry it); compared in constant time.
    """

    isLeaf = True

    def __init__(
        self,
        source: Source,
        token: bytes | None = None,
        history: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.source = source
        self.token = token
        #: Each listener's recent samples, for the status page (``History.to_json``).
        self.history = history

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if not self._authorized(request):
            return _refuse(request)
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/":
            request.redirect(b"/status")
            return b""
        if path == b"/healthz":
            accepting = self.source.accepting()
            return _text(request, 200 if accepting else 503, "ok" if accepting else "draining")
        if path == b"/status":
            request.setHeader(b"content-security-policy", STATUS_POLICY)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return STATUS_PAGE
        answer = ANSWERS.get(path)
        if answer is None:
            return _text(request, 404, "not found: try /metrics, /healthz, /readyz or /status")
        self._later(request, answer)
        return server.NOT_DONE_YET

    def _later(self, request: Request, answer: _Answer) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(snapshot: Snapshot) -> None:
            if gone:
                return
            body = answer(self, request, snapshot)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("admin: {path} failed", failure, event="admin_failed", path=request.path)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.source.snapshot().addCallback(write).addErrback(failed)

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (request.getHeader(b"authorization") or b"").partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic":
            try:
                value = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme != b"bearer":
            return False
        return hmac.compare_digest(value.strip(), self.token)


class _Answer(Protocol):
    def __call__(self, site: AdminResource, request: Request, snapshot: Snapshot) -> bytes: ...


def _refuse(request: Request) -> bytes:
    request.responseHeaders.setRawHeaders(
        b"www-authenticate", [b'Bearer realm="tunnelkit admin"', b'Basic realm="tunnelkit admin"']
    )
    return _text(request, 401, "unauthorized: give the --admin-token")


def _text(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT)
    return text.encode() + b"\n"


def _metrics(site: AdminResource, request: Request, snapshot: Snapshot) -> bytes:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    body, content_type = metrics.render(snapshot, accept)
    request.setHeader(b"content-type", content_type.encode())
    return body


def _readyz(site: AdminResource, request: Request, snapshot: Snapshot) -> bytes:
    reasons = snapshot.unready()
    return _text(request, 503 if reasons else 200, "\n".join(reasons) or "ready")


def _status_json(site: AdminResource, request: Request, snapshot: Snapshot) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    extra = {"unready": snapshot.unready(), "history": site.history()}
    return json.dumps(snapshot.to_json() | extra).encode()


#: The paths answered from a snapshot.
ANSWERS: dict[bytes, _Answer] = {
    b"/metrics": _metrics,
    b"/readyz": _readyz,
    b"/status.json": _status_json,
}


class AdminSite(server.Site):
    """The admin endpoint's site: no access log line per request (a scrape every few seconds).

    An idle connection is closed after :data:`IDLE_TIMEOUT` (Twisted's default is 12 hours).
    """

    noisy = False

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root, timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]

    def log(self, request: http.Request) -> None:
        """Scrapes and probes are not logged."""
