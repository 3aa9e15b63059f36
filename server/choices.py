"""OpenAI's `n` and `best_of`: one request fanned out into several engine generations, merged into one stream.

Every engine serves them the same way: each candidate is its own generation with its own seed (derived from
the request's, so a seeded request is reproducible and candidate 0 is what `n=1` would give), and their
events come out tagged with `TokenEvent.choice`, in the order the engine produced them. Closing the merged
stream (a client that left), or a failure in any candidate, ends every candidate's generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncGenerator

from llm_endpoint.backends.base import Backend
from llm_endpoint.backends.types import GenerationRequest, TokenEvent

_SEED_BITS = 63


def candidate_seed(seed: int | None, index: int) -> int | None:
    """Candidate `index`'s seed: the request's own for the first, a hash of (seed, index) for the others (so
    `n=2, seed=s` does not repeat `n=1, seed=s+1`)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


def candidate_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Candidate `index` of `request`: its own request id (engines key their work by it) and seed."""
    if index == 0:
        return request
    params = dataclasses.replace(request.params, seed=candidate_seed(request.params.seed, index))
    return dataclasses.replace(request, request_id=f"{request.request_id}-{index}", params=params)


async def fan_out(backend: Backend, request: GenerationRequest, count: int) -> AsyncGenerator[TokenEvent, None]:
    """The events of `count` generations of `request`, each tagged with its candidate index; it ends once
    every candidate has finished. With one candidate it is the backend's own stream."""
    if count == 1:
        async for event in backend.generate(request):
            yield event
        return
    merged: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

    async def pump(index: int) -> None:
        events = backend.generate(candidate_request(request, index))
        try:
            async for event in events:
                event.choice = index
                merged.put_nowait(event)
        except Exception as exc:  # handed to the consumer, which then ends the others
            merged.put_nowait(exc)
        finally:
            await events.aclose()

    pumps = [asyncio.ensure_future(pump(i)) for i in range(count)]
    try:
        remaining = count
        while remaining:
            item = await merged.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield item
    finally:
        for task in pumps:
            task.cancel()  # a candidate still generating is aborted by its own generator's cleanup
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
