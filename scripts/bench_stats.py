"""Per-level statistics from the per-request timings, kept apart so that every target is summarized alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bench_workload import RequestResult


def percentile(values: list[float], q: float) -> float | None:
    """vLLM's definition: numpy's default (linear interpolation) percentile."""
    return float(np.percentile(values, q)) if values else None


@dataclass
class LevelResult:
    config: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    client_cpu_s: float
    server_cpu_s: float | None
    other_cpu_s: float | None = None  # CPU used by everything else on the machine during the level
    planned_requests: int | None = None  # more than `requests` when --max-level-seconds cut the level short
    error_samples: list[str] = field(default_factory=list)
    per_request: list[dict[str, Any]] = field(default_factory=list)  # for --json: prompt, ttft, e2e, error


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def summarize(config: str, concurrency: int, results: list[RequestResult], wall: float, client_cpu: float,
              server_cpu: float | None) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error or "?" for r in results if not r.ok]
    return LevelResult(
        config=config, concurrency=concurrency, requests=len(results), errors=len(errors), wall_s=wall,
        output_tokens=tokens, output_tok_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)), itl_p99_ms=_ms(percentile(itls, 99)),
        e2e_p50_ms=_ms(percentile(e2es, 50)), client_cpu_s=client_cpu, server_cpu_s=server_cpu,
        error_samples=sorted(set(errors))[:5],
        per_request=[{"prompt": r.prompt_index, "tokens": r.tokens, "ttft_ms": _ms(r.ttft), "e2e_ms": _ms(r.e2e),
                      "itl_max_ms": _ms(max(r.itl)) if r.itl else None, "error": r.error} for r in results],
    )


def other_cpu(sys0: float | None, sys1: float | None, ours: float) -> float | None:
    return None if sys0 is None or sys1 is None else max(0.0, sys1 - sys0 - ours)
