"""Sampling speed of the default Fusion-Diff pipeline (prior + Control-Adapter), in queries per second.

    python scripts/bench_sampling.py                      # 1,000 queries, 10 steps, two-scale guidance, d = 512
    python scripts/bench_sampling.py --dims 256 768 --steps 10 1 --precision fp32 bf16 --threads 2
    python scripts/bench_sampling.py --dims 256 --text-tokens 0 12 24   # pooled vs token-level text (issue 18)

Random weights and random unit-norm conditions (the cost does not depend on the values). One
warm-up, then ``repeats`` timed runs of ``pipeline.sample`` on all queries; the median wall time
and the median process CPU time are reported (on a shared machine, CPU seconds / threads
estimates the idle wall time), plus the time of one guided forward (all branches of a step, as one
batch). The default scales (control 2.0, text 1.5) need all three guidance branches; equal scales
need only two (the control-only branch cancels), so they run ~1.5x faster. ``bench_sampling`` is also
what ``fusion-diff bench`` calls. ``--text-tokens N``: a prior with a token-level text condition of N
tokens, every query's text N real tokens long (a batch costs its longest text); 0 is pooled text.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from fusion_diff.models import ControlAdapter, FusionPrior, sampling_scheduler
from fusion_diff.pipelines import FusionDiffPipeline, GuidedDenoiser


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of ``fn()`` over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return statistics.median(walls), statistics.median(cpus)


def bench_sampling(
    num_queries: int = 1000,
    num_inference_steps: int = 10,
    embedding_dim: int = 512,
    sampler: str = "ddim",
    control_guidance: float = 2.0,
    text_guidance: float = 1.5,
    batch_size: int = 1024,
    repeats: int = 3,
    seed: int = 0,
    precision: str = "fp32",
    prior_kwargs: dict[str, Any] | None = None,
    text_tokens: int = 0,
) -> dict[str, Any]:
    """Queries/s of ``pipeline.sample`` for the default prior config (or ``prior_kwargs``) with a default adapter;
    ``text_tokens > 0``: token-level text of that many tokens per query (0: pooled)."""
    torch.manual_seed(seed)
    tokens = {"max_text_tokens": text_tokens} if text_tokens else {}
    prior = FusionPrior(embedding_dim=embedding_dim, **(prior_kwargs or {}) | tokens).eval()
    adapter = ControlAdapter.from_prior(prior).eval()
    pipe = FusionDiffPipeline(prior, sampling_scheduler(sampler, prior), adapter)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    text = F.normalize(
        torch.randn(num_queries, *([text_tokens] if text_tokens else []), embedding_dim, generator=gen), dim=-1
    )
    mask = torch.ones(text.shape[:2], dtype=torch.bool) if text_tokens else None
    control = F.normalize(torch.randn(num_queries, embedding_dim, generator=gen), dim=-1)

    def run() -> None:
        pipe.sample(
            text,
            control,
            num_inference_steps=num_inference_steps,
            control_guidance=control_guidance,
            text_guidance=text_guidance,
            generator=torch.Generator().manual_seed(seed),
            batch_size=batch_size,
            precision=precision,
            text_attention_mask=mask,
        )

    rows = min(batch_size, num_queries)
    denoiser = GuidedDenoiser(
        prior, adapter, text[:rows], control[:rows], None, control_guidance, text_guidance, 1.0,
        None if mask is None else mask[:rows],
    )  # fmt: skip
    latents = torch.randn(rows, embedding_dim, generator=gen)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            denoiser(latents, 500)

    forward()  # warm-up
    run()
    forward_wall, forward_cpu = _timed(forward, max(repeats, 3))
    wall, cpu = _timed(run, repeats)
    return {
        "num_queries": num_queries,
        "steps": num_inference_steps,
        "sampler": sampler,
        "precision": precision,
        "guidance": {"control": control_guidance, "text": text_guidance, "branches": denoiser.num_branches},
        "embedding_dim": embedding_dim,
        "text_tokens": text_tokens,
        "prior_config": {k: v for k, v in prior.config.items() if not k.startswith("_")},
        "prior_parameters": prior.num_parameters(),
        "adapter_blocks": adapter.config.num_blocks,
        "adapter_parameters": adapter.num_parameters(),
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "cpu_s": cpu,
        "queries_per_s": num_queries / wall,
        "queries_per_s_from_cpu": num_queries * torch.get_num_threads() / cpu,  # idle-machine estimate
        "forward_rows": rows * denoiser.num_branches,
        "forward_s": forward_wall,
        "forward_cpu_s": forward_cpu,
    }


def format_result(r: dict[str, Any]) -> str:
    share = r["adapter_parameters"] / r["prior_parameters"]
    return (
        f"d={r['embedding_dim']} text={'pooled' if not r['text_tokens'] else str(r['text_tokens']) + ' tokens'} "
        f"{r['precision']} {r['sampler']} {r['steps']:>2} steps, "
        f"{r['guidance']['branches']} guidance branches: "
        f"{r['queries_per_s']:.1f} queries/s ({r['wall_s']:.2f} s for {r['num_queries']}; CPU-time estimate "
        f"{r['queries_per_s_from_cpu']:.1f} q/s on {r['threads']} idle threads); one guided forward of "
        f"{r['forward_rows']} rows {r['forward_s'] * 1e3:.0f} ms ({r['forward_cpu_s'] * 1e3:.0f} CPU-ms). Prior "
        f"{r['prior_parameters'] / 1e6:.2f}M params, adapter K={r['adapter_blocks']} "
        f"{r['adapter_parameters'] / 1e6:.2f}M "
        f"({share:.0%} of the prior)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[10], help="sampler steps to time (e.g. 10 1)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512], help="embedding sizes to time")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm++", "ddpm"))
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    parser.add_argument("--control-guidance", type=float, default=2.0)
    parser.add_argument("--text-guidance", type=float, default=1.5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 CPU cores)")
    parser.add_argument(
        "--text-tokens", type=int, nargs="+", default=[0], help="0: pooled text; N: token-level text of N tokens"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dim in args.dims:
        for precision in args.precision:
            for steps in args.steps:
                pooled = None
                for text_tokens in args.text_tokens:
                    r = bench_sampling(
                        args.queries,
                        steps,
                        dim,
                        args.sampler,
                        args.control_guidance,
                        args.text_guidance,
                        args.batch_size,
                        args.repeats,
                        precision=precision,
                        text_tokens=text_tokens,
                    )
                    pooled = pooled or r["queries_per_s"]
                    ratio = (
                        f" [{r['queries_per_s'] / pooled:.2f}x the first text setting]"
                        if len(args.text_tokens) > 1
                        else ""
                    )
                    print(format_result(r) + ratio)


if __name__ == "__main__":
    main()
