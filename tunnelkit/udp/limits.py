"""Who may open a UDP session: a cap and an admission rate per client address.

UDP source addresses cost nothing to forge, and every session holds a
socket (a file descriptor) towards its backend. ``--max-connections`` caps
the sessions of the process; these limits keep one address (all its ports
together) from taking that whole budget: at most ``sessions_per_source``
sessions at once, and new ones at ``rate`` per second (a token bucket with a
burst of as many). A flood of many forged addresses is bounded by the
process cap, and refused datagrams open nothing.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

#: Buckets are pruned when there are this many (and then at each doubling).
PRUNE_AT = 4096


class SourceLimits:
    """Per client address: sessions open now, and the tokens left for new ones."""

    def __init__(self, clock: IReactorTime, per_source: int, rate: int) -> None:
        self.clock = clock
        self.per_source = per_source
        self.rate = rate
        self._open: dict[str, int] = {}
        #: Per address: (tokens, when they were counted).
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = PRUNE_AT

    def refusal(self, host: str) -> str | None:
        """Why a new session from ``host`` is refused, or ``None`` (then one token is taken)."""
        if self._open.get(host, 0) >= self.per_source:
            return "sessions_per_source"
        now = self.clock.seconds()
        tokens = self._tokens(host, now)
        if tokens < 1:
            return "session_rate"
        self._buckets[host] = (tokens - 1, now)
        self._open[host] = self._open.get(host, 0) + 1
        if len(self._buckets) >= self._prune_at:
            self._prune(now)
        return None

    def released(self, host: str) -> None:
        """A session of ``host`` ended."""
        left = self._open.get(host, 0) - 1
        if left > 0:
            self._open[host] = left
        else:
            self._open.pop(host, None)

    def _tokens(self, host: str, now: float) -> float:
        tokens, then = self._buckets.get(host, (float(self.rate), now))
        return min(float(self.rate), tokens + (now - then) * self.rate)

    def _prune(self, now: float) -> None:
        """Forget full buckets of addresses with no session: they are as good as new ones."""
        self._buckets = {
            host: bucket
            for host, bucket in self._buckets.items()
            if host in self._open or self._tokens(host, now) < self.rate
        }
        self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))
