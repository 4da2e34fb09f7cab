"""A process whose options use no TLS never loads pyOpenSSL or cryptography."""

from __future__ import annotations

from pathlib import Path

import pytest
from processes import mapped_cryptography, twistd

from tunnelkit.app import tls_stack


@pytest.mark.parametrize(
    ("listen", "to", "tls_options", "expected"),
    [
        (["8888"], ["127.0.0.1:80"], False, False),
        (["[::1]:8888"], ["backend.example:80", "[::1]:80"], False, False),
        (["tcp:8888:interface=127.0.0.1"], ["unix:/run/app.sock"], False, False),
        (["systemd:domain=INET:index=0"], ["tcp:host=a:port=1"], False, False),
        (["8888"], ["127.0.0.1:80"], True, True),
        (["ssl:8443:privateKey=k.pem"], ["127.0.0.1:80"], False, True),
        (["SSL:443"], ["127.0.0.1:80"], False, True),
        (["8888"], ["tls:db.internal:5432"], False, True),
        # A plugin's endpoint type may need TLS: keep the stack available.
        (["le:/certs:tcp:443"], ["127.0.0.1:80"], False, True),
    ],
)
def test_needed(listen: list[str], to: list[str], tls_options: bool, expected: bool) -> None:
    assert tls_stack.needed(listen, to, tls_options) is expected


@pytest.mark.parametrize(
    ("to", "loaded"), [("127.0.0.1:9", False), ("tls:127.0.0.1:9", True)], ids=["plain", "tls"]
)
def test_twistd_loads_the_tls_stack_only_for_tls(tmp_path: Path, to: str, loaded: bool) -> None:
    """twistd -n tunnelkit: plain TCP maps no cryptography library; a tls: backend does (the control)."""
    with twistd("--listen", "127.0.0.1:0", "--to", to, cwd=tmp_path) as tk:
        tk.wait_listening()
        assert (mapped_cryptography(tk.pid) > 0) is loaded, tk.output
