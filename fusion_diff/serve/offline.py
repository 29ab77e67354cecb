"""What makes the page work with no network at all: no analytics, no web fonts, no version check.

Gradio's telemetry and its update check read ``GRADIO_ANALYTICS_ENABLED``; the theme names only
fonts the browser already has, so the page never asks fonts.googleapis.com (or any host but the
server) for anything, and a machine without network cannot hang on a font request.
"""

from __future__ import annotations

import os

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "DejaVu Sans", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace")


def disable_telemetry() -> None:
    """Turn Gradio's analytics and update check off for this process (before any Blocks is built)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def offline_theme():
    """Gradio's default look with system fonts only (its stock themes may name web or bundled fonts)."""
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))
