"""The /status page in headless Chromium (Debian's ``chromium``): it renders the listeners and backends.

A ``twistd -n tunnelkit`` process with two backends (one up, one that health
checks take down) serves a few tunnels; Chromium loads /status, runs its
script (which fetches /status.json), and the test reads the DOM it dumps and
saves a screenshot in the test's temporary directory (its path is printed:
``pytest -s`` shows it). The page may load nothing from elsewhere: its
Content-Security-Policy forbids it, so a missing inline part would show.
"""

from __future__ import annotations

import html.parser
import json
import subprocess
from pathlib import Path
from typing import Any

from admin_http import admin_base, fetch
from loopback import Serve, assert_echoes, echo, refusing_address
from processes import need, twistd, wait_until

JSON_LOG = ("--logger", "tunnelkit.json_log.observer")
#: Longest run of one Chromium command.
CHROMIUM_TIMEOUT = 60.0


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a throwaway profile; the page's timers run on virtual time."""
    argv = [need("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    argv += [f"--user-data-dir={profile}", "--hide-scrollbars", "--virtual-time-budget=4000"]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


class Rows(html.parser.HTMLParser):
    """The ``data-listener`` and ``data-backend`` rows of the dumped DOM, and the state pill's text."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[str] = []
        self.backends: list[str] = []
        self.cells: list[list[str]] = []
        self._in_state = False
        self.state = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found: dict[str, Any] = dict(attrs)
        if tag == "tr" and "data-listener" in found:
            self.listeners.append(found["data-listener"])
            self.cells.append([])
        if tag == "tr" and "data-backend" in found:
            self.backends.append(found["data-backend"])
            self.cells.append([])
        self._in_state = found.get("id") == "state"

    def handle_endtag(self, tag: str) -> None:
        self._in_state = False

    def handle_data(self, data: str) -> None:
        if self._in_state:
            self.state += data
        elif self.cells and data.strip():
            self.cells[-1].append(data.strip())


def ended(base: str) -> int:
    """How many tunnels have ended, as /status.json says."""
    [listener] = json.loads(fetch(base + "/status.json")[2])["listeners"]
    counters = listener["counters"]
    return int(counters["accepted"] - counters["active"])


def test_the_status_page_renders_listeners_and_backends(tmp_path: Path, serve: Serve) -> None:
    """Chromium shows the listener with its traffic and both backends, the dead one down; a screenshot is saved."""
    need("chromium")
    backend = serve(echo)
    with refusing_address() as dead:
        argv = ("--listen", "127.0.0.1:0", "--to", backend.address, "--to", dead)
        argv += ("--health-interval", "0.1", "--fall", "1", "--admin", "127.0.0.1:0")
        with twistd(*argv, cwd=tmp_path, twistd_options=JSON_LOG) as tk:
            [address] = tk.wait_listening()
            base = admin_base(tk)
            wait_until(lambda: b'"up": false' in fetch(base + "/status.json")[2], "a backend down")
            for _ in range(3):
                assert_echoes(address, 256 * 1024)
            # Counted once both legs have closed in the proxy, a moment after the client saw EOF.
            wait_until(lambda: ended(base) == 3, "the 3 tunnels ended")
            dom = chromium(tmp_path / "profile", "--dump-dom", base + "/status")
            screenshot = tmp_path / "status.png"
            shot = chromium(
                tmp_path / "profile",
                f"--screenshot={screenshot}",
                "--window-size=1280,600",
                base + "/status",
            )
            tk.stop()
    assert dom.returncode == 0, dom.stderr
    assert shot.returncode == 0 and screenshot.stat().st_size > 0, shot.stderr
    print(f"\nstatus page screenshot: {screenshot}")
    rows = Rows()
    rows.feed(dom.stdout)
    assert rows.listeners == ["127.0.0.1:0"], dom.stdout
    assert sorted(rows.backends) == sorted([backend.address, dead]), dom.stdout
    listener, *backends = rows.cells
    assert "768.0 KiB" in listener, listener  # 3 tunnels of 256 KiB each way
    health = {cells[2]: cells[3] for cells in backends}
    assert health == {backend.address: "up", dead: "down"}, backends
    assert rows.state == "ready"
    assert dom.stdout.count('<svg class="spark"') == 1  # the listener's traffic
