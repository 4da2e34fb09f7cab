"""tunnelkit: a Twisted port forwarder and tunnel (plain TCP, TLS, UNIX; CONNECT and SOCKS5 to come)."""

__version__ = "0.1.0"
