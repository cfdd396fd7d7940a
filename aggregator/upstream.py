"""A leaf aggregator's link to its root: the second tier (docs/aggregator.md, "Two tiers").

A leaf serves its own edges like any aggregator, but its rounds are the root's. This relay, one
thread, is the leaf's only client of the root, and to the root it is one participant (role leaf):

1. once an edge has joined the leaf (so the leaf knows the model's manifest), it joins the root
   with that manifest; the root answers with its round (index, plan) and state version;
2. when the leaf holds no round yet, or another state version, it downloads the root's state and
   the leaf adopts it with the root's round (RoundCoordinator.adopt): its edges train from it;
3. when the leaf's quorum (or deadline) closes its round, it uploads the round's weighted sum in
   float64 with the sum of its weights as sample_count: the root adds it as it is, as if every
   edge had uploaded there;
4. it joins the root again, which answers once the root's round closed, and goes back to 2.

Everything the leaf acknowledged is durable in its own store; the relay only reads it. A leaf
killed mid-round resumes its round; one killed after handing its sum up sends it again, and the
root's ALREADY_EXISTS for a counted upload is taken as done (FederationClient.send).
"""

from __future__ import annotations

import logging
import threading

import grpc

from aggregator import messages
from aggregator.coordinator import RoundCoordinator
from aggregator.rounds import Forward, UpstreamRound
from fedocr import retry, tls
from fedocr.client import Endpoint, FederationClient, encode_tensors, upload_header
from fedocr.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)

JOIN_WAIT_S = 20  # the root long-polls a Join this long at most
SUM_WAIT_S = 5.0  # how long the relay waits for the leaf's sum before asking the root again
RETRY_S = 2.0  # after an error the relay logs it and starts over this much later
UPLOAD_CHUNK_ELEMS = 1 << 17  # float64 values per chunk: 1 MiB raw


class Upstream:
    """The relay thread of a leaf aggregator (``start``/``stop``)."""

    def __init__(self, coordinator: RoundCoordinator, endpoint: Endpoint) -> None:
        self._rounds = coordinator
        self._client = FederationClient(endpoint, retry.RetryPolicy())
        self.name = tls.identity_from_pem(endpoint.cert.read_bytes()).name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # leaf round id -> True once the root acknowledged its sum, False when it refused it (its
        # round had closed); what this process saw, for the leaf's round record (adopt)
        self._outcome: dict[int, bool] = {}

    def start(self) -> None:
        """Run the relay in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the call in progress (a long-poll ends within JOIN_WAIT_S)."""
        self._stop.set()
        self._client.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failing = ""
        while not self._stop.is_set():
            try:
                if not self._step():
                    logger.info("the root's federation is over; the relay stops")
                    return
                failing = ""
            except Exception as exc:  # the relay must survive a root that restarts or refuses
                if self._stop.is_set():
                    return
                if repr(exc) != failing:
                    logger.warning("relay to the root failed (retrying every %s s): %s", RETRY_S, exc)
                    failing = repr(exc)
                self._stop.wait(RETRY_S)

    def _step(self) -> bool:
        """One exchange with the root; False once the root's federation finished."""
        manifest = self._rounds.wait_manifest(1.0)
        if manifest is None:
            return True
        reply = self._client.join_manifest(
            messages.manifest_message(manifest), self._rounds.state_version, JOIN_WAIT_S
        )
        if reply.action == pb.JoinResponse.ACTION_WAIT:
            return True
        finished = reply.action == pb.JoinResponse.ACTION_FINISHED
        if finished or self._rounds.needs_state(reply.state_version):
            download = self._client.download(0)
            if download is None or download.version != reply.state_version:
                return True  # the root moved on meanwhile: ask again
            root = UpstreamRound(
                reply.round_index, reply.total_rounds, messages.plan_from(reply.plan), finished
            )
            counted = self._outcome.get(self._rounds.current_round_id())
            self._rounds.adopt(root, download.vector, download.version, counted)
            return not finished
        forward = self._rounds.wait_forwardable(SUM_WAIT_S)
        if forward is not None and forward.state_version == reply.state_version:
            self._forward(reply.round_id, forward, manifest.fingerprint, manifest.tensors)
        return True

    def _forward(
        self, root_round: int, forward: Forward, fingerprint: bytes, specs: tuple[tuple[int, int, bool], ...]
    ) -> None:
        """Upload the leaf's round sum to the root's round ``root_round``."""
        header = upload_header(
            root_round, forward.weight, fingerprint, pb.ENCODING_FLOAT64, forward.state_version
        )
        encoder = encode_tensors(forward.total, specs, pb.ENCODING_FLOAT64, chunk_elems=UPLOAD_CHUNK_ELEMS)
        try:
            sent = self._client.send(header, encoder, self.name)
        except grpc.RpcError as exc:
            if retry.status_code(exc) in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                # the root's round closed first: the next Join brings its new state
                logger.warning("root round %s took no sum from this leaf: %s", root_round, exc.details())
                self._outcome.setdefault(forward.round_id, False)
                return
            raise
        self._outcome[forward.round_id] = True
        logger.info(
            "leaf round %s: sum of %s upload(s), weight %s, forwarded to root round %s (%s wire bytes)",
            forward.round_id,
            forward.uploads,
            forward.weight,
            root_round,
            sent.moved.wire,
        )
