"""Error feedback: what a lossy upload drops reaches the aggregator later, and survives a restart."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.feedback import Residual
from fedocr import encodings
from fedocr.v1 import federation_pb2 as pb

I4 = pb.ENCODING_INT4_QUANTIZED
FINGERPRINT = b"\x07" * 32


def rounds_of_uploads(path, feedback: bool, rounds: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the increments an edge trained and of what the aggregator decoded, over ``rounds``."""
    rng = np.random.default_rng(1)
    residual = Residual(path, 4096, FINGERPRINT)
    trained, received = np.zeros(4096), np.zeros(4096)
    for _ in range(rounds):
        increment = (rng.standard_normal(4096) * 1e-3 + 2e-4).astype(np.float32)
        sent = residual.add_to(increment) if feedback else increment
        _, decoded = encodings.encode(sent, I4)
        if feedback:
            residual.keep(sent, decoded)
        trained += increment
        received += decoded
    return trained, received


def test_feedback_bounds_the_total_error_by_one_rounds_quantization(tmp_path):
    trained, with_fb = rounds_of_uploads(tmp_path / "a.npz", feedback=True)
    _, without = rounds_of_uploads(tmp_path / "b.npz", feedback=False)

    err_fb = np.abs(with_fb - trained).mean()
    err_plain = np.abs(without - trained).mean()
    # With feedback the sums differ by the last residual only; without, the errors pile up.
    assert err_fb < err_plain / 3, (err_fb, err_plain)
    last = Residual(tmp_path / "a.npz", 4096, FINGERPRINT).values
    np.testing.assert_allclose(with_fb + last, trained, atol=1e-5)


def test_the_residual_survives_a_restart_and_only_for_its_model(tmp_path):
    path = tmp_path / "residual.npz"
    first = Residual(path, 10, FINGERPRINT)
    assert not first.values.any() and not path.exists()
    sent = np.linspace(-1, 1, 10).astype(np.float32)
    first.keep(sent, np.round(sent, 1))

    again = Residual(path, 10, FINGERPRINT)
    np.testing.assert_array_equal(again.values, sent - np.round(sent, 1))
    assert not (tmp_path / "residual.npz.tmp").exists()
    # Another model (fingerprint or length) starts from zero.
    assert not Residual(path, 10, b"\x08" * 32).values.any()
    assert not Residual(path, 11, FINGERPRINT).values.any()
    again.clear()
    assert not path.exists() and not again.values.any()


@pytest.mark.parametrize("content", [b"", b"not a numpy file", b"PK\x03\x04broken"])
def test_an_unreadable_residual_starts_from_zero(tmp_path, content):
    path = tmp_path / "residual.npz"
    path.write_bytes(content)

    assert not Residual(path, 10, FINGERPRINT).values.any()
