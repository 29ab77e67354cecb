"""The Gradio page over a ``SearchService``: widgets in, ``SearchRequest``s to the service, rankings out.

Layout: the reference (upload, a clickable gallery strip, a random benchmark query), the texts, the
method picker with an optional second method side by side, the knobs, then one result row per
method and the joint-space picture. The search event is batched (``batch=True``): queries that
arrive together go to the model as one batch.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from fusion_diff.serve.offline import disable_telemetry, offline_theme

disable_telemetry()  # before gradio is imported: its import may already read the setting
import gradio as gr

from fusion_diff.errors import FusionDiffError
from fusion_diff.serve.inputs import read_reference
from fusion_diff.serve.service import MAX_K, QuerySettings, Ranking, SearchRequest, SearchService

NO_COMPARE = "(none)"
STRIP_SIZE = 48  # gallery images in the clickable strip
RESULT_HEIGHT = 300  # px: two rows of five at the default k; more results scroll
MAX_UPLOAD = "50mb"
EXAMPLE_TEXT = "make the star blue and move it to the left"
CSS = ".fd-small {font-size: 0.85em}"


def _caption(rank: int, hit: Any, target_id: str | None) -> str:
    mark = "★ TRUE TARGET · " if target_id and hit.id == target_id else ""
    caption = f" · {hit.caption}" if getattr(hit, "caption", None) else ""
    return f"{mark}#{rank} · {hit.score:.3f}{caption} · {hit.id}"


@functools.cache
def _no_image() -> Image.Image:
    """Shown for a hit whose image is not a file the server can send (an embedding-cache or tar-shard gallery)."""
    image = Image.new("RGB", (128, 128), "#d0d0d0")
    ImageDraw.Draw(image).text((18, 58), "no image file", fill="#404040")
    return image


def _gallery(ranking: Ranking | None, target_id: str | None) -> list[tuple[Any, str]]:
    if ranking is None:
        return []
    return [
        (str(hit.path) if hit.path and Path(hit.path).is_file() else _no_image(), _caption(rank, hit, target_id))
        for rank, hit in enumerate(ranking.hits, start=1)
    ]


def _header(ranking: Ranking | None, target_id: str | None) -> str:
    if ranking is None:
        return ""
    timing = f"{ranking.seconds:.2f} s" + (f" (batch of {ranking.batch_size})" if ranking.batch_size > 1 else "")
    line = f"**{ranking.label}** · top {len(ranking.hits)} · {timing}"
    if target_id:
        rank = ranking.target_rank(target_id)
        line += f" · true target `{target_id}` " + (f"at rank **{rank}**" if rank else "not in the top results")
    return line


def build_app(service: SearchService, max_batch_size: int = 8):
    """The page as a ``gr.Blocks`` (not launched)."""
    methods = service.methods()
    method_choices = [(label, name) for name, label in methods.items()]
    defaults = service.defaults
    strip = [(str(item.path), item.id) for item in service.gallery_items()[:STRIP_SIZE]]

    with gr.Blocks(title="fusion-diff composed search", analytics_enabled=False) as app:
        gr.Markdown("## Composed image search\nA reference image plus what should change → the gallery, ranked.")
        identity = gr.Markdown(service.describe(), elem_classes="fd-small", elem_id="identity")
        reference_id = gr.Textbox(visible=False, elem_id="reference-id")
        target_id = gr.Textbox(visible=False, elem_id="target-id")
        walk_request = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Reference image: upload one", type="filepath", elem_id="reference-upload")
                preview = gr.Image(label="Reference", type="filepath", interactive=False, height=220)
                reference_caption = gr.Textbox(label="Captioner's caption of the reference", interactive=False)
            with gr.Column(scale=3):
                text = gr.Textbox(label="Modification text", placeholder=EXAMPLE_TEXT, elem_id="text")
                negative = gr.Textbox(label="Negative text (optional)", placeholder="what the target should not be")
                with gr.Row():
                    method = gr.Dropdown(method_choices, value=defaults.method, label="Method", elem_id="method")
                    compare = gr.Dropdown(
                        [(NO_COMPARE, NO_COMPARE), *method_choices], value=NO_COMPARE,
                        label="Side by side with", elem_id="compare",
                    )  # fmt: skip
                    k = gr.Slider(1, MAX_K, value=defaults.k, step=1, label="Results (k)", elem_id="k")
                with gr.Accordion("Query settings", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, 50, value=defaults.num_inference_steps, step=1, label="Sampling steps")
                        samples = gr.Slider(1, 16, value=defaults.num_samples, step=1, label="Averaged samples")
                        modes = service.gallery_modes()
                        gallery_mode = gr.Radio(
                            modes, value=defaults.gallery_mode, label="Gallery", interactive=len(modes) > 1,
                            info="fused: image + caption; image: image alone" + ("" if len(modes) > 1 else
                                  " (one index served; serve a second --retriever for the other mode)"),
                        )  # fmt: skip
                    with gr.Row():
                        control_guidance = gr.Slider(
                            0, 5, value=defaults.control_guidance, step=0.1, label="Control guidance"
                        )
                        text_guidance = gr.Slider(0, 5, value=defaults.text_guidance, step=0.1, label="Text guidance")
                        mix = gr.Slider(0, 1, value=defaults.mix_reference, step=0.05, label="Mix toward the reference")
                with gr.Row():
                    search = gr.Button("Search", variant="primary", elem_id="search")
                    random_query = gr.Button(
                        "Random test query", visible=bool(service.test_queries), elem_id="random-query"
                    )
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                header_a = gr.Markdown(elem_id="header-a")
                results_a = gr.Gallery(label="Results", columns=5, height=RESULT_HEIGHT, elem_id="results-a")
                header_b = gr.Markdown(elem_id="header-b", visible=False)
                results_b = gr.Gallery(
                    label="Side by side", columns=5, height=RESULT_HEIGHT, elem_id="results-b", visible=False
                )
            with gr.Column(scale=2):
                joint_space = gr.Image(
                    label="Where the query landed in the joint space",
                    show_label=False,
                    interactive=False,
                    elem_id="joint-space",
                )
        with gr.Accordion("Gallery: click an image to use it as the reference", open=True):
            gallery_strip = gr.Gallery(strip, columns=12, height=230, allow_preview=False, elem_id="gallery-strip")
        with gr.Accordion("Load another retriever", open=False), gr.Row():
            folder = gr.Textbox(label="Retriever folder", placeholder="runs/demo/retriever", scale=4)
            load = gr.Button("Load", scale=1)

        # ---------------------------------------------------------------- handlers
        def run_search(reference, reference_id, target_id, text, negative_text, method, compare, k, num_inference_steps,
                       control_guidance, text_guidance, num_samples, mix_reference, gallery_mode):  # fmt: skip
            """Batched: every argument is a list, one entry per query of the batch; returns one list per output."""
            requests, messages = [], []
            for row in zip(reference, reference_id, target_id, text, negative_text, method, compare, k,
                           num_inference_steps, control_guidance, text_guidance, num_samples, mix_reference,
                           gallery_mode):  # fmt: skip
                try:
                    requests.append(_request(*row))
                    messages.append("")
                except (FusionDiffError, TypeError, ValueError) as err:  # a bad knob from the API: say so, go on
                    requests.append(None)
                    messages.append(str(err))
            valid = [i for i, request in enumerate(requests) if request is not None]
            answered = dict(zip(valid, service.search([requests[i] for i in valid])))
            rows = [_outputs(answered.get(i), messages[i]) for i in range(len(requests))]
            return [list(column) for column in zip(*rows)]

        def draw_walk(response):
            if response is None:
                return None
            try:
                return str(service.joint_space_figure(response))
            except (FusionDiffError, ValueError, RuntimeError, OSError, KeyError) as err:  # optional: never fatal
                gr.Warning(f"No joint-space picture: {err}")
                return None

        def choose_from_strip(evt: gr.SelectData):
            item = service.gallery_items()[evt.index]
            return str(item.path), str(item.path), item.id, "", f"Reference: gallery item `{item.id}`."

        def fill_random_query():
            query = service.random_test_query(random.Random())
            note = f"Test query `{query.query_id}`: its true target `{query.target_id}` is marked ★ in the results."
            path = str(query.reference_path)
            return path, path, query.reference_id, query.target_id, query.text, note

        def on_upload(path):
            try:
                read_reference(path)
            except FusionDiffError as err:
                return None, "", "", f"⚠️ {err}"
            return path, "", "", f"Reference: uploaded `{Path(path).name}`."

        def load_retriever(path):
            try:
                service.load(path)
            except FusionDiffError as err:
                note = f"⚠️ Could not load {path or '(no folder given)'}: {err} Still serving {service.source}."
                return gr.skip(), gr.skip(), note
            app.allowed_paths = sorted({*(app.allowed_paths or []), *map(str, service.file_roots())})
            strip = [(str(item.path), item.id) for item in service.gallery_items()[:STRIP_SIZE]]
            return service.describe(), strip, f"Loaded {path}."

        def toggle_compare(value):
            shown = value not in (None, "", NO_COMPARE)
            return gr.update(visible=shown), gr.update(visible=shown)

        inputs = [upload, reference_id, target_id, text, negative, method, compare, k, steps, control_guidance,
                  text_guidance, samples, mix, gallery_mode]  # fmt: skip
        outputs = [status, reference_caption, header_a, results_a, header_b, results_b, walk_request]
        search.click(run_search, inputs, outputs, batch=True, max_batch_size=max_batch_size, api_name="search").then(
            draw_walk, walk_request, joint_space, api_name=False
        )
        text.submit(run_search, inputs, outputs, batch=True, max_batch_size=max_batch_size, api_name=False).then(
            draw_walk, walk_request, joint_space, api_name=False
        )
        upload.upload(on_upload, upload, [preview, reference_id, target_id, status], api_name=False)
        gallery_strip.select(
            choose_from_strip, None, [upload, preview, reference_id, target_id, status], api_name=False
        )
        random_query.click(
            fill_random_query, None, [upload, preview, reference_id, target_id, text, status], api_name=False
        )
        compare.change(toggle_compare, compare, [header_b, results_b], api_name=False)
        load.click(load_retriever, folder, [identity, gallery_strip, status], api_name="load_retriever")
    return app


def _request(reference, reference_id, target_id, text, negative_text, method, compare, k, steps, control_guidance,
             text_guidance, num_samples, mix_reference, gallery_mode) -> SearchRequest:  # fmt: skip
    """One query of the batch from the widgets' values (the API may send anything: the knobs are checked)."""
    settings = QuerySettings(method, int(k), int(steps), float(control_guidance), float(text_guidance),
                             int(num_samples), float(mix_reference), gallery_mode)  # fmt: skip
    compare = None if compare in (None, "", NO_COMPARE) else compare
    return SearchRequest(reference, text or "", settings, negative_text or "", compare, reference_id or None,
                         target_id or None)  # fmt: skip


def _outputs(response, message: str) -> list[Any]:
    """The search event's outputs for one query: status, reference caption, two (header, gallery) rows, and
    the response for the joint-space picture (None when there is nothing to draw)."""
    message = message or (response.message if response else "")
    ok = response is not None and not message
    first, second = (response.rankings + [None, None])[:2] if ok else (None, None)
    target_id = response.request.target_id if response else None
    return [
        f"⚠️ {message}" if message else _status(response),
        (response.reference_caption or "") if ok else "",
        _header(first, target_id),
        _gallery(first, target_id),
        _header(second, target_id),
        _gallery(second, target_id),
        response if ok else None,
    ]


def _status(response) -> str:
    if response is None:
        return ""
    times = " · ".join(f"{r.label} {r.seconds:.2f} s" for r in response.rankings)
    return f"Answered in {times}." if times else ""


def launch(app, service: SearchService, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``app`` offline: system fonts, no analytics, uploads capped, gallery files servable."""
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host,
        server_port=port,
        theme=offline_theme(),
        css=CSS,
        allowed_paths=[str(p) for p in service.file_roots()],
        max_file_size=MAX_UPLOAD,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
        ssr_mode=False,
    )
