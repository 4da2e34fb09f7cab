"""Throwaway certificates for TLS tests, made per test with trustme: no key is ever committed."""

from __future__ import annotations

from pathlib import Path

import attrs
import trustme


@attrs.frozen
class Pair:
    """A certificate chain file and its key file, as ``--tls-cert``/``--tls-key`` take them."""

    cert: Path
    key: Path
    #: The leaf certificate and its key in one file (HAProxy's ``crt`` form).
    combined: Path


def write_ca(ca: trustme.CA, directory: Path, name: str = "ca") -> Path:
    """The CA certificate as a PEM file (``--tls-client-ca``, ``--backend-ca``, ``curl --cacert``)."""
    path = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def write_pair(
    ca: trustme.CA,
    directory: Path,
    *identities: str,
    name: str | None = None,
    common_name: str | None = None,
) -> Pair:
    """Issue a certificate for ``identities`` (DNS names, IP addresses, emails) and write it."""
    stem = name or (identities[0] if identities else common_name or "cert").replace("*", "star")
    leaf = ca.issue_cert(*identities, common_name=common_name)
    cert = directory / f"{stem}.pem"
    key = directory / f"{stem}.key"
    combined = directory / f"{stem}.combined.pem"
    with cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(combined))
    return Pair(cert, key, combined)
