"""The federation PKI: what goes into each certificate, file modes, and the fedocr-pki CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedocr import pki, tls


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_server_certificate_names_its_hosts_and_role(test_pki):
    cert = load(test_pki.cert("aggregator"))

    names = sans(cert)
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["fedocr://server/aggregator"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(load(test_pki.ca))


@pytest.mark.parametrize(("name", "role"), [("edge-0", "edge"), ("ops", "observer")])
def test_client_certificates_carry_identity_and_role(test_pki, name, role):
    cert = load(test_pki.cert(name))

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [f"fedocr://{role}/{name}"]
    assert tls.identity_from_pem(test_pki.cert(name).read_bytes()) == tls.Identity(name=name, role=role)
    cert.verify_directly_issued_by(load(test_pki.ca))


def test_ca_is_a_ca(test_pki):
    ca = load(test_pki.ca)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_private_keys_are_owner_only(test_pki):
    for path in (test_pki.dir / "ca.key", test_pki.key("edge-0"), test_pki.key("aggregator")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_validity_dates_are_settable(tmp_path):
    start = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    end = dt.datetime(2030, 2, 3, tzinfo=dt.UTC)
    pki.create_ca(tmp_path)

    cert_file, _ = pki.issue(tmp_path, "edge", "e", not_before=start, not_after=end)

    cert = load(cert_file)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    with pytest.raises(pki.PkiError, match="is not after"):
        pki.issue(tmp_path, "edge", "f", not_before=end, not_after=start)


def test_existing_files_are_not_overwritten(tmp_path):
    pki.create_ca(tmp_path)
    first = (tmp_path / "ca.pem").read_bytes()

    with pytest.raises(pki.PkiError, match="ca.pem already exists"):
        pki.create_ca(tmp_path)
    pki.create_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != first


@pytest.mark.parametrize(
    ("role", "name", "hosts", "match"),
    [
        ("admin", "x", (), "unknown role 'admin'"),
        ("edge", "../etc", (), "bad name"),
        ("edge", "ca", (), "bad name"),
        ("edge", "e", ("localhost",), "only a server"),
        ("server", "s", (), "at least one --host"),
    ],
)
def test_bad_requests_are_refused(tmp_path, role, name, hosts, match):
    pki.create_ca(tmp_path)

    with pytest.raises(pki.PkiError, match=match):
        pki.issue(tmp_path, role, name, hosts)


def test_issue_without_ca_says_so(tmp_path):
    with pytest.raises(pki.PkiError, match="no CA in .*fedocr-pki init"):
        pki.issue(tmp_path, "edge", "edge-0")


def test_role_uri_round_trip():
    assert pki.parse_role_uri(pki.role_uri("edge", "edge-3")) == ("edge", "edge-3")
    assert pki.parse_role_uri("fedocr://admin/x") is None
    assert pki.parse_role_uri("spiffe://edge/x") is None


def test_cli_builds_a_pki(tmp_path, capsys):
    d = str(tmp_path)

    assert pki.main(["init", "--dir", d]) == 0
    assert (
        pki.main(
            ["server", "--dir", d, "--name", "aggregator", "--host", "127.0.0.1", "--host", "agg.example.org"]
        )
        == 0
    )
    assert pki.main(["edge", "--dir", d, "--name", "edge-0"]) == 0
    assert pki.main(["observer", "--dir", d, "--name", "ops"]) == 0

    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == [
        "ca.pem",
        "ca.key",
        "aggregator.pem",
        "aggregator.key",
        "edge-0.pem",
        "edge-0.key",
        "ops.pem",
        "ops.key",
    ]
    server = load(tmp_path / "aggregator.pem")
    assert sans(server).get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert tls.identity_from_pem((tmp_path / "ops.pem").read_bytes()).role == "observer"


def test_cli_errors_are_clear(tmp_path, capsys):
    d = str(tmp_path)

    assert pki.main(["edge", "--dir", d, "--name", "edge-0"]) == 1
    assert "no CA in" in capsys.readouterr().err
    pki.main(["init", "--dir", d])
    assert pki.main(["init", "--dir", d]) == 1
    assert "already exists" in capsys.readouterr().err
    assert pki.main(["init", "--dir", d, "--force"]) == 0
