"""The benchmark's printed report: its markdown tables and the same-run throughput ratios."""

from __future__ import annotations

from bench_stats import LevelResult


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(levels: list[LevelResult]) -> str:
    rows = ["| target | concurrency | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | requests | errors |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        rows.append(
            f"| {lv.config} | {lv.concurrency} | {lv.output_tok_s:.1f} | "
            f"{fmt(lv.ttft_p50_ms)} / {fmt(lv.ttft_p99_ms)} | {fmt(lv.itl_p50_ms, 1)} / {fmt(lv.itl_p99_ms, 1)} | "
            f"{lv.requests}{'' if lv.planned_requests in (None, lv.requests) else f' of {lv.planned_requests}'} | "
            f"{lv.errors} |"
        )
    return "\n".join(rows)


def cpu_table(levels: list[LevelResult]) -> str:
    rows = ["| target | concurrency | wall (s) | e2e p50 (s) | client CPU (s, % of wall) | target CPU (s, cores) "
            "| other processes' CPU (s, cores) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        server = "-" if lv.server_cpu_s is None else f"{lv.server_cpu_s:.1f} ({lv.server_cpu_s / lv.wall_s:.2f})"
        e2e = "-" if lv.e2e_p50_ms is None else f"{lv.e2e_p50_ms / 1000:.2f}"
        other = "-" if lv.other_cpu_s is None else f"{lv.other_cpu_s:.1f} ({lv.other_cpu_s / lv.wall_s:.2f})"
        rows.append(f"| {lv.config} | {lv.concurrency} | {lv.wall_s:.1f} | {e2e} | "
                    f"{lv.client_cpu_s:.1f} ({100 * lv.client_cpu_s / lv.wall_s:.0f}%) | {server} | {other} |")
    return "\n".join(rows)


def ratio_lines(levels: list[LevelResult], hf: LevelResult | None, backends: list[str]) -> list[tuple[str, float]]:
    """Same-run throughput ratios: what each comparison the README reports comes from."""
    by = {(lv.config, lv.concurrency): lv.output_tok_s for lv in levels if lv.output_tok_s > 0}
    concurrencies = sorted({lv.concurrency for lv in levels})
    lo, hi = min(concurrencies, default=1), max(concurrencies, default=1)
    out: list[tuple[str, float]] = []

    def each_level(label: str, a: str, b: str) -> None:
        for c in concurrencies:
            if (a, c) in by and (b, c) in by:
                out.append((f"{label} @ c={c}", by[a, c] / by[b, c]))

    for backend in backends:
        each_level(f"{backend} / {backend}-direct (our server over the engine called directly)", backend,
                   f"{backend}-direct")
    if "vllm" in backends:
        each_level("vllm / vllm-serve (our server with vLLM over vLLM's own server)", "vllm", "vllm-serve")
        each_level("vllm / vllm-serve-logprobs (the same, both returning log-probs)", "vllm", "vllm-serve-logprobs")
        each_level("vllm/openai-chat / vllm-serve/openai-chat (both OpenAI chat streams, no log-probs)",
                   "vllm/openai-chat", "vllm-serve/openai-chat")
    served = [b for b in backends if b != "disable" and (b, hi) in by]
    if served and any(t == "vllm-serve" for t, _ in by):
        best = max(served, key=lambda b: by[b, hi])
        each_level(f"{best} / vllm-serve (our best CPU backend at c={hi} over vLLM's own server)", best, "vllm-serve")
    if "scheduler" in backends and "disable" in backends:
        each_level("scheduler / disable", "scheduler", "disable")
    for target in dict.fromkeys(lv.config for lv in levels):
        if (target, hi) in by and (target, lo) in by and hi != lo:
            out.append((f"{target} @ c={hi} / {target} @ c={lo}", by[target, hi] / by[target, lo]))
    if hf is not None and hf.output_tok_s > 0:
        for target in dict.fromkeys(lv.config for lv in levels):
            if (target, 1) in by:
                out.append((f"{target} @ c=1 / hf-generate", by[target, 1] / hf.output_tok_s))
    return out
