"""A TCP proxy for bad-network tests: delay every chunk, stall the flow, reset connections.

``TcpProxy(("127.0.0.1", port))`` listens on 127.0.0.1:0 and forwards each accepted connection
to the target, byte for byte (TLS passes through untouched). It runs an asyncio loop in a daemon
thread; every control method is safe to call from the test's thread:

- ``delay = s``: sleep ``s`` seconds before forwarding each chunk read (both directions; a chunk
  is at most ``read_size`` bytes, so together they cap the throughput);
- ``stall(s)``: stop forwarding for ``s`` seconds, connections kept open (TCP back-pressure does
  the rest);
- ``reset()``: close every connection abruptly on both sides, with an RST (SO_LINGER 0);
- ``half_open()``: RST the client side of every connection but leave the target side open and
  silent, as when the client's connection state is lost on a path that drops packets: the target
  sees neither data nor a close until its own timers act;
- ``arm(direction, after_bytes, action)``: run ``action`` ("stall:SECONDS", "reset" or "half-open") once
  ``after_bytes`` more bytes have been forwarded in ``direction`` (UP: client to target, DOWN:
  target to client), so a fault lands inside a transfer rather than between RPCs.

``forwarded`` counts bytes and ``chunks`` reads per direction; ``fired`` lists the armed actions
that ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

UP, DOWN = "up", "down"
READ_SIZE = 64 * 1024


@dataclass
class _Trigger:
    direction: str
    at: int  # the forwarded-byte count in `direction` at which the action runs
    action: str


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    half_open: bool = False


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; see the module docstring for the controls."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.read_size = READ_SIZE
        self.forwarded = {UP: 0, DOWN: 0}
        self.chunks = {UP: 0, DOWN: 0}
        self.connections = 0
        self.resets = 0
        self.fired: list[str] = []
        self._triggers: list[_Trigger] = []
        self._conns: set[_Conn] = set()
        self._zombies: list[asyncio.StreamWriter] = []  # target sides left open by half_open()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name="tcpproxy")
        self._thread.start()
        ready.wait(10)
        if self._server is None:
            raise RuntimeError("the proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    # --- control (any thread) -------------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """Stop forwarding in both directions for ``seconds``; connections stay open."""
        self._loop.call_soon_threadsafe(self._stall, seconds)

    def reset(self) -> None:
        """Abort every open connection, both sides, with an RST."""
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    def half_open(self) -> None:
        """RST every client side; keep every target side open, never to carry a byte again."""
        asyncio.run_coroutine_threadsafe(self._reset_all(half_open=True), self._loop).result(10)

    def arm(self, direction: str, after_bytes: int, action: str) -> None:
        """Run ``action`` ("stall:SECONDS", "reset" or "half-open") once ``after_bytes`` more bytes
        went ``direction``."""
        known = action in ("reset", "half-open") or action.startswith("stall:")
        if direction not in (UP, DOWN) or not known:
            raise ValueError(f"bad trigger {direction!r} {action!r}")
        with self._lock:
            self._triggers.append(_Trigger(direction, self.forwarded[direction] + after_bytes, action))

    def pending(self) -> int:
        """Armed actions that have not run yet."""
        with self._lock:
            return len(self._triggers)

    def close(self) -> None:
        """Stop listening, drop every connection and end the loop's thread."""
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # --- the loop's side -----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0)
            )
        finally:
            ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _stall(self, seconds: float) -> None:
        assert self._flowing is not None
        self._flowing.clear()
        self._loop.call_later(seconds, self._flowing.set)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_w)
            return
        conn = _Conn(client_w, target_w)
        self._conns.add(conn)
        pumps = [
            asyncio.create_task(self._pump(client_r, target_w, UP)),
            asyncio.create_task(self._pump(target_r, client_w, DOWN)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            if conn.half_open:
                self._zombies.append(conn.target)
            else:
                conn.target.close()
            conn.client.close()
            self._conns.discard(conn)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(self.read_size):
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                with self._lock:
                    self.forwarded[direction] += len(data)
                    self.chunks[direction] += 1
                    count = self.forwarded[direction]
                    due = [t for t in self._triggers if t.direction == direction and count >= t.at]
                    self._triggers = [t for t in self._triggers if t not in due]
                for trigger in due:
                    self.fired.append(f"{trigger.action} after {self.forwarded[direction]} bytes {direction}")
                    if trigger.action in ("reset", "half-open"):
                        await self._reset_all(half_open=trigger.action == "half-open")
                    else:
                        self._stall(float(trigger.action.split(":", 1)[1]))
        except (ConnectionError, OSError):
            pass

    async def _reset_all(self, half_open: bool = False) -> None:
        conns, self._conns = list(self._conns), set()
        if conns:
            self.resets += 1
        for conn in conns:
            conn.half_open = half_open
            _abort(conn.client)
            if not half_open:
                _abort(conn.target)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        for writer in self._zombies:
            _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with an RST rather than a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
