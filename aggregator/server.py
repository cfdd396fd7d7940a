"""Builds and runs the aggregator's gRPC server: Federation, health and reflection, mTLS only.

The server is grpc's asyncio server, on an event loop of its own thread (so ``start`` returns at
once, for the CLI and for tests alike). Long-polls are coroutines and hold no thread; every other
RPC runs on a pool of ``max_workers`` threads (uploads and downloads are CPU and disk work).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.coordinator import RoundCoordinator
from aggregator.longpoll import Wakeups
from aggregator.servicer import FederationServicer, ParseRequests
from aggregator.store import Store
from aggregator.upstream import Upstream
from fedocr import tls
from fedocr.client import Endpoint
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name  # "fedocr.v1.Federation"
# Headroom over the largest chunk (2 MiB raw, plus zstd slack and framing); uploads stream anyway.
MAX_MESSAGE_BYTES = 4 << 20
# Ping each peer with a call in progress after KEEPALIVE_S of silence and drop the connection if the
# ping is not answered within KEEPALIVE_TIMEOUT_S: an edge whose side of a connection vanished (NAT
# or path loss, an address change) would otherwise hold its upload slot, and refuse its own retry as
# ALREADY_EXISTS, until the dead stream's deadline (the edge's 120 s). gRPC 1.85 waits for a ping's
# answer for grpc.http2.ping_timeout_ms (60 s), not keepalive_timeout_ms, so both are set. No limit on
# pings sent while the server sends no data: an upload or a long-polling Join sends none.
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 10, 10
# glibc: buffers from 8 MiB up (staged increments, LMDB's dirty copy of the sum) come straight
# from mmap and go back on free; smaller ones (1 MiB chunks) stay in the heap, which is trimmed
# only past 64 MiB of free top space, so chunks do not page-fault on every message.
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 64 << 20
# grpc core cancels a call that arrived but that the server has not yet taken up after this long
# (grpc.server_max_unrequested_time_in_server; 30 s by default). The asyncio server takes calls up
# one at a time on its loop, so with thousands of edges re-polling at once a call can wait longer:
# 10,000 long-polling edges saw thousands of calls end CANCELLED, which edges do not retry. Past an
# hour the caller's own deadline (an edge's RPC timeout plus its wait) has long expired: the call ends
# DEADLINE_EXCEEDED on the edge, which retries it.
UNREQUESTED_S = 3600
# grpc core also rejects arriving calls while more than grpc.server.max_pending_requests (1,000) are
# waiting to be taken up, with a probability that reaches 1 at the hard limit (3,000): the client sees
# CANCELLED at once, which edges do not retry. Thousands of edges re-polling together pass those
# counts (10,000 concurrent Joins over 50 connections: 5,627 of them CANCELLED), so the limits are
# raised past any federation one aggregator serves; a waiting call costs a few KiB.
MAX_PENDING_CALLS = 1_000_000
POLL_CHECK_THREADS = 4  # the long-polls' checks of the coordinator (each holds its lock briefly)
T = TypeVar("T")


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` waits for a coroutine on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Running:
    """A started aggregator: the server, its port and the round coordinator (``federation``)."""

    server: grpc.aio.Server
    port: int
    federation: RoundCoordinator
    store: Store
    health: health.aio.HealthServicer
    loop: EventLoopThread
    pools: tuple[futures.ThreadPoolExecutor, ...]
    upstream: Upstream | None = None  # a leaf's relay to its root
    stopped: bool = False

    def stop(self, grace: float = 5.0) -> None:
        """Drain (new work gets UNAVAILABLE), let streams finish within `grace`, then close."""
        if self.stopped:
            return
        self.stopped = True
        if self.upstream is not None:
            self.upstream.stop()
        self.loop.run(self.health.enter_graceful_shutdown())
        self.federation.drain()
        self.loop.run(self.server.stop(grace))
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self.loop.close()
        self.federation.stop()
        self.store.close()
        logger.info("aggregator stopped")


def tune_malloc() -> None:
    """glibc only: two malloc arenas, fixed mmap and trim thresholds (see MMAP_THRESHOLD).

    Uploads allocate and free model-sized buffers on many RPC threads; with glibc's defaults
    each thread's arena keeps freed memory and the mmap threshold ratchets up to 32 MiB, so RSS
    grows with the number of uploads.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from <malloc.h>
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
    libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)


def _window_options(window: int) -> list[tuple[str, int]]:
    """A fixed HTTP/2 stream window instead of BDP probing (which grows it to several MiB).

    An upload waiting for its turn is buffered by the transport up to its window, so a fixed
    window bounds what each waiting upload costs in memory. 0 keeps gRPC's adaptive default.
    """
    if window <= 0:
        return []
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]


def start(config: AggregatorConfig) -> Running:
    """Open the store, start the RoundCoordinator and serve on `config.listen` (mTLS). Returns at once."""
    if not (config.cert and config.key and config.ca):
        raise ConfigError("mutual TLS is mandatory: set cert, key and ca ([tls] or --cert/--key/--ca)")
    credentials = tls.server_credentials(config.cert, config.key, config.ca)
    tune_malloc()
    store = Store(config.state_dir)
    federation = RoundCoordinator(config, store)
    loop = EventLoopThread("rpc-loop")
    rpc_pool = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc")
    checks = futures.ThreadPoolExecutor(max_workers=POLL_CHECK_THREADS, thread_name_prefix="poll")
    try:
        server, port, health_servicer = loop.run(_build(config, credentials, federation, rpc_pool, checks))
    except BaseException:
        loop.close()
        store.close()
        raise
    federation.start()
    upstream = None
    if config.root:
        endpoint = Endpoint(config.root, config.ca, config.root_cert, config.root_key)
        upstream = Upstream(federation, endpoint)
        upstream.start()
        logger.info("leaf aggregator: rounds follow the root at %s, as %r", config.root, upstream.name)
    loop.run(server.start())
    for name in ("", SERVICE_NAME):
        loop.run(health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    logger.info(
        "aggregator serving %s on port %s (mTLS), state in %s, %s rounds, quorum %s, min %s, deadline %ss",
        SERVICE_NAME,
        port,
        config.state_dir,
        config.total_rounds,
        config.quorum,
        config.round_min_edges,
        config.deadline_s,
    )
    return Running(server, port, federation, store, health_servicer, loop, (rpc_pool, checks), upstream)


async def _build(
    config: AggregatorConfig,
    credentials: grpc.ServerCredentials,
    federation: RoundCoordinator,
    rpc_pool: futures.ThreadPoolExecutor,
    checks: futures.ThreadPoolExecutor,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The asyncio server with its services and port (not started); runs on the server's loop."""
    wakeups = Wakeups(asyncio.get_running_loop())
    federation.subscribe(wakeups.notify)
    server = grpc.aio.server(
        migration_thread_pool=rpc_pool,
        interceptors=[ParseRequests()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_S),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ]
        + _window_options(config.stream_window_bytes),
    )
    pb_grpc.add_FederationServicer_to_server(
        FederationServicer(federation, wakeups, checks, rpc_pool), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    return server, port, health_servicer


def serve(config: AggregatorConfig, ready: threading.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM, then drain and stop; returns the exit status."""
    running = start(config)
    print(f"aggregator listening on port {running.port}", flush=True)  # tests and scripts read this
    if ready is not None:
        ready.set()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    logger.info("signal received: draining")
    running.stop()
    return 0
