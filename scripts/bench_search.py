"""Gallery search speed: top-k of Q queries over N unit-norm embeddings, exact and FAISS.

    python scripts/bench_search.py                       # 1,000 queries x 100,000 items, dim 768 and 512, k=50
    python scripts/bench_search.py --dims 768 --threads 2

Random unit vectors (search cost does not depend on the values); each query excludes one id, as
CIRR does. Each backend is timed ``repeats`` times after one warm-up; the median wall time and the
median process CPU time are reported (on a shared machine, CPU time / threads estimates the idle
wall time), the index build time separately. ``bench_search`` is also what ``fusion-diff bench`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from fusion_diff.retrieval import build_index


def bench_search(
    num_queries: int = 1000,
    gallery_size: int = 100_000,
    dim: int = 768,
    k: int = 50,
    backends: tuple[str, ...] = ("exact", "faiss"),
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of one ``search`` call of ``num_queries`` queries, per backend, plus build times."""
    gen = torch.Generator().manual_seed(seed)
    gallery = F.normalize(torch.randn(gallery_size, dim, generator=gen), dim=-1)
    queries = F.normalize(torch.randn(num_queries, dim, generator=gen), dim=-1)
    ids = [str(i) for i in range(gallery_size)]
    exclude = [[str(q)] for q in range(num_queries)]  # CIRR-style: each query drops one id (its reference)
    result: dict[str, Any] = {
        "num_queries": num_queries,
        "gallery_size": gallery_size,
        "dim": dim,
        "k": k,
        "threads": torch.get_num_threads(),
    }
    for backend in backends:
        start = time.perf_counter()
        index = build_index(gallery, ids, backend=backend)
        build = time.perf_counter() - start
        index.search(queries[:10], k=k, exclude=exclude[:10])  # warm-up
        times, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            index.search(queries, k=k, exclude=exclude)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        result[backend] = {
            "search_s": statistics.median(times),
            "all_s": times,
            "cpu_s": statistics.median(cpu),  # process CPU seconds: on a busy machine, cpu_s / threads ~ idle wall time
            "build_s": build,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 512])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: library default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    for dim in args.dims:
        r = bench_search(args.queries, args.gallery, dim, args.k, repeats=args.repeats)
        for backend in ("exact", "faiss"):
            b = r[backend]
            print(
                f"top-{r['k']} of {r['num_queries']} queries over {r['gallery_size']} x {dim}-d, {backend:5s}: "
                f"{b['search_s']:.3f} s wall, {b['cpu_s']:.3f} CPU-s per search (median of {len(b['all_s'])}; "
                f"build {b['build_s']:.2f} s; {r['threads']} threads)"
            )


if __name__ == "__main__":
    main()
