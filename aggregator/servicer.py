"""The fedocr.v1.Federation servicer: a thin adapter from RPCs to the RoundCoordinator.

Each method checks the caller's role (from its client certificate), decodes the request, makes
one domain call and encodes the reply. Errors go through the one table in fedocr.errors.

It runs on grpc's asyncio server (aggregator/server.py). The two long-polls, Join and
GetSecureRound, are coroutines: each check of the coordinator runs on a small thread pool and the
wait between checks holds no thread. Every other method is a plain function that the server runs
on its thread pool (``max_workers``): uploads and downloads are CPU and disk work.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from aggregator import messages
from aggregator.coordinator import RoundCoordinator
from aggregator.longpoll import Wakeups
from aggregator.rounds import Bytes
from aggregator.secure.phases import still_waiting
from aggregator.streams import StreamBridge
from fedocr import pki, tls
from fedocr.errors import MalformedRequest, WrongMode, WrongRole, status_for
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["Federation"].full_name + "/"
EDGE_ONLY = frozenset({pki.ROLE_EDGE})
# A leaf aggregator joins, downloads and uploads (its edges' sum) like an edge.
PARTICIPANTS = frozenset({pki.ROLE_EDGE, pki.ROLE_LEAF})
READERS = frozenset({pki.ROLE_EDGE, pki.ROLE_OBSERVER, pki.ROLE_LEAF})


def _caller(context: grpc.ServicerContext, roles: frozenset[str], method: str) -> str:
    """The caller's certificate name; raise WrongRole unless its role may call `method`."""
    who = tls.peer_identity(context)
    if who.role not in roles:
        raise WrongRole(
            f"{who.role} certificate {who.name!r} may not call {method}; "
            f"allowed roles: {', '.join(sorted(roles))}"
        )
    return who.name


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    """Answer with the status the table gives `exc` (INTERNAL, logged, for anything unknown)."""
    if isinstance(exc, grpc.RpcError):  # the client went away mid-stream
        logger.info("%s: stream ended by the peer %s", method, context.peer())
        context.abort(grpc.StatusCode.CANCELLED, "stream cancelled by the client")
    code, details = status_for(exc)
    if code is not grpc.StatusCode.INTERNAL:
        logger.info("%s from %s refused: %s %s", method, context.peer(), code.name, details)
    context.abort(code, details)


