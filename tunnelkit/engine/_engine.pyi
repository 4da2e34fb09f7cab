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
# backend_address, bytes_up, bytes_down, duration, connect_time, closed_by
# (an index into SIDES), close_kind (into CLOSE_KINDS), reason, spliced,
# tls ((pyOpenSSL Connection, handshaken) for a TLS client, else None), profile.
RECORD_FIELDS: tuple[str, ...]
# The fields of tunnelkit.relay.counters.ListenerCounters, in Engine.counters' order.
COUNTERS: tuple[str, ...]

Record = tuple[
    int,
    str,
    str,
    str | None,
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
    def __init__(
        self,
        backends: Sequence[tuple[str, str, int] | tuple[str, str]],
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
    ) -> None: ...

class Engine:
    active: int
    def __init__(self, *, max_tunnels: int, fd_slots: int = 0) -> None: ...
    def run(self) -> bool: ...
    def wait(self, timeout: float | None) -> int: ...
    def nest(self, fd: int) -> None: ...
    def tick(self) -> bool: ...
    def abort_all(self, reason: str) -> None: ...
    def add_listener(self, fd: int, index: int, profile: Profile) -> None: ...
    def set_profile(self, index: int, profile: Profile) -> None: ...
    def counters(self, index: int) -> tuple[int, ...]: ...
    def remove_listener(self, fd: int) -> None: ...
    def take_records(self) -> Sequence[Record]: ...
    def take_notices(self) -> Sequence[tuple[str, int]]: ...
    def fileno(self) -> int: ...
    def tunnels(self) -> list[tuple[int, int, str]]: ...
    def close(self) -> None: ...
