"""The web page's latency, measured in a real browser: page load, and one query end to end.

    python scripts/bench_serve.py                              # the demo's shapes gallery (runs/demo)
    python scripts/bench_serve.py --retriever DIR --benchmark DIR --repeats 5

Starts ``fusion-diff serve`` as a subprocess (as a user would), opens the page in headless Chromium
(Debian's package, through Playwright) and times

* page load: navigation until the Search button is visible (the page is usable);
* one query: from clicking Search with a benchmark query (reference + text, the method's default
  settings: Fusion-Diff's val-selected ones) until the k result images are on the page; the first
  query is a warm-up and not counted.

Medians of ``--repeats`` runs. On a shared machine these numbers are not the idle figure; run it idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fusion_diff.serve.testing import launch_chromium, serve_in_subprocess

RESULT_IMAGES = "#results-a img"


def run_query(page, k: int) -> float:
    """Set k, click Search, wait until exactly ``k`` result images are on the page; seconds from the click.

    Successive queries alternate k (10, 9, 10, ...), so that the images of the previous answer never count."""
    page.fill("#k input[type=number]", str(k))
    page.press("#k input[type=number]", "Enter")
    start = time.perf_counter()
    page.click("#search")
    page.wait_for_function(f"document.querySelectorAll('{RESULT_IMAGES}').length === {k}", timeout=120_000)
    return time.perf_counter() - start


def bench_serve(serve_args: list[str], repeats: int = 5, k: int = 10) -> dict[str, float | list[float]]:
    from playwright.sync_api import sync_playwright

    with serve_in_subprocess(serve_args) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        loads, queries = [], []
        try:
            for _ in range(repeats):
                page = browser.new_page()
                start = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#search", state="visible")
                loads.append(time.perf_counter() - start)
                page.close()
            page = browser.new_page()
            page.goto(url)
            page.click("#random-query")
            page.wait_for_function("document.querySelector('#text textarea').value.length > 0")
            run_query(page, k)  # warm-up: the first call builds the method with the page's settings
            queries = [run_query(page, k - 1 if n % 2 == 0 else k) for n in range(repeats)]
        finally:
            browser.close()
    return {
        "page_load_s": statistics.median(loads),
        "query_s": statistics.median(queries),
        "page_load_all_s": loads,
        "query_all_s": queries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--retriever", type=Path, default=None)
    source.add_argument("--demo-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--benchmark", type=Path, default=None, help="shapes benchmark for the test queries")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    serve_args = ["--retriever", str(args.retriever)] if args.retriever else ["--demo-dir", str(args.demo_dir)]
    if args.benchmark:
        serve_args += ["--benchmark", str(args.benchmark)]
    result = bench_serve(serve_args, repeats=args.repeats)
    print(json.dumps(result, indent=2))
    print(f"page load {result['page_load_s']:.2f} s, one query end to end {result['query_s']:.2f} s (medians)")


if __name__ == "__main__":
    main()
