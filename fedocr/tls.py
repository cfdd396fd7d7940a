"""Mutual-TLS plumbing for gRPC: credentials from PEM files and the verified peer's identity."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fedocr import pki

log = logging.getLogger(__name__)

SSL_TRANSPORT = b"ssl"  # grpc auth-context value of transport_security_type under TLS
_PEM_CERT_PROPERTY = "x509_pem_cert"
_TRANSPORT_PROPERTY = "transport_security_type"


class CredentialsError(Exception):
    """A certificate, key or CA file that is missing, unreadable or not what it should be."""


class UnknownRole(Exception):
    """The peer has no verified client certificate, or it names no known role unambiguously."""


@dataclass(frozen=True)
class Identity:
    """Who a verified peer is: ``name`` (the certificate CN) and ``role`` (one of pki.ROLES)."""

    name: str
    role: str


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _load_cert(path: Path, what: str) -> tuple[bytes, x509.Certificate]:
    data = _read(path, what)
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CredentialsError(f"{what} {path} is not a PEM certificate") from exc


def _load_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """Read a certificate and its private key; raise CredentialsError unless they belong together."""
    cert_pem, parsed = _load_cert(cert, "certificate")
    key_pem = _read(key, "private key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"private key {key} is not an unencrypted PEM key") from exc
    if private.public_key() != parsed.public_key():
        raise CredentialsError(f"private key {key} does not match certificate {cert}")
    return cert_pem, key_pem


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """TLS server credentials that require a client certificate signed by the CA in ``ca``."""
    cert_pem, key_pem = _load_pair(cert, key)
    ca_pem, _ = _load_cert(ca, "CA certificate")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting ``ca`` and presenting ``cert`` / ``key``."""
    cert_pem, key_pem = _load_pair(cert, key)
    ca_pem, _ = _load_cert(ca, "CA certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def secure_channel(
    target: str,
    ca: Path,
    cert: Path,
    key: Path,
    options: Sequence[tuple[str, Any]] = (),
    server_name: str | None = None,
) -> grpc.Channel:
    """An mTLS channel to ``target``; ``server_name`` overrides the host name checked in its cert."""
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(ca, cert, key), options=opts)


@functools.lru_cache(maxsize=256)
def identity_from_pem(pem: bytes) -> Identity:
    """Read the identity of a FedOCR certificate (see fedocr.pki); raise UnknownRole if absent.

    The SAN URI ``fedocr://<role>/<name>``, the CN and the OU must all agree.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UnknownRole("peer certificate does not parse") from exc
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = [pki.parse_role_uri(u) for u in uris.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        found = []
    found = [f for f in found if f is not None]
    if len(found) != 1:
        raise UnknownRole(
            f"peer certificate {cert.subject.rfc4514_string()} has {len(found)} role URIs, not 1"
        )
    role, name = found[0]
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if cn != [name] or ou != [role]:
        raise UnknownRole(
            f"peer certificate {cert.subject.rfc4514_string()} disagrees with its URI {role}/{name}"
        )
    return Identity(name=name, role=role)


def peer_identity(context: grpc.ServicerContext) -> Identity:
    """The identity of the peer of an RPC, from the client certificate gRPC verified.

    Works with sync and asyncio servicer contexts. Raises UnknownRole for a plaintext peer, a
    peer without a certificate, or a certificate that names no role unambiguously.
    """
    auth = context.auth_context()
    if auth.get(_TRANSPORT_PROPERTY) != [SSL_TRANSPORT]:
        raise UnknownRole("the peer is not on TLS")
    pems = auth.get(_PEM_CERT_PROPERTY) or []
    if len(pems) != 1:
        raise UnknownRole("the peer presented no client certificate")
    return identity_from_pem(pems[0])
