"""The page in a real browser: Debian's Chromium, driven by Playwright, against `fusion-diff serve` on 127.0.0.1.

Set ``FUSION_DIFF_SCREENSHOTS=docs/img`` to write the README's two screenshots there (else into tmp).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("playwright", reason="playwright is not installed: pip install -e '.[dev]'")

from fusion_diff.serve.testing import find_chromium, launch_chromium, serve_in_subprocess  # noqa: E402
from test_serve import K, serve_world  # noqa: E402,F401  (serve_world: the served tiny shapes world)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_chromium() is None,
        reason="no system Chromium at /usr/bin/chromium: `make browser` (apt-get install -y chromium) installs it; "
        "Playwright's own browser download does not work offline",
    ),
]


def _pick(page, dropdown: str, label: str) -> None:
    page.click(f"#{dropdown} input")
    page.locator(f'#{dropdown} [role=option][aria-label="{label}"]').click()


def _wait_for_results(page, gallery: str, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#{gallery} img').length >= {count}", timeout=120_000)


def _result_captions(page, gallery: str) -> list[str]:
    return page.eval_on_selector_all(f"#{gallery} img", "els => els.map(e => e.alt || '')")


def test_query_in_chromium_shows_k_results_with_the_true_target(serve_world, tmp_path, monkeypatch):
    """Upload a reference, type its instruction, pick image-only, click Search: K result images appear and the
    known shapes test query's true target is among them (the tiny world's query is chosen so that the library's
    own image-only ranking has it in the top 10: this proves the page carries an uploaded file and a typed text
    through the real server to the retriever and shows its ranking, not that the tiny model retrieves well).
    Then a random test query side by side (Fusion-Diff | image-only). Every request the page makes goes to the
    server: no fonts, scripts or analytics from the internet."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("FUSION_DIFF_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("FUSION_DIFF_MODEL_CONFIGS", str(serve_world.model_configs))  # the tiny backbone's config
    query = serve_world.query
    args = ["--retriever", str(serve_world.retriever), "--benchmark", str(serve_world.benchmark),
            "--fti4cir", str(serve_world.fti4cir)]  # fmt: skip
    with serve_in_subprocess(args) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#search", state="visible")
            load_s = time.perf_counter() - start

            page.set_input_files("#reference-upload input[type=file]", str(query.reference_path))
            page.wait_for_function("document.querySelector('#status').innerText.includes('uploaded')")
            page.fill("#text textarea", query.text)
            _pick(page, "method", "image-only")
            start = time.perf_counter()
            page.click("#search")
            _wait_for_results(page, "results-a", K)
            query_s = time.perf_counter() - start
            captions = _result_captions(page, "results-a")
            assert len(captions) == K
            assert any(query.target_id in caption for caption in captions), captions
            page.wait_for_selector("#joint-space img", timeout=60_000)
            page.screenshot(path=str(shots / "serve-query.png"), full_page=True)

            page.click("#random-query")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Test query')")
            _pick(page, "method", "Fusion-Diff")
            _pick(page, "compare", "image-only")
            page.click("#search")
            try:
                page.wait_for_function("document.querySelector('#header-a').innerText.includes('Fusion-Diff')",
                                       timeout=120_000)  # fmt: skip
                _wait_for_results(page, "results-b", K)
            except Exception:
                page.screenshot(path=str(shots / "failure.png"), full_page=True)
                raise
            assert "Fusion-Diff" in page.inner_text("#header-a") and "image-only" in page.inner_text("#header-b")
            assert "true target" in page.inner_text("#header-a")
            page.wait_for_selector("#joint-space img", timeout=60_000)
            page.screenshot(path=str(shots / "serve-side-by-side.png"), full_page=True)
        finally:
            browser.close()
    outside = [u for u in requests if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]
    assert not outside, f"the page asked the internet for {outside}"
    print(f"page load {load_s:.2f} s, one image-only query end to end {query_s:.2f} s (shared machine)")
