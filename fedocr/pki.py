"""Federation PKI: one CA and the role-bearing certificates of the aggregator, edges and observers.

Everything lives in one directory with fixed file names:

    ca.pem, ca.key          the federation CA (EC P-256, self-signed)
    <name>.pem, <name>.key  a certificate signed by the CA and its private key

Keys are unencrypted PKCS#8 PEM written with mode 0600 (gRPC loads them as they are); nothing is
ever overwritten unless asked. A certificate states its identity and role twice, and readers
require both to agree: subject CN = name, OU = role, and one SAN URI ``fedocr://<role>/<name>``.
Roles are ``server`` (with DNS and IP SANs for the hosts it answers on), ``edge`` and ``observer``.

Command line (``fedocr-pki``)::

    fedocr-pki init --dir DIR
    fedocr-pki server --dir DIR --name aggregator --host 127.0.0.1 --host localhost
    fedocr-pki edge --dir DIR --name edge-0
    fedocr-pki observer --dir DIR --name ops
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_SUFFIX = ".pem"
KEY_SUFFIX = ".key"
ROLE_SERVER = "server"
ROLE_EDGE = "edge"
ROLE_OBSERVER = "observer"
ROLE_LEAF = "leaf"  # a leaf aggregator: to the root, an edge that forwards its edges' sum
ROLES = (ROLE_SERVER, ROLE_EDGE, ROLE_OBSERVER, ROLE_LEAF)
URI_SCHEME = "fedocr"
ORGANIZATION = "FedOCR"
CA_DAYS = 3650
LEAF_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)  # back-date not_before so a slightly slow peer accepts it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class PkiError(Exception):
    """A PKI operation that cannot be done as asked (file exists, CA missing, bad name)."""


def role_uri(role: str, name: str) -> str:
    """The SAN URI naming ``name`` in ``role``: ``fedocr://<role>/<name>``."""
    return f"{URI_SCHEME}://{role}/{name}"


def parse_role_uri(uri: str) -> tuple[str, str] | None:
    """Return (role, name) from a ``fedocr://<role>/<name>`` URI, or None for any other URI."""
    prefix = f"{URI_SCHEME}://"
    if not uri.startswith(prefix):
        return None
    role, _, name = uri[len(prefix) :].partition("/")
    if role not in ROLES or not _NAME.match(name):
        return None
    return role, name


def cert_path(directory: Path, name: str) -> Path:
    """Where the certificate of ``name`` lives in ``directory``."""
    return Path(directory) / f"{name}{CERT_SUFFIX}"


def key_path(directory: Path, name: str) -> Path:
    """Where the private key of ``name`` lives in ``directory``."""
    return Path(directory) / f"{name}{KEY_SUFFIX}"


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None, days: int
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.UTC) - CLOCK_SKEW
    end = not_after or start + CLOCK_SKEW + dt.timedelta(days=days)
    if end <= start:
        raise PkiError(f"not_after {end} is not after not_before {start}")
    return start, end


def _check_free(*paths: Path, overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise PkiError(f"{path} already exists (pass overwrite / --force to replace it)")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (so a key is never world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(key_path(directory, name), key_pem, 0o600)
    _write(cert_path(directory, name), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path(directory, name)


def create_ca(
    directory: Path,
    common_name: str = "FedOCR federation CA",
    days: int = CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    overwrite: bool = False,
) -> Path:
    """Create the federation CA as ``ca.pem`` / ``ca.key`` in ``directory``; return the cert path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_free(directory / CA_CERT_FILE, directory / CA_KEY_FILE, overwrite=overwrite)
    start, end = _validity(not_before, not_after, days)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # certSign, crlSign
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    log.info("created CA %r in %s", common_name, directory)
    return _write_pair(directory, CA_CERT_FILE.removesuffix(CERT_SUFFIX), cert, key)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_file, key_file = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if not cert_file.exists() or not key_file.exists():
        raise PkiError(f"no CA in {directory}: run `fedocr-pki init --dir {directory}` first")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_file} is not an EC private key")
    return cert, key


def issue(
    directory: Path,
    role: str,
    name: str,
    hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Issue a certificate for ``name`` in ``role``, signed by the CA in ``directory``.

    ``hosts`` (server role only) become DNS or IP SANs. Returns (cert path, key path).
    Raises PkiError for an unknown role, a bad name, a missing CA or an existing file.
    """
    directory = Path(directory)
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not _NAME.match(name) or name == CA_CERT_FILE.removesuffix(CERT_SUFFIX):
        raise PkiError(f"bad name {name!r}: use 1-63 letters, digits, '.', '_' or '-', and not 'ca'")
    if hosts and role != ROLE_SERVER:
        raise PkiError("only a server certificate carries host names")
    if role == ROLE_SERVER and not hosts:
        raise PkiError("a server certificate needs at least one --host")
    ca_cert, ca_key = _load_ca(directory)
    _check_free(cert_path(directory, name), key_path(directory, name), overwrite=overwrite)
    start, end = _validity(not_before, not_after, days)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role_uri(role, name))]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if role == ROLE_SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digitalSignature
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    log.info("issued %s certificate %r in %s", role, name, directory)
    return _write_pair(directory, name, cert, key), key_path(directory, name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedocr-pki", description="Create the federation's CA and certificates."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create the CA (ca.pem, ca.key)")
    init.add_argument("--days", type=int, default=CA_DAYS)
    for role in ROLES:
        sub = commands.add_parser(role, help=f"issue a {role} certificate (<name>.pem, <name>.key)")
        sub.add_argument("--name", required=True, help="identity, the certificate's CN")
        sub.add_argument("--days", type=int, default=LEAF_DAYS)
        if role == ROLE_SERVER:
            sub.add_argument("--host", action="append", required=True, help="DNS name or IP (repeatable)")
    for sub in commands.choices.values():
        sub.add_argument("--dir", type=Path, required=True, help="the PKI directory")
        sub.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedocr-pki``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            made = [create_ca(args.dir, days=args.days, overwrite=args.force), args.dir / CA_KEY_FILE]
        else:
            hosts = args.host if args.command == ROLE_SERVER else ()
            made = list(issue(args.dir, args.command, args.name, hosts, days=args.days, overwrite=args.force))
    except PkiError as exc:
        print(f"fedocr-pki: error: {exc}", file=sys.stderr)
        return 1
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
