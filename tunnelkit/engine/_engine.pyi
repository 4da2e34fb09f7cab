# Types of the C module tunnelkit/engine/_engine.c (see tunnelkit/engine/driver.py).
from collections.abc import Callable, Sequence
from typing import Any

MAX_BACKENDS: int
MAX_LISTENERS: int
TICK: float
# The values of tunnelkit.relay.tunnel.Side and CloseKind, by the engine's numbers.
SIDES: tuple[str, ...]
CLOSE_KINDS: tuple[str, ...]
# The names of a record's fields, in order: listener, client, backend,
# backend_address, attempts (connect attempts made), bytes_up, bytes_down,
# duration, connect_time, closed_by (an index into SIDES), close_kind (into
# CLOSE_KINDS), reason, spliced, tls ((pyOpenSSL Connection, handshaken) for a
# TLS client, else None), profile.
RECORD_FIELDS: tuple[str, ...]
# The fields of tunnelkit.relay.counters.ListenerCounters, in Engine.counters' order.
COUNTERS: tuple[str, ...]
# Pool's strategies: "first", "round-robin", "least-conn", "random", "source-hash".
BALANCES: tuple[str, ...]

Backend = tuple[str, str, int] | tuple[str, str]
# Per backend: (active, up, ejected seconds left (0.0: not ejected), failures in
# a row, weight, tunnels joined to it, failed attempts).
BackendState = tuple[int, bool, float, int, int, int, int]

def source_hash_scores(
    client: bytes, names: Sequence[str], weights: Sequence[int]
) -> tuple[float, ...]:
    """Each backend's source-hash score for a client of that packed address (the highest takes it)."""

class Pool:
    """A listener's backends, their state, and how each connection picks among them."""

    names: tuple[str, ...]
    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        balance: str = "first",
        weights: Sequence[int] | None = None,
        backups: Sequence[bool] | None = None,
        max_conn: int = 0,
        retries: int = -1,
        eject_after: int = 0,
        eject_base: float = 1.0,
        eject_max: float = 60.0,
        on_change: Callable[[int, bool, str], object] | None = None,
    ) -> None: ...
    def set(self, index: int, *, up: bool | None = None, weight: int | None = None) -> None: ...
    def states(self) -> tuple[BackendState, ...]: ...

class ClientTable:
    """A listener's per-client limits and the clients it remembers (``len``), shared by its profiles."""

    # (max_conn, rate, burst), as given.
    limits: tuple[int, float, int]
    def __init__(
        self,
        *,
        max_conn: int = 0,
        rate: float = 0.0,
        burst: int = 0,
        tracked: int = 16384,
        log_interval: float = 10.0,
    ) -> None: ...
    def __len__(self) -> int: ...
    # Without a socket, on the caller's clock (tests): the verdict and the refusals to log now.
    def admit(self, packed: bytes, now: float) -> tuple[str | None, int]: ...
    def release(self, packed: bytes, now: float) -> None: ...

Record = tuple[
    int,
    str,
    str,
    str | None,
    int,
    int,
    int,
    float,
    float | None,
    int,
    int,
    str,
    bool,
    tuple[Any, bool] | None,
    Profile,
]

class Profile:
    """How a listener's tunnels are served; immutable, shared by the tunnels that use it."""

    context: Any
    backends: tuple[str, ...]
    pool: Pool
    clients: ClientTable | None
    def __init__(
        self,
        backends: Pool | Sequence[Backend],
        read_size: int,
        bulk_read: int,
        splice: str,
        idle: float,
        fin: float,
        grace: float,
        connect_timeout: float,
        *,
        half_close: bool = True,
        log_records: bool = True,
        nodelay: bool = True,
        keepalive: int = -1,
        sndbuf: int = -1,
        rcvbuf: int = -1,
        mss: int = -1,
        client_check: Callable[[str, int, int], bool] | None = None,
        tls: tuple[tuple[int, ...], Callable[[int], tuple[int, Any]], float] | None = None,
        context: Any = None,
        proxy_protocol: int = 0,
        proxy_tlvs: Callable[[Any], bytes] | None = None,
        clients: ClientTable | None = None,
    ) -> None: ...

class Engine:
    active: int
    def __init__(self, *, max_tunnels: int, fd_slots: int = 0) -> None: ...
    def run(self) -> bool: ...
    def wait(self, timeout: float | None) -> int: ...
    def nest(self, fd: int) -> None: ...
    def tick(self) -> bool: ...
    def abort_all(self, reason: str) -> None: ...
    def close_backend(self, pool: Pool, index: int, reason: str) -> int: ...
    def add_listener(self, fd: int, index: int, profile: Profile) -> None: ...
    def set_profile(self, index: int, profile: Profile) -> None: ...
    def counters(self, index: int) -> tuple[int, ...]: ...
    def remove_listener(self, fd: int) -> None: ...
    def take_records(self) -> Sequence[Record]: ...
    def take_notices(self) -> Sequence[tuple[str, int]]: ...
    def fileno(self) -> int: ...
    def tunnels(self) -> list[tuple[int, int, str]]: ...
    def close(self) -> None: ...
