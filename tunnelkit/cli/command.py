"""``tunnelkit ARGS`` is ``twist tunnelkit ARGS``: the plugin run in the foreground.

``tunnelkit passwd USER [FILE]`` makes proxy users (see :mod:`tunnelkit.cli.passwd`).

twist's own options go before the plugin's name and the plugin refuses
them, so the one the command takes, ``--log-format text|json`` (twist logs
JSON whenever standard output is not a terminal), is moved there. ``--help``
is the command's own: twist would show its usage line, ``twist [options]
plugin [plugin_options]``, glued to the plugin's, and not mention
``passwd``.
"""

from __future__ import annotations

import sys

from tunnelkit.cli.plugin import Options

#: The values of ``--log-format``, twist's.
LOG_FORMATS = ("text", "json")


class CommandOptions(Options):
    """The plugin's options and the command's own, as ``tunnelkit --help`` shows them."""

    synopsis = "Usage: tunnelkit [options]\n       tunnelkit passwd USER [FILE] [--cost N]"
    optParameters = [
        [
            "log-format",
            None,
            None,
            "How events are logged to standard output: text or json (default: text on a"
            " terminal, json otherwise).",
        ],
    ]

    def getUsage(self, width: int | None = None) -> str:
        return super().getUsage(width) + PASSWD_HELP


#: The end of ``tunnelkit --help``: the other command.
PASSWD_HELP = """
tunnelkit passwd USER FILE sets USER's password in FILE, an htpasswd file for
--auth-file; without FILE it prints the entry. See tunnelkit passwd --help.
"""


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """twist's options among ``args`` (``--log-format``), and the plugin's, in their order.

    Raises ``SystemExit`` with a one-line message for a missing or unknown format.
    """
    twist: list[str] = []
    plugin: list[str] = []
    rest = iter(args)
    for arg in rest:
        name, equals, value = arg.partition("=")
        if name != "--log-format":
            plugin.append(arg)
            continue
        if not equals:
            value = next(rest, "")
        if value.lower() not in LOG_FORMATS:
            raise SystemExit(
                f"tunnelkit: error: --log-format must be one of {', '.join(LOG_FORMATS)},"
                f" not {value!r}"
            )
        twist += ["--log-format", value.lower()]
    return twist, plugin


def main() -> None:
    """Run ``twist tunnelkit`` with this command's arguments."""
    args = sys.argv[1:]
    if args[:1] == ["passwd"]:
        from tunnelkit.cli.passwd import main as passwd

        raise SystemExit(passwd(args[1:]))
    twist, plugin = split_arguments(args)
    if "--help" in plugin:
        print(CommandOptions())
        raise SystemExit(0)
    from twisted.application.twist._twist import Twist

    # Twist.main's default argv is bound at import time to the original list,
    # so the rewritten command line must be passed explicitly.
    Twist.main(["twist", *twist, "tunnelkit", *plugin])
