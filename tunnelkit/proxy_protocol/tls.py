"""What a version 2 header says of the TLS that tunnelkit terminated: HAProxy's TLVs.

``PP2_TYPE_ALPN`` (the protocol negotiated), ``PP2_TYPE_AUTHORITY`` (the
SNI name the client sent) and ``PP2_TYPE_SSL`` with its version, cipher
and, when the client presented a certificate, its subject's common name,
as HAProxy's ``send-proxy-v2-ssl-cn`` writes them. A client certificate is
always verified here (the handshake fails otherwise), so ``verify`` is 0
with one and 1 without, as the specification asks. Both planes call this
with the client's pyOpenSSL connection (the engine from its profile's
``proxy_tlvs``), so both send the same bytes. Loaded only with the TLS stack.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.x509.oid import NameOID

from tunnelkit.proxy_protocol.build import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    tlv,
)


def tls_tlvs(connection: Any) -> bytes:
    """The TLVs of a handshaken pyOpenSSL ``connection``, concatenated."""
    out = []
    alpn = connection.get_alpn_proto_negotiated()
    if alpn:
        out.append(tlv(PP2_TYPE_ALPN, alpn))
    name = connection.get_servername()
    if name:
        out.append(tlv(PP2_TYPE_AUTHORITY, name))
    out.append(tlv(PP2_TYPE_SSL, _ssl(connection)))
    return b"".join(out)


def _ssl(connection: Any) -> bytes:
    """The SSL TLV's value: client bits, verify, then its sub-TLVs."""
    peer = connection.get_peer_certificate()
    client = PP2_CLIENT_SSL
    if peer is not None:
        client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    subs = [
        tlv(PP2_SUBTYPE_SSL_VERSION, connection.get_protocol_version_name().encode()),
    ]
    cipher = connection.get_cipher_name()
    if cipher:
        subs.append(tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode()))
    if peer is not None:
        names = peer.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if names:
            value = names[0].value
            subs.append(
                tlv(PP2_SUBTYPE_SSL_CN, value.encode() if isinstance(value, str) else value)
            )
    return struct.pack("!BI", client, 0 if peer is not None else 1) + b"".join(subs)
