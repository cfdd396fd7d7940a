"""Mutual TLS against a real gRPC server on 127.0.0.1: who gets in, who is refused, who they are."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedocr import tls

METHOD = "/fedocr.test.Probe/Who"


class _Probe(grpc.GenericRpcHandler):
    """Answers METHOD with ``role/name`` of the caller, or the UnknownRole message."""

    def __init__(self) -> None:
        self.calls = 0

    def service(self, handler_call_details):
        if handler_call_details.method != METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(self._who)

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        try:
            who = tls.peer_identity(context)
        except tls.UnknownRole as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return f"{who.role}/{who.name}".encode()


@pytest.fixture(scope="module")
def server(test_pki) -> Iterator[tuple[str, _Probe]]:
    probe = _Probe()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[probe])
    creds = tls.server_credentials(*test_pki.pair("aggregator"), test_pki.ca)
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    yield f"127.0.0.1:{port}", probe
    srv.stop(grace=None)


def call(channel: grpc.Channel) -> bytes:
    with channel:
        return channel.unary_unary(METHOD)(b"", timeout=5)


def refused(channel: grpc.Channel, probe: _Probe) -> grpc.StatusCode:
    before = probe.calls
    with pytest.raises(grpc.RpcError) as info:
        call(channel)
    assert probe.calls == before  # the handler never ran
    return info.value.code()


@pytest.mark.parametrize(("name", "expected"), [("edge-0", b"edge/edge-0"), ("ops", b"observer/ops")])
def test_mtls_reads_identity_and_role(server, test_pki, name, expected):
    target, _ = server

    answer = call(tls.secure_channel(target, test_pki.ca, *test_pki.pair(name)))

    assert answer == expected


def test_server_name_is_checked_against_the_certificate(server, test_pki):
    target, probe = server
    port = target.rsplit(":", 1)[1]

    assert (
        call(tls.secure_channel(f"localhost:{port}", test_pki.ca, *test_pki.pair("edge-1"))) == b"edge/edge-1"
    )
    wrong = tls.secure_channel(target, test_pki.ca, *test_pki.pair("edge-1"), server_name="agg.example.org")
    assert refused(wrong, probe) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_refused(server):
    target, probe = server

    assert refused(grpc.insecure_channel(target), probe) == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_refused(server, test_pki):
    target, probe = server
    creds = grpc.ssl_channel_credentials(root_certificates=test_pki.ca.read_bytes())

    assert refused(grpc.secure_channel(target, creds), probe) == grpc.StatusCode.UNAVAILABLE


def test_client_from_foreign_ca_refused(server, test_pki):
    target, probe = server

    channel = tls.secure_channel(target, test_pki.ca, *test_pki.foreign_pair)

    assert refused(channel, probe) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", ["edge-expired", "edge-future"])
def test_client_certificate_outside_its_validity_refused(server, test_pki, name):
    target, probe = server

    channel = tls.secure_channel(target, test_pki.ca, *test_pki.pair(name))

    assert refused(channel, probe) == grpc.StatusCode.UNAVAILABLE


def test_certificate_without_role_is_unknown(test_pki):
    with pytest.raises(tls.UnknownRole, match="0 role URIs"):
        tls.identity_from_pem(test_pki.ca.read_bytes())
    with pytest.raises(tls.UnknownRole, match="does not parse"):
        tls.identity_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def forged_pem(test_pki, cn: str, ou: str, uris: list[str]) -> bytes:
    """A certificate signed by the federation CA whose subject and URIs are chosen freely."""
    ca_key = serialization.load_pem_private_key((test_pki.dir / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(test_pki.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("cn", "ou", "uris", "match"),
    [
        ("edge-9", "edge", ["fedocr://observer/edge-9"], "disagrees"),
        ("edge-9", "edge", ["fedocr://edge/edge-8"], "disagrees"),
        ("edge-9", "edge", ["fedocr://edge/edge-9", "fedocr://observer/edge-9"], "2 role URIs"),
        ("edge-9", "admin", ["fedocr://admin/edge-9"], "0 role URIs"),
    ],
)
def test_ambiguous_certificates_name_no_role(test_pki, cn, ou, uris, match):
    with pytest.raises(tls.UnknownRole, match=match):
        tls.identity_from_pem(forged_pem(test_pki, cn, ou, uris))


def test_consistent_forged_certificate_is_read(test_pki):
    pem = forged_pem(test_pki, "ops-2", "observer", ["fedocr://observer/ops-2", "https://example.org"])

    assert tls.identity_from_pem(pem) == tls.Identity(name="ops-2", role="observer")


def test_peer_identity_refuses_a_plaintext_context():
    class Plain:
        def auth_context(self):
            return {}

    with pytest.raises(tls.UnknownRole, match="not on TLS"):
        tls.peer_identity(Plain())


def test_missing_file_is_named(test_pki, tmp_path):
    missing = tmp_path / "nope.key"

    with pytest.raises(tls.CredentialsError, match=r"cannot read private key .*nope\.key"):
        tls.channel_credentials(test_pki.ca, test_pki.cert("edge-0"), missing)


def test_not_a_certificate_is_named(test_pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")

    with pytest.raises(tls.CredentialsError, match=r"CA certificate .*junk\.pem is not a PEM certificate"):
        tls.server_credentials(*test_pki.pair("aggregator"), junk)


def test_key_of_another_certificate_refused(test_pki):
    with pytest.raises(tls.CredentialsError, match="does not match"):
        tls.channel_credentials(test_pki.ca, test_pki.cert("edge-0"), test_pki.key("edge-1"))
