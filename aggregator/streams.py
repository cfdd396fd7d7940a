"""A client stream read on the event loop and consumed by a blocking function on a worker thread.

The asyncio server reads an upload's messages as they arrive; the RoundCoordinator stages them on
a thread (decoding and checksums release the GIL). A few messages are buffered between the two.
When the client goes away the reading coroutine is cancelled and the thread's iterator raises
``StreamEnded`` at once, so the upload's slot and in-flight mark are freed, never left waiting
for a message that will not come.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
BUFFERED = 4  # messages between the reader and the consumer (256 KiB to 4 MiB each)
_END, _GONE = object(), object()


class StreamEnded(Exception):
    """The client's stream ended abnormally (cancelled, reset): the consumer stops."""


class StreamBridge:
    """Messages from the loop (``feed``) to a thread (``messages``), with back-pressure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(BUFFERED)

    def messages(self) -> Iterator[Any]:
        """The consumer's side (a worker thread): each message, until the stream ends."""
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _GONE:
                raise StreamEnded("the client's stream ended before its last message")
            try:
                self._loop.call_soon_threadsafe(self._slots.release)
            except RuntimeError:  # the loop closed under a stopping server: nobody feeds any more
                pass
            yield item

    async def feed(self, source: AsyncIterator[Any]) -> None:
        """The reader's side (the loop): pass every message on, then the end."""
        async for item in source:
            await self._slots.acquire()
            self._queue.put(item)
        self._queue.put(_END)

    def abandon(self) -> None:
        """The stream broke (cancelled, or the reader failed): the consumer's iterator raises."""
        self._queue.put(_GONE)

    async def run(self, source: AsyncIterator[Any], consume: Callable[[Iterator[Any]], T], pool: Any) -> T:
        """Run ``consume(messages)`` on ``pool`` while feeding it ``source``; return its result.

        The consumer may stop early (a refused header): its answer or error comes at once and the
        rest of the stream is not read. A cancelled or failed read makes the consumer raise
        StreamEnded, and the read's error is raised here.
        """

        work = self._loop.run_in_executor(pool, consume, self.messages())
        feeding = asyncio.ensure_future(self.feed(source))
        try:
            done, _ = await asyncio.wait({work, feeding}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                feeding.result()  # the read's error, if it failed
            return await work
        except BaseException:
            self.abandon()
            work.add_done_callback(_retrieve)  # its StreamEnded is expected; nobody awaits it
            raise
        finally:
            feeding.cancel()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
