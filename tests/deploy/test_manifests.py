"""deploy/: the Kubernetes manifests against the bundled schemas (offline), and what FedOCR needs of them."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import shlex
import socket
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate import utils as kv_utils

from aggregator.config import AggregatorConfig
from aggregator.server import start
from fedocr import pki, tls

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
README = ROOT / "docs" / "deployment.md"
# A Kubernetes release whose schemas kubernetes-validate bundles (it ships 1.25 to 1.37).
K8S_VERSION = "1.33.0"
NAMESPACE = "fedocr"
FEDERATION_KEY = "federation.key"

Doc = dict[str, Any]


def _load() -> list[tuple[Path, Doc]]:
    found = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


DOCS = _load()
RESOURCES = [(p, d) for p, d in DOCS if d.get("kind") != "Kustomization"]


def _one(kind: str, name: str | None = None) -> Doc:
    hits = [d for _, d in RESOURCES if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _jobs(prefix: str) -> list[Doc]:
    return [d for _, d in RESOURCES if d["kind"] == "Job" and d["metadata"]["name"].startswith(prefix)]


def _pod_spec(doc: Doc) -> Doc:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _flag(args: list[str], name: str) -> str:
    """The value after ``name`` in an argument list (exactly once)."""
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def _source(pod: Doc, container: Doc, path: str) -> tuple[str, str]:
    """Which volume provides ``path`` in ``container``: (volume kind, secret key or claim name).

    Raises AssertionError when no mount covers the path, or a secret mount does not expose it.
    """
    target = PurePosixPath(path)
    covering = [
        m
        for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents
    ]
    assert covering, f"nothing is mounted at {path}"
    mount = max(covering, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    if "persistentVolumeClaim" in volume:
        return "pvc", volume["persistentVolumeClaim"]["claimName"]
    source = volume.get("secret") or volume.get("configMap")
    assert source is not None, f"{path} comes from an unexpected volume {volume}"
    kind = "secret" if "secret" in volume else "configMap"
    relative = mount.get("subPath") or str(target.relative_to(mount["mountPath"]))
    items = {item["path"]: item["key"] for item in source.get("items", [])}
    if not items:
        return kind, relative
    assert relative in items, f"{path}: the {kind} volume {volume['name']} does not expose {relative}"
    return kind, items[relative]


def _service_target() -> str:
    service = _one("Service", "fedocr-aggregator")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    return f"{service['metadata']['name']}:{port['port']}"


def _aggregator() -> tuple[Doc, Doc, Doc]:
    """(StatefulSet, pod spec, container) of the aggregator."""
    sts = _one("StatefulSet", "fedocr-aggregator")
    pod = _pod_spec(sts)
    (container,) = pod["containers"]
    return sts, pod, container


def _config_toml() -> str:
    return _one("ConfigMap", "fedocr-aggregator-config")["data"]["aggregator.toml"]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> AggregatorConfig:
    """The ConfigMap's TOML, loaded by the aggregator's own loader from a file."""
    path = tmp_path_factory.mktemp("config") / "aggregator.toml"
    path.write_text(_config_toml())
    return AggregatorConfig.load(path)


def _dockerfile_runs(path: Path) -> list[str]:
    """The RUN instructions of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [ln.strip()[4:] for ln in text.splitlines() if ln.strip().upper().startswith("RUN ")]


def _readme_commands(program: str) -> list[list[str]]:
    """Commands in docs/deployment.md that invoke ``program``, continuation lines joined, as argv."""
    text = re.sub(r"\\\n\s*", " ", README.read_text())
    return [
        shlex.split(line[line.index(program) :])
        for line in text.splitlines()
        if re.search(rf"(^|[\s/]){re.escape(program)}\s", line) and not line.lstrip().startswith("`")
    ]


def _pki_hosts() -> list[str]:
    (server,) = [c for c in _readme_commands("fedocr-pki") if c[1] == "server" and "fedocr-aggregator" in c]
    return [server[i + 1] for i, word in enumerate(server) if word == "--host"]


# Schemas


def test_the_schemas_are_bundled_for_the_chosen_version() -> None:
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    assert (schemas / f"v{K8S_VERSION}-local-strict" / "statefulset-apps-v1.json").is_file()
    assert K8S_VERSION in kv_utils.all_versions()