async def _abort_async(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    """_abort for a coroutine method."""
    code, details = status_for(exc)
    if code is not grpc.StatusCode.INTERNAL:
        logger.info("%s from %s refused: %s %s", method, context.peer(), code.name, details)
    await context.abort(code, details)


def _unary(roles: frozenset[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a unary-response method: role check, then errors mapped through the table."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def method(self: FederationServicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                caller = _caller(context, roles, fn.__name__)
                return fn(self, caller, request, context)
            except Exception as exc:  # noqa: BLE001 - every error goes through the table
                _abort(context, fn.__name__, exc)

        return method

    return wrap


class FederationServicer(pb_grpc.FederationServicer):
    """Adapter over one RoundCoordinator (and its SecureRounds, for the secure-aggregation RPCs)."""

    def __init__(
        self,
        coordinator: RoundCoordinator,
        wakeups: Wakeups,
        checks: ThreadPoolExecutor,
        work: ThreadPoolExecutor,
    ) -> None:
        self._rounds = coordinator
        self._work = work  # the server's RPC threads: uploads are staged there
        self._wakeups = wakeups
        self._checks = checks  # runs the long-polls' checks: each takes the coordinator's lock briefly
        self._max_wait_s = coordinator.config.join_wait_max_s

    async def _check(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._checks, fn, *args)

    @_unary(READERS)
    def GetRound(
        self, caller: str, request: pb.GetRoundRequest, context: grpc.ServicerContext
    ) -> pb.RoundStatus:
        """The current round (round_id 0) or a past one."""
        return messages.round_status(self._rounds.round_status(request.round_id))

    @_unary(READERS)
    def ListRounds(
        self, caller: str, request: pb.ListRoundsRequest, context: grpc.ServicerContext
    ) -> pb.ListRoundsResponse:
        """Every round with byte accounting, and the totals."""
        return messages.list_rounds(*self._rounds.all_rounds())

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        """Long-poll for work: the coordinator answers at once; a WAIT waits here for a change."""
        try:
            caller = _caller(context, PARTICIPANTS, "Join")
            if self._rounds.config.secure_aggregation and tls.peer_identity(context).role == pki.ROLE_LEAF:
                raise WrongMode("this federation runs secure aggregation: it takes no leaf aggregators")
            manifest = messages.manifest_from(request.manifest)
            result = await self._wakeups.poll(
                lambda: self._check(self._rounds.join, caller, manifest, 0.0),
                lambda answer: answer.action == "WAIT",
                min(float(request.wait_seconds), self._max_wait_s),
            )
            return messages.join_response(result)
        except Exception as exc:  # noqa: BLE001 - every error goes through the table
            await _abort_async(context, "Join", exc)

    async def UploadIncrement(
        self, request_iterator: AsyncIterator[pb.UploadMessage], context: grpc.aio.ServicerContext
    ) -> pb.UploadReceipt:
        """Stage, verify and commit one increment; the receipt comes after the fsync.

        The stream is read here, on the loop, and staged by the coordinator on a worker thread."""
        try:
            caller = _caller(context, PARTICIPANTS, "UploadIncrement")
            leaf = tls.peer_identity(context).role == pki.ROLE_LEAF
            bridge = StreamBridge(asyncio.get_running_loop())
            receipt = await bridge.run(
                request_iterator, functools.partial(self._rounds.upload, caller, leaf=leaf), self._work
            )
            return messages.receipt(receipt)
        except asyncio.CancelledError:
            logger.info("UploadIncrement: stream ended by the peer %s", context.peer())
            raise
        except Exception as exc:  # noqa: BLE001 - every error goes through the table
            await _abort_async(context, "UploadIncrement", exc)

    @_unary(EDGE_ONLY)
    def ReportEvaluation(
        self, caller: str, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.EvaluationReceipt:
        """Federated evaluation: keep the edge's scores of a round's result in that round's record."""
        scores = {
            "generic": messages.evaluation_from(request.generic),
            "personal": messages.evaluation_from(request.personal),
        }
        round_id = self._rounds.report_evaluation(caller, request.state_version, scores)
        return pb.EvaluationReceipt(round_id=round_id)

    @_unary(EDGE_ONLY)
    def AdvertiseKeys(
        self, caller: str, request: pb.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> pb.SecureRoundStatus:
        """Secure aggregation: the edge's two public keys for the round."""
        keys = bytes(request.cipher_public), bytes(request.mask_public)
        signed = bytes(request.signature), bytes(request.certificate)
        view = self._rounds.secure.advertise(caller, request.round_id, *keys, _sent(request), signed)
        return self._answer(caller, view)

    @_unary(EDGE_ONLY)
    def ShareKeys(
        self, caller: str, request: pb.ShareKeysRequest, context: grpc.ServicerContext
    ) -> pb.SecureRoundStatus:
        """Secure aggregation: the shares the edge dealt, sealed for its neighbours."""
        sealed, commitments = messages.sealed_from(request, caller)
        view = self._rounds.secure.share(caller, request.round_id, sealed, commitments, _sent(request))
        return self._answer(caller, view)

    async def GetSecureRound(
        self, request: pb.GetSecureRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecureRoundStatus:
        """Secure aggregation: long-poll the round's phase, roster and the caller's sealed shares."""
        try:
            caller = _caller(context, EDGE_ONLY, "GetSecureRound")
            after = messages.phase_name(request.after or pb.SECURE_PHASE_ADVERTISE)
            secure = self._rounds.secure
            view = await self._wakeups.poll(
                lambda: self._check(secure.secure_round, caller, request.round_id, after, 0.0,
                                    request.confirmations),
                lambda v: still_waiting(v, after, request.confirmations),
                min(float(request.wait_seconds), self._max_wait_s),
            )  # fmt: skip
            return await self._check(self._answer, caller, view)
        except Exception as exc:  # noqa: BLE001 - every error goes through the table
            await _abort_async(context, "GetSecureRound", exc)

    @_unary(EDGE_ONLY)
    def RevealShares(
        self, caller: str, request: pb.RevealSharesRequest, context: grpc.ServicerContext
    ) -> pb.SecureRoundStatus:
        """Secure aggregation: the shares a survivor reveals for unmasking."""
        shares = [(s.dealer, messages.kind_name(s.kind), bytes(s.share)) for s in request.shares]
        view = self._rounds.secure.reveal(caller, request.round_id, shares, _sent(request))
        return self._answer(caller, view)

    @_unary(EDGE_ONLY)
    def ConfirmSurvivors(
        self, caller: str, request: pb.ConfirmSurvivorsRequest, context: grpc.ServicerContext
    ) -> pb.SecureRoundStatus:
        """Secure aggregation: a survivor's signature of the survivors and dropped it was shown."""
        view = self._rounds.secure.confirm(caller, request.round_id, bytes(request.signature), _sent(request))
        return self._answer(caller, view)

    def _answer(self, caller: str, view) -> pb.SecureRoundStatus:
        """The reply, its bytes counted as sent down to the caller."""
        reply = messages.secure_status(view)
        size = reply.ByteSize()
        self._rounds.account(caller, Bytes(raw_down=size, wire_down=size))
        return reply

    async def DownloadState(
        self, request: pb.DownloadStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StateChunk]:
        """Stream the global state (header only when the edge holds the current version).

        Each message is taken from the coordinator's stream on a worker thread (encoding a chain
        or a cold state is CPU work); the loop only sends."""
        loop = asyncio.get_running_loop()
        try:
            caller = _caller(context, PARTICIPANTS, "DownloadState")
            stream = await loop.run_in_executor(
                self._work, self._rounds.download, caller, request.held_state_version
            )
            chunks = stream.messages()
            while (message := await loop.run_in_executor(self._work, next, chunks, None)) is not None:
                yield message
        except Exception as exc:  # noqa: BLE001 - every error goes through the table
            await _abort_async(context, "DownloadState", exc)


def _sent(request: Any) -> Bytes:
    """A secure-aggregation request's bytes, counted up (protobuf size: no compression)."""
    size = request.ByteSize()
    return Bytes(raw_up=size, wire_up=size)


async def _parsed_async(
    raw_messages: AsyncIterator[bytes], parse: Callable[[bytes], Any]
) -> AsyncIterator[Any]:
    """Parse a client stream message by message; a malformed one raises MalformedRequest."""
    k = 0
    async for raw in raw_messages:
        try:
            yield parse(raw)
        except DecodeError as exc:
            raise MalformedRequest(f"stream message {k} is not a valid protobuf message: {exc}") from exc
        k += 1


class ParseRequests(grpc.aio.ServerInterceptor):
    """Parse Federation requests inside the method, so malformed bytes get INVALID_ARGUMENT.

    grpc parses a request before the method runs and answers INTERNAL ("Exception deserializing
    request!") when that fails; here the handler takes raw bytes and parses them itself. Plain
    functions stay plain (the server runs them on its thread pool), coroutines stay coroutines.
    """

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if not details.method.startswith(SERVICE_PREFIX):
            return handler
        parse, serialize = handler.request_deserializer, handler.response_serializer
        if handler.stream_unary is not None:
            inner = handler.stream_unary

            async def parsed_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                return await inner(_parsed_async(raws, parse), context)

            return grpc.stream_unary_rpc_method_handler(parsed_stream, None, serialize)

        def parse_or_abort(raw: bytes, context: Any) -> Any:
            try:
                return parse(raw)
            except DecodeError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid protobuf message: {exc}")

        if handler.unary_unary is not None and asyncio.iscoroutinefunction(handler.unary_unary):
            coroutine = handler.unary_unary

            async def parsed_call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request = parse(raw)
                except DecodeError as exc:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"not a valid protobuf message: {exc}"
                    )
                return await coroutine(request, context)

            return grpc.unary_unary_rpc_method_handler(parsed_call, None, serialize)
        if handler.unary_unary is not None:
            unary = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda raw, context: unary(parse_or_abort(raw, context), context), None, serialize
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            generator = handler.unary_stream

            async def parsed_stream_out(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    request = parse(raw)
                except DecodeError as exc:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"not a valid protobuf message: {exc}"
                    )
                async for message in generator(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(parsed_stream_out, None, serialize)
        return handler
