"""``tunnelkit ARGS`` is ``twist tunnelkit ARGS``: the plugin run in the foreground."""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``twist tunnelkit`` with this command's arguments."""
    from twisted.application.twist._twist import Twist

    sys.argv = ["twist", "tunnelkit", *sys.argv[1:]]
    Twist.main()
