"""``fusion-diff bench``: sampling throughput and gallery search time, the two speed targets of the library.

The measuring code lives in ``scripts/bench_sampling.py`` and ``scripts/bench_search.py`` (each also
runs alone); this command loads them from the source checkout and prints both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

from fusion_diff.cli.arguments import positive_int
from fusion_diff.errors import MissingFileError

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` by path (the scripts folder is not an installed package)."""
    path = SCRIPTS_DIR / f"{name}.py"
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found: `fusion-diff bench` needs the source checkout's scripts/ folder "
            "(pip install -e . from a clone of the repository)."
        )
    spec = importlib.util.spec_from_file_location(f"fusion_diff_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, object] = {}
    sampling = load_script("bench_sampling")
    for precision in args.precision:
        for steps in args.steps:
            r = sampling.bench_sampling(
                num_queries=args.queries,
                num_inference_steps=steps,
                embedding_dim=args.dim,
                sampler=args.sampler,
                repeats=args.repeats,
                precision=precision,
            )
            results[f"sampling_{precision}_{steps}_steps"] = r
            print(sampling.format_result(r))
    if not args.no_search:
        search = load_script("bench_search")
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:  # optional extra; bench_search then reports the exact backend's failure itself
            pass
        r = search.bench_search(num_queries=args.queries, gallery_size=args.gallery, dim=args.dim, repeats=args.repeats)
        results["search"] = r
        for backend in ("exact", "faiss"):
            if backend in r:
                b = r[backend]
                print(
                    f"top-{r['k']} of {r['num_queries']} queries over {r['gallery_size']} x {r['dim']}-d, {backend}: "
                    f"{b['search_s']:.3f} s wall, {b['cpu_s']:.3f} CPU-s (build {b['build_s']:.2f} s)"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"({args.threads} torch threads; timings on a shared machine are noisy: compare CPU-s / threads.)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure sampling queries/s and gallery search time",
        description="Time the default Fusion-Diff pipeline (prior + Control-Adapter, random weights) sampling "
        "--queries query embeddings with two-scale guidance (control 2.0, text 1.5: three branches in one batched "
        "forward per step), and the exact and FAISS "
        "top-50 search of those many queries over a --gallery of random embeddings. Targets on 2 CPU cores: "
        ">= 20 queries/s at 10 steps, <= 2 s per search of 1,000 queries over 100,000 items.",
    )
    parser.add_argument("--queries", type=positive_int, default=1000, help="number of queries")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[10, 1], help="sampler steps to time")
    parser.add_argument("--dim", type=positive_int, default=512, help="embedding size")
    parser.add_argument("--sampler", choices=("ddim", "dpm++", "ddpm"), default="ddim")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32", "bf16"],
        help="denoiser precision(s) to time (bf16: autocast, ~2x faster on CPUs with AVX512-BF16/AMX)",
    )
    parser.add_argument("--gallery", type=positive_int, default=100_000, help="gallery size for the search timing")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch (and FAISS) threads")
    parser.add_argument("--no-search", action="store_true", help="time sampling only")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    parser.set_defaults(func=run)
