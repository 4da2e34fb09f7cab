"""UDP forwarding on Twisted's plane: a session per client, a connected socket per session.

``config`` reads a ``udp:`` listener's keys into ``settings``; ``limits``
decides who may open a session; ``sessions`` holds the table of sessions
(plain objects on a clock: admit, pick a backend, relay datagram by
datagram, record); ``relay`` the thin datagram protocols and sockets around
them; ``health`` the send/expect checks of UDP backends; ``build`` makes a
listener's ports and checks for the service. See docs/udp.md.
"""
