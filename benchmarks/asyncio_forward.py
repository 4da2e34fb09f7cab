#!/usr/bin/env python3
"""A plain asyncio TCP forwarder: what Python does without Twisted (on uvloop if importable).

Usage: ``asyncio_forward.py LISTEN_PORT BACKEND_PORT [uvloop|asyncio]`` (both
ports on 127.0.0.1; the loop defaults to uvloop when it can be imported;
peers.py names it, so that the row's name and the loop always agree).
A baseline row of run.py, written the fast way: Protocols (no coroutine per
connection), a full write buffer pausing the other side's reads, half-close
passed on. It prints ``listening on 127.0.0.1:PORT`` once it accepts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from typing import cast


class Pipe(asyncio.Protocol):
    """One side of a forwarded connection: what it reads goes to its peer's transport."""

    transport: asyncio.Transport

    def __init__(self, peer: Pipe | None = None) -> None:
        self.peer = peer
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has the interface without being a subclass.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # Half-close: pass the EOF on; close only once both directions have ended.
        self.got_eof = True
        if self.peer is not None:  # else passed on once the backend is connected
            self.peer.transport.write_eof()
            if self.peer.got_eof:
                self.transport.close()
                self.peer.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()  # still sends what it has buffered

    # Our transport's buffer passed its high-water mark: stop reading the peer until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class Accepted(Pipe):
    """A client's connection: it reads nothing until the backend connection is up.

    Nearly nothing: uvloop may hand over one read that was already under way
    when reading was paused, so that is kept until the backend is there.
    """

    def __init__(self, backend_port: int) -> None:
        super().__init__()
        self.backend_port = backend_port
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self.connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The backend's side knows its peer from the start: it may speak first.
            _, backend = await loop.create_connection(
                lambda: Pipe(self), "127.0.0.1", self.backend_port
            )
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while we connected
            backend.transport.close()
            return
        self.peer = backend
        backend.transport.writelines(self.early)
        self.early.clear()
        if self.got_eof:
            backend.transport.write_eof()
        self.transport.resume_reading()


async def serve(port: int, backend_port: int, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Accepted(backend_port), "127.0.0.1", port, backlog=1024
    )
    print(f"listening on 127.0.0.1:{port} ({loop_name})", flush=True)
    await server.serve_forever()


def main() -> None:
    port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    default = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    loop_name = sys.argv[3] if len(sys.argv) > 3 else default
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(serve(port, backend_port, loop_name))
    else:
        asyncio.run(serve(port, backend_port, loop_name))


if __name__ == "__main__":
    main()
