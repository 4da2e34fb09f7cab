"""The PROXY protocol: headers sent to backends, and headers accepted from trusted proxies.

:mod:`.build` makes the headers tunnelkit sends (``--proxy-protocol``);
:mod:`.parse` reads the one a trusted proxy sends first
(``--accept-proxy-protocol``); :mod:`.tls` says what a terminated TLS
connection adds to a version 2 header; :mod:`.accept` and :mod:`.send` are
the two sides on Twisted's plane. See docs/proxy-protocol.md.
"""
