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

from test_serve import K, serve_world  # noqa: F401  (serve_world: the served tiny shapes world)

from fusion_diff.serve.testing import find_chromium, launch_chromium, serve_in_subprocess

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


def _new_picture(page, old: str | None) -> None:
    """Wait until the joint-space picture shows a new image (it is drawn after the results)."""
    page.wait_for_function(
        "old => { const img = document.querySelector('#joint-space img'); return img && img.src && img.src !== old }",
        arg=old, timeout=60_000,
    )  # fmt: skip


def _picture(page) -> str | None:
    image = page.query_selector("#joint-space img")
    return image.get_attribute("src") if image else None


def _screenshot(page, path: Path) -> None:
    """The whole page as a 256-colour PNG (a third of the size; these go into the README)."""
    from PIL import Image

    page.screenshot(path=str(path), full_page=True)
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def _result_captions(page, gallery: str) -> list[str]:
    return page.eval_on_selector_all(f"#{gallery} img", "els => els.map(e => e.alt || '')")


def test_query_in_chromium_shows_k_results_with_the_true_target(serve_world, tmp_path, monkeypatch):  # noqa: F811
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
    root = serve_world.root  # served from there, so the page names its folders as a user would see them
    args = [
        *("--retriever", str(serve_world.retriever.relative_to(root))),
        *("--benchmark", str(serve_world.benchmark.relative_to(root))),
        *("--fti4cir", str(serve_world.fti4cir.relative_to(root))),
    ]
    with serve_in_subprocess(args, cwd=root) as url, sync_playwright() as playwright:
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
            picture = _picture(page)
            start = time.perf_counter()
            page.click("#search")
            _wait_for_results(page, "results-a", K)
            query_s = time.perf_counter() - start
            captions = _result_captions(page, "results-a")
            assert len(captions) == K
            assert any(query.target_id in caption for caption in captions), captions
            _new_picture(page, picture)
            _screenshot(page, shots / "serve-query.png")

            page.locator("#gallery-strip img").first.click()  # a gallery item as the reference
            page.wait_for_function("document.querySelector('#status').innerText.includes('gallery item')")
            assert page.locator("#reference-upload").inner_text().strip()  # the strip filled the upload widget

            page.click("#random-query")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Test query')")
            _pick(page, "method", "Fusion-Diff")
            _pick(page, "compare", "image-only")
            picture = _picture(page)
            page.click("#search")
            page.wait_for_function("document.querySelector('#header-a').innerText.includes('Fusion-Diff')",
                                   timeout=120_000)  # fmt: skip
            _wait_for_results(page, "results-b", K)
            assert "Fusion-Diff" in page.inner_text("#header-a") and "image-only" in page.inner_text("#header-b")
            assert "true target" in page.inner_text("#header-a")
            _new_picture(page, picture)
            _screenshot(page, shots / "serve-side-by-side.png")
        finally:
            browser.close()
    outside = [
        u for u in requests if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"
    ]
    assert not outside, f"the page asked the internet for {outside}"
    print(f"page load {load_s:.2f} s, one image-only query end to end {query_s:.2f} s (shared machine)")
