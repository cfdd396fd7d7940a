"""`recognition_service` as a real process over mutual TLS: it reads images encrypted with the image key as
the plain model reads the plain ones, batches concurrent callers, refuses bad images with
INVALID_ARGUMENT and keeps serving, refuses clients without a certificate of the CA, and answers
grpcurl through reflection and health."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from fedocr import harness, tls
from fedocr.v1 import recognition_pb2 as pb
from fedocr.v1 import recognition_pb2_grpc as pb_grpc
from recognition_service.server import encrypted_input
from recognizer import state
from recognizer.dataset import array_to_tensor, image_to_array
from recognizer.image_crypt import BlockCipher, encrypt_model, image_key_fingerprint
from recognizer.keys import generate_key, load_key
from recognizer.lmdb_data import LmdbReader
from recognizer.model import build_model
from recognizer.model_io import save_model
from recognizer.synth import render_dataset

VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(300)


@dataclass
class Service:
    port: int
    model: torch.nn.Module  # the plain model the encrypted one was made from
    cipher: BlockCipher
    words: list[np.ndarray]  # plain images at the model's input size
    fingerprint: str


@pytest.fixture(scope="module")
def service(test_pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("serve")
    fed_key, image_key = tmp / "model.key", tmp / "image.key"
    generate_key(fed_key)
    generate_key(image_key)
    key = load_key(fed_key)
    torch.manual_seed(2)
    model = build_model("vitstr-tiny", key, 0.5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain_fp = state.fingerprint(build_model("vitstr-tiny", key, None), key)
    extra = {"image_key": image_key_fingerprint(load_key(image_key)), "transforms": "all"}
    encrypted = encrypt_model(model, load_key(image_key))
    save_model(tmp / "enc.npz", encrypted, key, "vitstr-tiny", plain_fp, extra)
    render_dataset(tmp / "words", 6, seed=5, styles=["clean", "blur"], labels="words")
    reader, c = LmdbReader(tmp / "words"), model.config
    words = [image_to_array(reader.get(i)[0], c.input_hw, c.keep_aspect) for i in range(len(reader))]
    cert, cert_key = test_pki.pair("aggregator")  # a server certificate for 127.0.0.1
    cmd = [sys.executable, "-m", "recognition_service.cli", "--model", str(tmp / "enc.npz"), "--key",
           str(fed_key), "--listen", "127.0.0.1:0", "--cert", str(cert), "--cert-key", str(cert_key),
           "--ca", str(test_pki.ca), "--threads", "1"]  # fmt: skip
    running = harness.start_service(cmd, tmp / "serve.log")
    fingerprint = hashlib.sha256((tmp / "enc.npz").read_bytes()).hexdigest()
    try:
        cipher = BlockCipher.for_model(load_key(image_key), model)
        yield Service(running.port, model, cipher, words, fingerprint)
    finally:
        running.stop()


def _stub(test_pki, port: int, client: tuple[Path, Path] | None = None) -> pb_grpc.RecognitionStub:
    cert, key = client or test_pki.pair("edge-0")
    return pb_grpc.RecognitionStub(tls.secure_channel(f"127.0.0.1:{port}", test_pki.ca, cert, key))


def _request(service: Service, x: np.ndarray) -> pb.RecognizeRequest:
    return pb.RecognizeRequest(image=encrypted_input(service.cipher.encrypt(x)))


def test_it_reads_encrypted_images_as_the_plain_model_reads_the_plain_ones(service: Service, test_pki):
    stub = _stub(test_pki, service.port)
    plain = torch.stack([array_to_tensor(x) for x in service.words])
    ids, logps = service.model.predict_scored(plain, beam_width=1)
    for k, x in enumerate(service.words):
        reply = stub.Recognize(_request(service, x), timeout=60)
        assert reply.text == service.model.alphabet.decode(ids[k])
        assert reply.confidence == pytest.approx(np.exp(logps[k]), rel=1e-3) and 0 < reply.confidence <= 1
        assert reply.model_fingerprint == service.fingerprint and reply.batch_size >= 1


def test_concurrent_callers_are_read_in_batches(service: Service, test_pki) -> None:
    stub = _stub(test_pki, service.port)
    requests = [_request(service, x) for x in service.words] * 4
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda r: stub.Recognize(r, timeout=60), requests))
    assert len(replies) == len(requests)
    texts = {r.text for r in replies[: len(service.words)]}
    assert [r.text for r in replies] == [r.text for r in replies[: len(service.words)]] * 4 and texts
    assert max(r.batch_size for r in replies) > 1


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (b"", "no image"),
        (b"not an image at all", "not a readable image"),
        (_png(Image.new("RGB", (100, 30), "white")), "100x30; this model reads images encrypted"),
    ],
)
def test_bad_images_get_invalid_argument_and_the_service_keeps_serving(service, test_pki, image, says):
    stub = _stub(test_pki, service.port)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recognize(pb.RecognizeRequest(image=image), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in caught.value.details()
    good = stub.Recognize(_request(service, service.words[0]), timeout=60)
    assert good.model_fingerprint == service.fingerprint


def test_clients_without_a_certificate_of_the_ca_are_refused(service: Service, test_pki) -> None:
    bare = grpc.secure_channel(f"127.0.0.1:{service.port}",
                               grpc.ssl_channel_credentials(test_pki.ca.read_bytes()))  # fmt: skip
    foreign = _stub(test_pki, service.port, test_pki.foreign_pair)
    request = _request(service, service.words[0])
    for stub in (pb_grpc.RecognitionStub(bare), foreign):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recognize(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_lists_the_service_and_its_health(service: Service, test_pki) -> None:
    cert, key = test_pki.pair("ops")
    base = [str(VENV_BIN / "grpcurl"), "-cacert", str(test_pki.ca), "-cert", str(cert), "-key", str(key),
            f"127.0.0.1:{service.port}"]  # fmt: skip
    listed = subprocess.run([*base, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "fedocr.v1.Recognition" in listed.stdout.split(), listed.stderr
    health = subprocess.run([*base, "grpc.health.v1.Health/Check"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr


def test_a_missing_model_file_is_named_and_nothing_starts(tmp_path: Path, test_pki) -> None:
    cert, cert_key = test_pki.pair("aggregator")
    missing = tmp_path / "no-model.npz"
    run = subprocess.run([str(VENV_BIN / "recognition_service"), "--model", str(missing), "--cert", str(cert),
                          "--cert-key", str(cert_key), "--ca", str(test_pki.ca)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and f"--model {missing}: no such file" in run.stderr, run.stderr
