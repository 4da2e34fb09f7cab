"""``tunnelkit ARGS`` is ``twist tunnelkit ARGS``: the plugin run in the foreground."""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``twist tunnelkit`` with this command's arguments."""
    from twisted.application.twist._twist import Twist

    # Twist.main's default argv is bound at import time to the original list,
    # so the rewritten command line must be passed explicitly.
    Twist.main(["twist", "tunnelkit", *sys.argv[1:]])
