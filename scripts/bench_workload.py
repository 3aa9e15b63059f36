"""The benchmark's workload, shared by bench.py (servers over HTTP) and bench_direct.py (engines called
in-process), so that every target gets the same requests in the same order and is timed the same way.

C clients each send R requests back to back (a closed loop); client i's j-th request of a level is request
k = j*C + i and uses prompt k mod 16, so with R = ceil(16 / C) every level sends each prompt exactly once.
Every request asks for exactly N new tokens (greedy, EOS ignored).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# A fixed, varied prompt set: real English, roughly 10 to 200 tokens each (SmolLM2 tokenizer).
PROMPTS: list[str] = [
    "What is the capital of France, and what river runs through it?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Explain in simple terms why the sky is blue during the day and red at sunset.",
    "List three practical tips for someone who wants to start running regularly, and explain why each one "
    "helps a beginner stay motivated.",
    "You are a helpful assistant. A customer writes: 'I ordered a pair of shoes two weeks ago and they still "
    "have not arrived. The tracking page has not changed for six days.' Write a short, polite reply.",
    "Summarize the following paragraph in one sentence. Photosynthesis is the process by which green plants, "
    "algae and some bacteria convert light energy into chemical energy. Using sunlight, water and carbon "
    "dioxide, they produce glucose and release oxygen as a by-product. This process is the foundation of "
    "most food chains on Earth.",
    "Translate the following sentence into French: The library on the corner of our street opens at nine in "
    "the morning and closes at six in the evening, except on Sundays.",
    "Write a Python function that takes a list of integers and returns a new list containing only the even "
    "numbers, in the same order. Include a docstring and one example of how to call it.",
    "A train leaves the station at 3 pm travelling at 80 kilometres per hour. A second train leaves the same "
    "station at 4 pm on a parallel track travelling at 100 kilometres per hour in the same direction. At "
    "what time does the second train catch up with the first? Show your reasoning step by step.",
    "Read the short story opening below and continue it for a few sentences, keeping the same tone.\n\n"
    "The lighthouse keeper had not seen another person for forty-one days. Every evening he climbed the "
    "spiral staircase, counted the steps out loud, and lit the lamp. The sea was calm that night, too calm, "
    "and when he looked out over the water he noticed a small boat drifting towards the rocks with no one "
    "at the oars.",
    "Compare renewable and non-renewable energy sources. Cover at least the following points: how each type "
    "is produced, their environmental impact, their cost over time, and how reliable they are for a "
    "national power grid. Solar, wind, hydroelectric, coal, natural gas and nuclear power are all relevant. "
    "Keep the answer balanced and end with a short conclusion about which mix of sources seems most "
    "sensible for a medium-sized country with a long coastline and a cold climate.",
    "Give me a recipe for a simple vegetable soup.",
    "The meeting notes below are messy. Rewrite them as a clean list of decisions and action items, each "
    "with an owner.\n\nnotes: talked about q3 launch, maria says design is late by a week maybe two. "
    "decided to move launch to october 15. tom will update the roadmap and tell sales. budget for ads "
    "approved but only half of what we asked, priya to redo the plan with the smaller budget by friday. "
    "someone needs to check the legal review status, nobody volunteered, alex said he would ask. next "
    "meeting tuesday. also: customer support wants a faq page before launch, "
    "jenny offered to draft it but needs the final pricing first, pricing is still waiting on finance. "
    "the beta testers reported two crashes on older android phones, dev team to investigate, no owner yet.",
    "Why do cats purr, and do big cats such as lions purr too?",
    "Explain the difference between a process and a thread in an operating system. Describe how memory is "
    "shared or isolated in each case, what happens when one of them crashes, and give one example of a "
    "program that benefits from using several processes and one that benefits from using several threads. "
    "Finally, mention how the global interpreter lock affects threads in CPython and what programmers "
    "usually do about it when they need to use more than one CPU core for heavy computation.",
    "You are a travel guide. A family with two children aged eight and twelve is visiting Rome for three "
    "days in early spring. They enjoy history and good food but get tired after long walks, and the "
    "younger child is afraid of crowds. They are staying in a hotel near Termini station and do not want to "
    "rent a car. Plan their three days: for each day suggest a morning activity, a lunch idea, an afternoon "
    "activity and an evening plan, and explain briefly why each choice suits this family. Mention how they "
    "should get around, what they should book in advance, and one thing to avoid. Keep the tone friendly "
    "and the plan realistic, with enough breaks for the children. Finally, add a short list of five Italian "
    "phrases that would be useful for the children to learn before the trip, such as how to say hello, "
    "thank you and please, how to order an ice cream, and how to ask where the toilets are, with a simple "
    "pronunciation guide for each one so that an eight-year-old could read it aloud without help.",
]


def client_prompts(client: int, concurrency: int, requests_per_client: int) -> list[int]:
    """The prompt indices client `client` sends, in order."""
    return [(j * concurrency + client) % len(PROMPTS) for j in range(requests_per_client)]


def warm_up_prompts(concurrency: int) -> tuple[list[int], list[int]]:
    """Untimed first calls: the shortest and the longest prompt alone, then `concurrency` prompts at once."""
    by_len = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    return [by_len[0], by_len[-1]], list(range(concurrency))


WARM_UP_TOKENS = 8


@dataclass
class RequestResult:
    """One request as its client saw it: when each token (or group of tokens) arrived, and how it ended."""

    prompt_index: int
    sent: float = field(default_factory=time.perf_counter)
    ok: bool = False
    error: str | None = None
    tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    _last: float | None = None

    def arrived(self, tokens: int) -> None:
        """`tokens` new tokens reached the client now (a step may deliver several: one gap is recorded)."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.sent
        else:
            self.itl.append(now - self._last)
        self._last = now
        self.tokens += tokens

    def fail(self, error: str) -> RequestResult:
        self.error = error
        return self

    def end(self, expected_tokens: int, reported_tokens: int | None = None) -> RequestResult:
        """The stream ended: ok when it produced exactly the tokens asked for."""
        self.e2e = time.perf_counter() - self.sent
        if reported_tokens is not None:
            self.tokens = reported_tokens
        if self.tokens != expected_tokens:
            return self.fail(f"generated {self.tokens} tokens, expected {expected_tokens}")
        self.ok = True
        return self

    def to_json(self) -> dict:
        return {"prompt_index": self.prompt_index, "ok": self.ok, "error": self.error, "tokens": self.tokens,
                "ttft": self.ttft, "itl": self.itl, "e2e": self.e2e}

    @classmethod
    def from_json(cls, data: dict) -> RequestResult:
        return cls(**data)


OneRequest = Callable[[int, int], Awaitable[RequestResult]]  # (prompt index, max_new_tokens) -> result


async def run_clients(one: OneRequest, concurrency: int, requests_per_client: int, max_new_tokens: int,
                      max_seconds: float | None) -> tuple[list[RequestResult], float]:
    """The closed loop; past `max_seconds` no client starts a new request (those in flight finish).
    Returns every request's result and the wall time of the level."""
    start = time.perf_counter()

    async def client(i: int) -> list[RequestResult]:
        out = []
        for index in client_prompts(i, concurrency, requests_per_client):
            if max_seconds and time.perf_counter() - start > max_seconds:
                break
            out.append(await one(index, max_new_tokens))
        return out

    per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return [r for results in per_client for r in results], wall


async def warm_up(one: OneRequest, concurrency: int) -> list[str]:
    alone, together = warm_up_prompts(concurrency)
    results = [await one(i, WARM_UP_TOKENS) for i in alone]
    results += await asyncio.gather(*(one(i, WARM_UP_TOKENS) for i in together))
    return [r.error for r in results if not r.ok and r.error]
