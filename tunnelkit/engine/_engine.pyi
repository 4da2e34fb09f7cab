# Types of the C module tunnelkit/engine/_engine.c (see tunnelkit/engine/driver.py).
from collections.abc import Callable, Sequence
from typing import Any

MAX_BACKENDS: int
MAX_LISTENERS: int
TICK: float

# client, backend, backend_address, bytes_up, bytes_down, duration, connect_time
Fields = tuple[str, str, str | None, int, int, float, float | None]
# listener, those fields, closed_by, close_kind, reason, spliced,
# (pyOpenSSL Connection, handshaken) for a TLS client else None
Record = tuple[int, Fields, int, int, str, bool, tuple[Any, bool] | None]

class Engine:
    active: int
    def __init__(
        self,
        backends: Sequence[tuple[str, str, int] | tuple[str, str]],
        read_size: int,
        bulk_read: int,
        splice: int,
        idle: float,
        fin: float,
        grace: float,
        connect_timeout: float,
        *,
        half_close: bool = True,
        max_tunnels: int,
        log_records: bool,
        nodelay: bool = True,
        keepalive: int = -1,
        sndbuf: int = -1,
        rcvbuf: int = -1,
        mss: int = -1,
        client_check: Callable[[str, int, int], bool] | None = None,
        tls: tuple[tuple[int, ...], Callable[[int], tuple[int, Any]], float] | None = None,
        fd_slots: int = 0,
    ) -> None: ...
    def run(self) -> bool: ...
    def wait(self, timeout: float | None) -> int: ...
    def nest(self, fd: int) -> None: ...
    def tick(self) -> bool: ...
    def abort_all(self, reason: str) -> None: ...
    def add_listener(self, fd: int, listener: int) -> None: ...
    def remove_listener(self, fd: int) -> None: ...
    def take_records(self) -> Sequence[Record]: ...
    def take_notices(self) -> Sequence[tuple[str, int]]: ...
    def fileno(self) -> int: ...
    def tunnels(self) -> list[tuple[int, int, str]]: ...
    def close(self) -> None: ...
