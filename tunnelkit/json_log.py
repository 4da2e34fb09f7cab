"""A JSON-lines log observer for ``twistd --logger tunnelkit.json_log.observer``.

Containers and log shippers want one JSON object per event with the
structured fields of docs/logging.md as keys, not rendered text.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    """JSON lines on standard output (twistd calls this with no arguments)."""
    return jsonFileLogObserver(sys.stdout)
