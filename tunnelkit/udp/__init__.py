"""UDP forwarding on Twisted's plane: a session per client, a connected socket per session.

``settings`` holds what a ``udp:`` listener was told, ``limits`` who may
open a session, ``sessions`` the table of sessions (plain objects, driven
by a clock), ``relay`` the thin datagram protocols and sockets around them.
"""
