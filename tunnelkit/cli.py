"""``tunnelkit ARGS`` is ``twist tunnelkit ARGS``: the plugin run in the foreground.

``tunnelkit passwd USER [FILE]`` makes proxy users (see :mod:`tunnelkit.passwd`).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``twist tunnelkit`` with this command's arguments."""
    if sys.argv[1:2] == ["passwd"]:
        from tunnelkit.passwd import main as passwd

        raise SystemExit(passwd(sys.argv[2:]))
    from twisted.application.twist._twist import Twist

    # Twist.main's default argv is bound at import time to the original list,
    # so the rewritten command line must be passed explicitly.
    Twist.main(["twist", "tunnelkit", *sys.argv[1:]])
