"""Gallery search speed: top-k of Q queries over N unit-norm embeddings, exact and FAISS.

    python scripts/bench_search.py                       # 1,000 queries x 100,000 items, dim 768 and 512, k=50
    python scripts/bench_search.py --dims 768 --threads 2
    python scripts/bench_search.py --persisted --sizes 100000 1000000 --dims 768 --threads 2

``--persisted`` measures the index folders ``ComposedRetriever`` searches (``fusion_diff.retrieval.store``):
for each index type the build time, the size on disk, the memory of a fresh process that opens the folder
and searches it (VmRSS, and RssAnon = private memory: file-backed mmap pages are not in it), the top-k
latency of 1,000 queries and recall@k against exact search. Its data are synthetic but clustered (random
centres, gaussian spread), because ANN recall on structureless random vectors says nothing about real
embeddings; queries are ``normalize(x_a + x_b)`` of held-out points (between items, as composed queries are).

Random unit vectors (search cost does not depend on the values); each query excludes one id, as
CIRR does. Each backend is timed ``repeats`` times after one warm-up; the median wall time and the
median process CPU time are reported (on a shared machine, CPU time / threads estimates the idle
wall time), the index build time separately. ``bench_search`` is also what ``fusion-diff bench`` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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


def clustered(path: Path, count: int, dim: int, seed: int, centres: int = 4096, spread: float = 0.6) -> np.ndarray:
    """``[count, dim]`` unit vectors around random centres, written chunk by chunk into a ``.npy`` memory map."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim), dtype=np.float32) / np.sqrt(dim)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        block = middle[rng.integers(centres, size=n)] + spread * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    return out


