"""twistd plugin entry: ``twistd tunnelkit ...``.

Twisted imports every plugin file on each ``twistd --help``, so this stays a
single lazy ``ServiceMaker``: ``tunnelkit.cli.plugin`` is imported only when the
``tunnelkit`` subcommand is actually used.
"""

from twisted.application.service import ServiceMaker

tunnelkit = ServiceMaker(
    "tunnelkit",
    "tunnelkit.cli.plugin",
    "Port forwarder and tunnel: TCP/TLS/UNIX listeners relayed to backends.",
    "tunnelkit",
)
