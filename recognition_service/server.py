"""The `recognition_service` server: a recognition service over mutual TLS that reads one word image per call.

Requests are batched: a worker thread takes the requests waiting (up to ``max_batch``, waiting at most
``max_wait_s`` for more after the first) and reads them in one greedy pass. With a model made by
`recognizer encrypt-model` the service reads images the client encrypted with the image key; it
never needs, and never gets, a plain image (a plain image is read as noise). Health and reflection
are served beside it, as by the aggregator, so grpcurl can list and call it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import queue
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image, UnidentifiedImageError

from fedocr import tls
from fedocr.v1 import recognition_pb2 as pb
from fedocr.v1 import recognition_pb2_grpc as pb_grpc
from recognizer.dataset import array_to_tensor, image_to_array
from recognizer.model import Recognizer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recognition"].full_name  # "fedocr.v1.Recognition"
MAX_IMAGE_BYTES = 4 << 20
MAX_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
READ_TIMEOUT_S = 60.0


class BadImage(ValueError):
    """A request's image cannot be read (INVALID_ARGUMENT)."""


@dataclass
class _Job:
    tensor: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    confidence: float = 0.0
    batch: int = 0
    error: BaseException | None = None


class Reader:
    """Reads images for many callers in batches on one worker thread."""

    def __init__(self, model: Recognizer, max_batch: int = 16, max_wait_s: float = 0.005,
                 encrypted: bool = False) -> None:  # fmt: skip
        self.model = model.eval()
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.encrypted = encrypted  # images must come at the model's input size (encrypted after resizing)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="reader", daemon=True)
        self._worker.start()

    def tensor(self, data: bytes) -> torch.Tensor:
        """The model's input tensor of an encoded image. Raises BadImage saying what is wrong."""
        if not data:
            raise BadImage("the request holds no image")
        if len(data) > MAX_IMAGE_BYTES:
            raise BadImage(f"the image is {len(data)} bytes, more than {MAX_IMAGE_BYTES}")
        try:
            with Image.open(io.BytesIO(data)) as image:
                size = f"{image.width}x{image.height}"
                if image.width * image.height > MAX_PIXELS:
                    raise BadImage(f"the image is {size}, more than {MAX_PIXELS} pixels")
                h, w = self.model.config.input_hw
                if self.encrypted and (image.height, image.width) != (h, w):
                    raise BadImage(f"the image is {size}; this model reads images encrypted at its "
                                   f"input size, {w}x{h}")  # fmt: skip
                pixels = image_to_array(image, (h, w), self.model.config.keep_aspect)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, BadImage):
                raise
            raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from None
        return array_to_tensor(pixels)

    def read(self, tensor: torch.Tensor, timeout: float = READ_TIMEOUT_S) -> tuple[str, float, int]:
        """(text, confidence, batch size) of one input tensor, read with whatever else is waiting."""
        job = _Job(tensor)
        self._jobs.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:.0f} s")
        if job.error is not None:
            raise job.error
        return job.text, job.confidence, job.batch

    def read_batch(self, images: torch.Tensor) -> list[tuple[str, float]]:
        """Greedy texts and confidences of a stacked batch, on the calling thread."""
        ids, logps = self.model.predict_scored(images, beam_width=1)
        return [(self.model.alphabet.decode(i), math.exp(lp)) for i, lp in zip(ids, logps, strict=True)]

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = self._jobs.get(timeout=self.max_wait_s)
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                jobs.append(job)
            try:
                results = self.read_batch(torch.stack([j.tensor for j in jobs]))
                for job, (text, confidence) in zip(jobs, results, strict=True):
                    job.text, job.confidence, job.batch = text, confidence, len(jobs)
            except Exception as exc:  # every caller of the batch hears of it; the worker goes on
                log.exception("reading a batch of %d failed", len(jobs))
                for job in jobs:
                    job.error = exc
            for job in jobs:
                job.done.set()

    def stop(self) -> None:
        """Finish the batches queued, then end the worker."""
        self._jobs.put(None)
        self._worker.join(timeout=30)


class RecognitionServicer(pb_grpc.RecognitionServicer):
    """Recognize: one image in, its text, confidence and the model's fingerprint out."""

    def __init__(self, reader: Reader, fingerprint: str) -> None:
        self.reader, self.fingerprint = reader, fingerprint

    def Recognize(self, request: pb.RecognizeRequest, context: grpc.ServicerContext) -> pb.RecognizeResponse:
        try:
            tensor = self.reader.tensor(request.image)
        except BadImage as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            text, confidence, batch = self.reader.read(tensor)
        except TimeoutError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch: say so, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"reading failed: {type(exc).__name__}: {exc}")
        return pb.RecognizeResponse(text=text, confidence=confidence, model_fingerprint=self.fingerprint,
                                    batch_size=batch)  # fmt: skip


@dataclass
class Serving:
    """A started service: the server, its port, the reader and the health servicer."""

    server: grpc.Server
    port: int
    reader: Reader
    health: health.HealthServicer

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, let those in flight finish within ``grace``, then end the reader."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.reader.stop()


def model_file_fingerprint(path: Path) -> str:
    """SHA-256 (hex) of a model file's bytes: which model answered."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def start(
    model: Recognizer, fingerprint: str, listen: str, cert: Path, key: Path, ca: Path, *,
    encrypted: bool = False, max_batch: int = 16, max_wait_s: float = 0.005, workers: int = 16,
) -> Serving:  # fmt: skip
    """Serve ``model`` on ``listen`` over mutual TLS (clients need a certificate of ``ca``)."""
    reader = Reader(model, max_batch, max_wait_s, encrypted)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=[("grpc.max_receive_message_length", MAX_IMAGE_BYTES + 1024),
                                  ("grpc.so_reuseport", 0)])  # fmt: skip
    pb_grpc.add_RecognitionServicer_to_server(RecognitionServicer(reader, fingerprint), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(listen, tls.server_credentials(cert, key, ca))
    if port == 0:
        reader.stop()
        raise OSError(f"cannot listen on {listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Serving(server, port, reader, health_servicer)


def encrypted_input(pixels: np.ndarray) -> bytes:
    """PNG bytes of an encrypted uint8 [H, W, 3] image: what a client sends (lossless, so the key's
    transformation of the model stays exact)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["SERVICE_NAME", "BadImage", "Reader", "Serving", "encrypted_input", "model_file_fingerprint",
           "start"]  # fmt: skip