@pytest.mark.parametrize(
    "doc",
    [d for _, d in RESOURCES],
    ids=[f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in RESOURCES],
)
def test_every_document_validates_offline(doc: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_: Any) -> None:
        raise AssertionError("schema validation tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION.rsplit(".", 1)[0]
    assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE or doc["kind"] == "Namespace"


def test_strict_validation_catches_a_misspelt_nested_field() -> None:
    sts = yaml.safe_load(yaml.safe_dump(_aggregator()[0]))
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", [K8S, K8S / "tiers"], ids=["root", "tiers"])
def test_kustomization_lists_the_long_lived_manifests(directory: Path) -> None:
    (kustomization,) = [d for p, d in DOCS if d.get("kind") == "Kustomization" and p.parent == directory]
    listed = set(kustomization["resources"])

    assert kustomization["namespace"] == NAMESPACE
    assert listed == {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}


def test_leaves_load_as_leaves_of_the_root_service_with_their_own_certificate() -> None:
    sts = _one("StatefulSet", "fedocr-leaf")
    pod = _pod_spec(sts)
    (container,) = pod["containers"]
    toml = _one("ConfigMap", "fedocr-leaf-config")["data"]["leaf.toml"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert container["command"][-1] == mount["mountPath"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name"}
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    # the pod's own name, substituted by the kubelet, names its leaf certificate
    cert = Path(args["--root-cert"].replace("$(POD_NAME)", "fedocr-leaf-0"))
    key = Path(args["--root-key"].replace("$(POD_NAME)", "fedocr-leaf-0"))
    config = AggregatorConfig.load(None, **_toml_values(toml), root_cert=cert, root_key=key)
    assert config.root == f"{_one('Service', 'fedocr-aggregator')['metadata']['name']}:50051"
    assert config.state_dir == Path(_volume_mount(container, "state"))
    assert cert.parent == Path(_volume_mount(container, "tls"))
    assert sts["spec"]["serviceName"] == _one("Service", "fedocr-leaf")["metadata"]["name"]


def _toml_values(text: str) -> dict[str, Any]:
    """A config TOML's keys as AggregatorConfig fields (what AggregatorConfig.load reads)."""
    import tomllib

    from aggregator.config import RENAMED

    doc = tomllib.loads(text)
    return {RENAMED.get((s, k), k): v for s, table in doc.items() for k, v in table.items()}


def _volume_mount(container: Doc, name: str) -> str:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == name]
    return mount["mountPath"]


# Images


def test_aggregator_image_never_installs_torch_or_extras() -> None:
    runs = _dockerfile_runs(DEPLOY / "Dockerfile.aggregator")
    installs = [r for r in runs if "pip install" in r]

    assert installs == ["pip install ."]
    assert not any("torch" in r or "[" in r for r in runs)


def test_edge_image_installs_the_pinned_torch_before_the_recognizer() -> None:
    make_pin = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    installs = [r for r in _dockerfile_runs(DEPLOY / "Dockerfile.edge") if "pip install" in r]

    assert make_pin is not None
    assert installs == [f"pip install {make_pin.group(1)}", 'pip install ".[recognizer]"']


@pytest.mark.parametrize("name", ["Dockerfile.aggregator", "Dockerfile.edge"])
def test_images_run_as_the_fixed_non_root_user(name: str) -> None:
    users = re.findall(r"^USER\s+(\S+)", (DEPLOY / name).read_text(), re.M)
    pod = _aggregator()[1]

    assert users == [f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"]


def test_dockerignore_keeps_secrets_and_state_out_of_the_build() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())

    assert {".git", ".venv", "runs/", "**/*.key", "**/*.pem", "**/*.lmdb"} <= patterns


# Aggregator


def _assert_locked_down(pod: Doc, container: Doc) -> None:
    """Non-root, no privilege escalation, no capabilities: what the namespace's `restricted` level asks."""
    context = pod["securityContext"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_aggregator_runs_non_root_with_a_read_only_root() -> None:
    sts, pod, container = _aggregator()

    _assert_locked_down(pod, container)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert sts["spec"]["replicas"] == 1  # one writer per LMDB state directory
    assert sts["spec"]["serviceName"] == _one("Service", sts["spec"]["serviceName"])["metadata"]["name"]
    assert _one("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_state_dir_is_the_volume_claim_template(config: AggregatorConfig) -> None:
    sts, _, container = _aggregator()
    templates = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    assert mounts.get(str(config.state_dir)) in templates


def test_config_listens_on_all_interfaces_on_the_service_port(config: AggregatorConfig) -> None:
    _, _, container = _aggregator()
    service = _one("Service", "fedocr-aggregator")
    host, port = config.listen.rsplit(":", 1)
    (container_port,) = container["ports"]

    assert host in ("0.0.0.0", "[::]")
    assert int(port) == container_port["containerPort"]
    assert service["spec"]["ports"][0]["targetPort"] in (container_port["name"], int(port))
    assert service["spec"]["selector"].items() <= _pod_labels(_aggregator()[0]).items()


def _pod_labels(doc: Doc) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_config_is_mounted_where_the_image_reads_it() -> None:
    _, pod, container = _aggregator()
    entrypoint = re.search(r"^ENTRYPOINT\s+(.+)$", (DEPLOY / "Dockerfile.aggregator").read_text(), re.M)

    assert entrypoint is not None
    config_path = _flag(yaml.safe_load(entrypoint.group(1)), "--config")
    assert _source(pod, container, config_path) == ("configMap", "aggregator.toml")


def test_tls_paths_are_files_of_the_aggregator_secret(config: AggregatorConfig) -> None:
    _, pod, container = _aggregator()

    for path in (config.cert, config.key, config.ca):
        assert path is not None and _source(pod, container, str(path))[0] == "secret"


def test_the_aggregator_never_gets_the_federation_key() -> None:
    _, pod, container = _aggregator()
    secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
    (command,) = [c for c in _readme_commands("kubectl") if "fedocr-aggregator-tls" in c and "create" in c]

    assert secrets, "the aggregator mounts no secret"
    for secret in secrets:
        assert secret.get("items"), "mount an explicit list of files, never the whole secret"
        assert all(FEDERATION_KEY not in (i["key"], i["path"]) for i in secret["items"])
    assert not any(FEDERATION_KEY in word for word in command)
    assert not any(FEDERATION_KEY in str(m) for m in container["volumeMounts"])


# Edges and observer


def test_edge_jobs_reach_the_service_with_their_own_shard_and_credentials() -> None:
    jobs = _jobs("edge-")
    target = _service_target()
    claims, secrets = set(), set()

    assert len(jobs) >= 2
    for job in jobs:
        pod = _pod_spec(job)
        (container,) = pod["containers"]
        args = container["args"]
        _assert_locked_down(pod, container)
        assert pod["restartPolicy"] in ("OnFailure", "Never")  # the API server's rule for Jobs
        assert _flag(args, "--server") == target
        kind, claim = _source(pod, container, _flag(args, "--shard"))
        assert kind == "pvc"
        claims.add(claim)
        sources = {_source(pod, container, _flag(args, f)) for f in ("--key", "--cert", "--cert-key", "--ca")}
        assert ("secret", FEDERATION_KEY) in sources and {kind for kind, _ in sources} == {"secret"}
        secrets |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert _flag(args, "--server-name") in _pki_hosts()
    assert len(claims) == len(jobs) and len(secrets) == len(jobs)


def test_readme_server_certificate_names_the_service() -> None:
    service = _one("Service", "fedocr-aggregator")["metadata"]["name"]

    assert {service, f"{service}.{NAMESPACE}.svc"} <= set(_pki_hosts())


def test_observer_lists_rounds_over_mtls() -> None:
    (job,) = _jobs("fedocr-observer")
    pod = _pod_spec(job)
    (container,) = pod["containers"]
    args = container["args"]

    _assert_locked_down(pod, container)
    assert args[-2:] == [_service_target(), "fedocr.v1.Federation/ListRounds"]
    for flag in ("-cacert", "-cert", "-key"):
        assert _source(pod, container, _flag(args, flag))[0] == "secret"


def test_the_readme_certificate_serves_every_name_clients_check(
    config: AggregatorConfig, tmp_path: Path
) -> None:
    """The ConfigMap's settings with a PKI made as docs/deployment.md says: edges (--server-name) and the
    Service name both verify the server certificate and get grpc.health.v1 SERVING."""
    pki.create_ca(tmp_path)
    cert, key = pki.issue(tmp_path, pki.ROLE_SERVER, "aggregator", hosts=_pki_hosts())
    pki.issue(tmp_path, pki.ROLE_EDGE, "edge-0")
    ca = tmp_path / pki.CA_CERT_FILE
    local = dataclasses.replace(
        config, listen="127.0.0.1:0", state_dir=tmp_path / "state", cert=cert, key=key, ca=ca
    )
    edge_server_name = _flag(_pod_spec(_jobs("edge-")[0])["containers"][0]["args"], "--server-name")
    running = start(local)
    try:
        for name in (edge_server_name, _service_target().split(":")[0]):
            channel = tls.secure_channel(
                f"127.0.0.1:{running.port}",
                ca,
                pki.cert_path(tmp_path, "edge-0"),
                pki.key_path(tmp_path, "edge-0"),
                server_name=name,
            )
            with channel:
                stub = health_pb2_grpc.HealthStub(channel)
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        running.stop(grace=0.5)