def bench_persisted(
    gallery_size: int,
    dim: int = 768,
    num_queries: int = 1000,
    k: int = 50,
    types: tuple[str, ...] = ("exact", "ivf-flat", "ivf-pq", "hnsw", "hnsw-sq8"),
    threads: int | None = None,
    workdir: Path | None = None,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    ef_sweep: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Build every index type over one clustered gallery, then search each from a fresh process
    (HNSW types once per efSearch of ``ef_sweep``, on the same folder, when it is given)."""
    from fusion_diff.retrieval.store import IndexSettings, PersistentIndex

    work = Path(workdir or tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    data = clustered(work / "data.npy", gallery_size + 2 * num_queries, dim, seed)
    gallery = torch.from_numpy(np.asarray(data[:gallery_size]))
    held = torch.from_numpy(np.asarray(data[gallery_size:]))
    queries = F.normalize(held[:num_queries] + held[num_queries:], dim=-1)
    np.save(work / "queries.npy", queries.numpy())
    # metadata of the size a real gallery has (a path and a caption per item), so memory figures include it
    items = [{"id": f"{i:07d}", "path": f"/data/gallery/{i // 1000:04d}/{i:07d}.jpg",
              "caption": f"a photo of item {i} with a short generated caption"} for i in range(gallery_size)]  # fmt: skip
    result: dict[str, Any] = {"gallery_size": gallery_size, "dim": dim, "num_queries": num_queries, "k": k,
                              "threads": threads, "raw_mib": gallery_size * dim * 4 / 2**20}  # fmt: skip
    exact_ids = None
    for kind in types:
        root = work / kind
        start = time.perf_counter()
        index = PersistentIndex.write(root, {"bench": "clustered"}, gallery, items, IndexSettings(kind, **(settings or {})), calibration=queries)
        build = time.perf_counter() - start
        info = index.describe()
        del index
        sweep = ef_sweep if kind.startswith("hnsw") and ef_sweep else (None,)
        for ef in sweep:
            name = kind if ef is None else f"{kind} ef{ef}"
            ids_file = work / f"{name.replace(' ', '-')}-ids.npy"
            search = _search_in_fresh_process(root, work / "queries.npy", k, threads, ids_file, ef)
            found = np.load(ids_file)
            exact_ids = found if kind == "exact" else exact_ids
            row = {"build_s": build, "disk_mib": info["bytes_on_disk"] / 2**20, "factory": info["factory"], **search}
            if exact_ids is not None:
                hit = (found[:, :, None] == exact_ids[:, None, :]).any(-1)
                row[f"recall@{k}"] = float(hit.mean())
            row["build_report"] = info["recall"]
            result[name] = row
            print(f"  {name}: {json.dumps(row)}", flush=True)
    return result


def _search_in_fresh_process(
    root: Path, queries: Path, k: int, threads: int | None, out: Path, ef_search: int | None = None,
    rerank: int | None = None,
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--search-only", str(root), "--query-file", str(queries), "--k", str(k)]
    command += ["--ids-out", str(out)] + (["--threads", str(threads)] if threads else [])
    command += ["--ef-search", str(ef_search)] if ef_search else []
    command += ["--rerank", str(rerank)] if rerank else []
    reply = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(reply.stdout.strip().splitlines()[-1])


def _search_only(
    root: Path, query_file: Path, k: int, ids_out: Path, ef_search: int | None = None, rerank: int | None = None,
    repeats: int = 3,
) -> None:
    """Open an index folder, search it (one excluded id per query, as CIRR), print latency and memory as JSON."""
    import faiss  # noqa: F401  (its libraries count in the baseline, not in the index's memory)

    from fusion_diff.retrieval.store import PersistentIndex

    baseline = _memory_mib()
    start = time.perf_counter()
    index = PersistentIndex.load(root).tune(ef_search=ef_search, rerank=rerank)
    load = time.perf_counter() - start
    queries = torch.from_numpy(np.load(query_file))
    exclude = [[f"{q:07d}"] for q in range(len(queries))]
    index.search(queries[:10], k=k, exclude=exclude[:10])  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        found = index.search(queries, k=k, exclude=exclude)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    np.save(ids_out, found.indices.numpy())
    mib = _memory_mib()
    growth = {f"{key}_growth_mib": mib[key] - baseline[key] for key in ("VmRSS", "RssAnon") if key in mib}
    print(json.dumps({"search_s": statistics.median(times), "all_s": times, "cpu_s": statistics.median(cpu), "load_s": load,
                      **{f"{key}_mib": value for key, value in mib.items()}, **growth}))  # fmt: skip


def _memory_mib() -> dict[str, float]:
    """This process's resident memory (MiB): VmRSS in all, RssAnon private, RssFile file-backed (mmap, libraries)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile") if key in status}


def print_persisted(r: dict[str, Any]) -> None:
    print(
        f"\n{r['num_queries']} queries, top-{r['k']}, over {r['gallery_size']:,} x {r['dim']}-d "
        f"(raw {r['raw_mib']:.0f} MiB; {r['threads'] or 'default'} threads; synthetic clustered data)"
    )
    print("| type | factory | build s | disk MiB | search s (CPU s) | VmRSS MiB (growth) | RssAnon MiB (growth) | recall@50 vs exact | build report R@50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, b in r.items():
        if isinstance(b, dict):
            report = (b["build_report"] or {}).get("recall@50")
            print(
                f"| {kind} | {b['factory'] or 'memory map'} | {b['build_s']:.1f} | {b['disk_mib']:.0f} | {b['search_s']:.3f} ({b.get('cpu_s', float('nan')):.3f}) "
                f"| {b.get('VmRSS_mib', 0):.0f} ({b.get('VmRSS_growth_mib', 0):.0f}) "
                f"| {b.get('RssAnon_mib', 0):.0f} ({b.get('RssAnon_growth_mib', 0):.0f}) | {b.get('recall@50', float('nan')):.4f} "
                f"| {report if report is not None else '-'} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 512])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: library default)")
    parser.add_argument("--persisted", action="store_true", help="index folders: every type, memory, recall")
    parser.add_argument(
        "--types", nargs="+", default=["exact", "ivf-flat", "ivf-pq", "hnsw", "hnsw-sq8"], help="with --persisted"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="with --persisted")
    parser.add_argument("--workdir", type=Path, default=None, help="with --persisted: where data and indexes go")
    parser.add_argument("--nlist", type=int, default=None, help="with --persisted: IVF lists (default ~4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=None, help="with --persisted: IVF lists searched")
    parser.add_argument("--ef-search", type=int, default=None, help="with --persisted: HNSW efSearch (default: the library's)")
    parser.add_argument("--rerank", type=int, default=None, help="with --persisted: quantized types' rescoring (default: the library's)")
    parser.add_argument("--ef-sweep", type=int, nargs="+", default=[], help="with --persisted: search HNSW types at each efSearch")
    parser.add_argument("--json-out", type=Path, default=None, help="with --persisted: write all results here")
    parser.add_argument("--search-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--query-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    if args.search_only:
        _search_only(args.search_only, args.query_file, args.k, args.ids_out, args.ef_search, args.rerank)
        return
    if args.persisted:
        results = []
        for size in args.sizes:
            for dim in args.dims:
                workdir = args.workdir / f"{size}x{dim}" if args.workdir else None
                settings = {"nlist": args.nlist, "nprobe": args.nprobe, "ef_search": args.ef_search, "rerank": args.rerank}
                results.append(
                    bench_persisted(size, dim, args.queries, args.k, tuple(args.types), args.threads, workdir,
                                    settings=settings, ef_sweep=tuple(args.ef_sweep))  # fmt: skip
                )
                print_persisted(results[-1])
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=2))
        return
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
