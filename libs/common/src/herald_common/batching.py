"""Group calls: many concurrent requests, each with its own item, served by one call for all.

A request adds its item and awaits its own answer; whoever finds no call under way starts one
for everything waiting (up to `max_items`), so under load the items of many requests share one
query or RPC, and alone a request waits for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class GroupCall(Generic[Item, Answer]):
    def __init__(
        self,
        call: Callable[[Sequence[Item]], Awaitable[Sequence[Answer]]],
        max_items: int = 500,
        max_concurrent: int = 4,
    ) -> None:
        # `call` answers each item, in order.
        self.call = call
        self.max_items = max_items
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running = 0

    async def __call__(self, item: Item) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._running < 1 or len(self._waiting) >= self.max_items:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            async with self._slots:
                while self._waiting:
                    taken, self._waiting = self._waiting[: self.max_items], self._waiting[self.max_items :]
                    await self._serve(taken)
        finally:
            self._running -= 1

    async def _serve(self, taken: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        try:
            answers = await self.call([item for item, _ in taken])
        except BaseException as error:
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (_, future), answer in zip(taken, answers, strict=True):
            if not future.done():
                future.set_result(answer)
