"""Tiny loopback backends the benchmark runs in their own process.

``echo`` answers every byte (the idle-connection test proves each of its
1,000 connections end to end with a 1-byte echo, then holds them). ``http``
is the fallback HTTP backend for when nginx is not installed: a keep-alive
server that answers every request with the same 1 KiB body, fast enough that
the proxy, not the backend, is the bottleneck for everything but direct.

Both bind port 0 and print ``listening on 127.0.0.1:PORT`` so the runner
never guesses a port. They run in a separate process so their memory and CPU
are not mistaken for the proxy's or the runner's.

Usage: ``python backends.py echo|http [--body-size N]``
"""

from __future__ import annotations

import argparse
import asyncio
import signal

#: Longest request head the HTTP fallback accepts before it closes the connection.
MAX_HEAD = 64 * 1024


class Echo(asyncio.Protocol):
    """Writes back what it reads; asyncio's write buffer is enough for 1-byte probes."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Http(asyncio.Protocol):
    """Answers every request head with a fixed 200 response; honours ``Connection: close``."""

    transport: asyncio.Transport

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            close = b"connection: close" in head.lower()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n%s\r\n"
                % (len(self.body), b"Connection: close\r\n" if close else b"")
                + self.body
            )
            if close:
                self.transport.close()
                return
        if len(self.buffer) > MAX_HEAD:
            self.transport.close()


async def serve(mode: str, body_size: int) -> None:
    """Listen on a kernel-chosen loopback port, say which, and serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    body = bytes(i % 251 for i in range(body_size))
    if mode == "echo":
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    else:
        server = await loop.create_server(lambda: Http(body), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["echo", "http"])
    parser.add_argument("--body-size", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(serve(args.mode, args.body_size))


if __name__ == "__main__":
    main()
