"""Real PROXY protocol peers: HAProxy (``accept-proxy``) downstream, curl ``--haproxy-protocol`` upstream.

HAProxy answers each request with the client address, port and destination
it read from tunnelkit's header (and the v2 authority TLV), so the test sees
what a real receiver made of the bytes, on both planes. curl's
``--haproxy-protocol`` is the upstream proxy of an accepting listener.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import trustme
from certs import write_ca, write_pair
from loopback import IO_TIMEOUT, LoopbackTestCase, connect, split_address
from planes import TWISTED, on_each_plane, on_planes
from processes import free_port, wait_until
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

Inline = Generator[Deferred[Any], Any, None]

HAPROXY_CONFIG = """
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port] %[fc_pp_authority]"
"""


def peer_env() -> dict[str, str]:
    """Peers are not ours: they run without the sanitizer runtime of scripts/sanitize."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed (CI installs it: .ci/run)")
    return path


class HAProxy:
    """``haproxy -db`` with an ``accept-proxy`` frontend on 127.0.0.1, stopped by :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        config = directory / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=self.port))
        self.process = subprocess.Popen(
            [tool("haproxy"), "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=peer_env(),
        )
        self.address = f"127.0.0.1:{self.port}"
        wait_until(self._listening, "haproxy listening", timeout=IO_TIMEOUT)

    def _listening(self) -> bool:
        assert self.process.poll() is None, (
            self.process.stderr.read() if self.process.stderr else ""
        )
        try:
            connect(self.address, timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=IO_TIMEOUT)


def curl(*args: str) -> str:
    """curl's output (the body, then what ``-w`` asks), failing on any error."""
    done = subprocess.run(
        [tool("curl"), "-sS", "--max-time", str(int(IO_TIMEOUT)), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT * 2,
        env=peer_env(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class PeerTestCase(LoopbackTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.haproxy = HAProxy(self.directory)
        self.addCleanup(self.haproxy.stop)


@on_each_plane
class HAProxyReceives(PeerTestCase):
    """HAProxy accept-proxy behind tunnelkit"""

    @inlineCallbacks
    def test_v1_and_v2_name_curls_own_address(self) -> Inline:
        """Each version: HAProxy reads curl's own address and port, and the listener's."""
        for version in ("v1", "v2"):
            forwarder = self.forward("--to", self.haproxy.address, "--proxy-protocol", version)
            url = f"http://{forwarder.address}/"
            out = yield deferToThread(curl, "-w", " %{local_ip} %{local_port}", url)
            src, src_port, dst, dst_port, local_ip, local_port = out.split()
            self.assertEqual((src, src_port), (local_ip, local_port), version)
            self.assertEqual(f"{dst}:{dst_port}", forwarder.address, version)
            yield forwarder.stop()

    @inlineCallbacks
    def test_v2_tells_the_sni_name_of_a_terminated_tls_client(self) -> Inline:
        """TLS terminated by tunnelkit: HAProxy reads the client's SNI name from the authority TLV."""
        ca = trustme.CA()
        pair = write_pair(ca, self.directory, "proxied.example")
        ca_file = write_ca(ca, self.directory)
        forwarder = self.forward(
            "--to", self.haproxy.address, "--proxy-protocol", "v2",
            "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        )  # fmt: skip
        host, port = split_address(forwarder.address)
        out = yield deferToThread(
            curl,
            "--cacert", str(ca_file),
            "--resolve", f"proxied.example:{port}:{host}",
            "-w", " %{local_port}",
            f"https://proxied.example:{port}/",
        )  # fmt: skip
        src, src_port, _dst, dst_port, authority, local_port = out.split()
        self.assertEqual((src, src_port, dst_port), (host, local_port, str(port)))
        self.assertEqual(authority, "proxied.example")


@on_planes(TWISTED)
class CurlSends(PeerTestCase):
    """curl --haproxy-protocol in front of an accepting listener"""

    @inlineCallbacks
    def test_curls_header_is_believed_and_passed_on(self) -> Inline:
        """curl's v1 header is read, its address recorded and sent on to HAProxy as v2."""
        forwarder = self.forward(
            "--to", self.haproxy.address, "--proxy-protocol", "v2",
            "--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1",
        )  # fmt: skip
        out = yield deferToThread(
            curl, "--haproxy-protocol", "-w", " %{local_port}", f"http://{forwarder.address}/"
        )
        src, src_port, dst, dst_port, local_port = out.split()
        self.assertEqual((src, src_port), ("127.0.0.1", local_port))
        self.assertEqual(f"{dst}:{dst_port}", forwarder.address)
        (record,) = yield forwarder.closed(1)
        self.assertEqual(record["client"], f"127.0.0.1:{local_port}")
        self.assertIn("proxied_by", record)

    @inlineCallbacks
    def test_curls_header_before_tls_is_read(self) -> Inline:
        """https with --haproxy-protocol: the header in clear, then TLS tunnelkit terminates."""
        ca = trustme.CA()
        pair = write_pair(ca, self.directory, "proxied.example")
        ca_file = write_ca(ca, self.directory)
        forwarder = self.forward(
            "--to", self.haproxy.address, "--proxy-protocol", "v2",
            "--accept-proxy-protocol", "--trusted-proxies", "127.0.0.1",
            "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        )  # fmt: skip
        host, port = split_address(forwarder.address)
        out = yield deferToThread(
            curl,
            "--haproxy-protocol",
            "--cacert", str(ca_file),
            "--resolve", f"proxied.example:{port}:{host}",
            "-w", " %{local_port}",
            f"https://proxied.example:{port}/",
        )  # fmt: skip
        src, src_port, _dst, _dst_port, authority, local_port = out.split()
        self.assertEqual((src, src_port, authority), (host, local_port, "proxied.example"))
