"""Tiny loopback backends the benchmark runs in their own process.

``echo`` answers every byte (the idle-connection test proves each of its
1,000 connections end to end with a 1-byte echo, then holds them). ``http``
is the fallback HTTP backend for when nginx is not installed: a keep-alive
server that answers every request with the same 1 KiB body, fast enough that
the proxy, not the backend, is the bottleneck for everything but direct.

``bulk`` is the TLS benchmark's backend (tls_bench.py): the first byte a
client sends chooses what it gets. ``E``: an echo (the ``E`` itself comes back
first); ``U``: an upload sink reading :data:`FRAME`-byte frames into one
reused buffer, until a frame whose first byte is 1, then answering
``ok BYTES``, so the uploader times bytes that arrived, not bytes sitting in
buffers; ``D``: a download source sending zeros until the client goes away.
Blocking sockets in a small pool of threads (no thread start per connection),
because ``recv_into`` a reused buffer is the cheapest a Python process can
take bytes. With ``--tls-cert``/``--tls-key`` it speaks TLS itself: the
benchmark's ``direct`` row, no proxy.

All bind port 0 and print ``listening on 127.0.0.1:PORT`` so the runner
never guesses a port. They run in a separate process so their memory and CPU
are not mistaken for the proxy's or the runner's.

Usage: ``python backends.py echo|http|bulk [--body-size N] [--tls-cert F --tls-key F]``
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import signal
import socket
import ssl
import threading
from types import FrameType

#: Longest request head the HTTP fallback accepts before it closes the connection.
MAX_HEAD = 64 * 1024
#: Size of the bulk backend's upload frames and download writes.
FRAME = 1 << 20
#: Threads serving bulk connections (one at a time is the usual load; a proxy
#: that lingers on a closed connection must not block the next one).
BULK_THREADS = 8
#: Socket timeout of every blocking operation of the bulk backend.
IO_TIMEOUT = 30.0


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


def bulk_connection(conn: socket.socket, tls: ssl.SSLContext | None) -> None:
    """Serve one bulk-backend connection (TLS first, with ``tls``), then close it."""
    try:
        conn.settimeout(IO_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        bulk_command(conn, conn.recv(1))
    except OSError:
        pass
    finally:
        conn.close()


def bulk_command(conn: socket.socket, command: bytes) -> None:
    """``E``: echo; ``U``: framed upload sink, answered ``ok BYTES``; ``D``: zeros until EOF."""
    if command == b"E":
        data = command
        while data:
            conn.sendall(data)
            data = conn.recv(65536)
    elif command == b"U":
        view = memoryview(bytearray(FRAME))
        total = 0
        while True:
            got = 0
            while got < FRAME:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            total += FRAME
            if view[0] == 1:
                conn.sendall(b"ok %d\n" % total)
                conn.recv(1)  # until the client closes (bounded by the timeout)
                return
    elif command == b"D":
        block = memoryview(bytes(FRAME))
        while True:
            conn.sendall(block)


def serve_bulk(tls_cert: str | None, tls_key: str | None) -> None:
    """Accept on a kernel-chosen loopback port; hand connections to a pool of threads."""
    tls = None
    if tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(tls_cert, tls_key)
    accepted: queue.Queue[socket.socket] = queue.Queue()

    def worker() -> None:
        while True:
            bulk_connection(accepted.get(), tls)

    for _ in range(BULK_THREADS):
        threading.Thread(target=worker, daemon=True).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as server:
        print(f"listening on 127.0.0.1:{server.getsockname()[1]}", flush=True)
        while True:
            accepted.put(server.accept()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["echo", "http", "bulk"])
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--tls-cert", help="bulk: speak TLS with this certificate (chain) file")
    parser.add_argument("--tls-key", help="bulk: the key of --tls-cert")
    args = parser.parse_args()
    if args.mode == "bulk":
        serve_bulk(args.tls_cert, args.tls_key)
    else:
        asyncio.run(serve(args.mode, args.body_size))


if __name__ == "__main__":
    main()
