"""Every retrieval method ``fusion-diff eval --method`` knows, by name, imported only when used.

Methods live in different parts of the library (baselines here, Fusion-Diff and emb2emb in
``fusion_diff.pipelines.method``, FTI4CIR in ``fusion_diff.pipelines.fti4cir``); the lazy import
keeps one missing or broken part from blocking the others and turns it into a clear message.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_diff.errors import ConfigError, MissingFileError
from fusion_diff.utils.registry import Registry

if TYPE_CHECKING:  # torch: imported when a method is built, not when the CLI lists the names
    from fusion_diff.embedding.base import JointEmbedder
    from fusion_diff.retrieval.method import RetrievalMethod

# name -> ("module:attribute[.attribute]", what the query is)
METHODS = Registry(
    "method",
    {
        "image-only": ("fusion_diff.baselines.simple:ImageOnly", "the reference image embedding f(I_ref)"),
        "text-only": ("fusion_diff.baselines.simple:TextOnly", "the modification text embedding f(T_mod)"),
        "sum": ("fusion_diff.baselines.simple:SumFusion", "normalize(w f(I_ref) + (1-w) f(T_mod))"),
        "edited-caption": (
            "fusion_diff.baselines.simple:EditedCaption",
            "f(edited caption): the reference's caption edited by a seq2seq caption editor",
        ),
        "emb2emb": (
            "fusion_diff.pipelines.method:Emb2EmbMethod",
            "the prior alone: noise f(I_ref, T_ref), denoise with the text",
        ),
        "fusion-diff": (
            "fusion_diff.pipelines.method:FusionDiffMethod",
            "prior + Control-Adapter sampling of the target's fused embedding",
        ),
        "fti4cir": ("fusion_diff.pipelines.fti4cir:FTI4CIRMethod", "fine-grained textual inversion pseudo-sentence"),
        "oracle-target-text": (
            "fusion_diff.baselines.oracle:OracleTargetText.from_benchmark",
            "ORACLE: text embedding of the target's ground-truth caption",
        ),
        "oracle-target-fused": (
            "fusion_diff.baselines.oracle:OracleTargetFused.from_benchmark",
            "ORACLE: fused embedding of the target image and its ground-truth caption",
        ),
    },
)


PIPELINE_METHODS = ("fusion-diff", "emb2emb")  # methods built around a saved FusionDiffPipeline


def method_factory(name: str) -> Callable[..., RetrievalMethod]:
    """The class (or constructor function) of method ``name``, imported now."""
    return METHODS.load(name)


def load_pipeline(path: str | os.PathLike, sampler: str | None = None, embedder: JointEmbedder | None = None) -> Any:
    """A saved ``FusionDiffPipeline`` (``save_pretrained`` folder), optionally with another sampler; with
    ``embedder``, refused unless the prior was trained on that backbone."""
    if not Path(path).is_dir():
        raise MissingFileError(
            f"Fusion-Diff pipeline folder not found: {path}. Train one (fusion-diff train ...) or fix the path."
        )
    from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline

    pipeline = FusionDiffPipeline.from_pretrained(path, embedder=embedder)
    if sampler:
        pipeline.set_sampler(sampler)
    return pipeline


def method_options(name: str) -> set[str] | None:
    """The option names method ``name`` takes (its constructor's keyword arguments, plus ``sampler`` for the
    sampling methods); None when it takes any."""
    parameters = inspect.signature(method_factory(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters) | ({"sampler"} if name in PIPELINE_METHODS else set())


def check_method_options(name: str, options: dict[str, Any], source: str) -> dict[str, Any]:
    """``options`` of method ``name`` checked against its constructor's signature before anything is loaded:
    an unknown key (with the closest known one), a wrong type or a non-finite number fails naming ``source``
    and the key; numbers come back as the annotated type. Options of other types (a pipeline object) pass."""
    from fusion_diff.training.config import convert_value, did_you_mean

    accepted = method_options(name)
    if accepted is None:
        return dict(options)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"{source}: method {name!r} does not take option(s) {unknown}{did_you_mean(unknown[0], accepted)}; "
            f"it takes {sorted(accepted)}."
        )
    hints = _option_hints(name)
    return {
        key: convert_value(value, hints[key], source, key) if _plain_type(hints.get(key)) else value
        for key, value in options.items()
    }


def _option_hints(name: str) -> dict[str, Any]:
    """The resolvable type annotations of method ``name``'s options (names only imported for type checking
    are left out, and their options go unchecked)."""
    factory = method_factory(name)
    function = factory.__init__ if inspect.isclass(factory) else factory
    namespace = vars(sys.modules[function.__module__])
    hints = {}
    for key, parameter in inspect.signature(factory).parameters.items():
        holder = type("Annotation", (), {"__annotations__": {key: parameter.annotation}})
        try:
            hints[key] = typing.get_type_hints(holder, globalns=namespace)[key]
        except (NameError, TypeError):
            continue
    return hints


def _plain_type(hint: Any) -> bool:
    """Whether ``hint`` is made of int/float/bool/str/None/Literal only (what a config or a --set value can be)."""
    if hint in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return True
    return origin in (typing.Union, types.UnionType) and all(
        _plain_type(arg) for arg in typing.get_args(hint)
    )


def create_method(name: str, /, *, embedder: JointEmbedder | None = None, **options: Any) -> RetrievalMethod:
    """Build method ``name`` with ``options`` (its constructor's keyword arguments); unknown options fail, named.

    Sampling methods (``fusion-diff``, ``emb2emb``) also accept ``pipeline`` as a folder path and a
    ``sampler`` name (``ddim``, ``dpm++``, ...), which are loaded and applied here; with ``embedder`` (the
    backbone it will be evaluated with) a pipeline whose prior was trained on another backbone is refused now,
    before anything is embedded.
    """
    options = check_method_options(name, options, f"method {name!r}")
    if name in PIPELINE_METHODS and options.get("pipeline") is not None:
        pipeline, sampler = options["pipeline"], options.pop("sampler", None)
        if isinstance(pipeline, (str, os.PathLike)):
            pipeline = load_pipeline(pipeline, sampler, embedder)
        elif sampler:
            raise ConfigError(
                f"{name}: `sampler` applies to a pipeline folder; call pipeline.set_sampler({sampler!r}) instead."
            )
        elif embedder is not None:
            pipeline.bind_embedder(embedder)
        options["pipeline"] = pipeline
    method = method_factory(name)(**options)
    from fusion_diff.retrieval.method import RetrievalMethod

    if not isinstance(method, RetrievalMethod):
        raise ConfigError(
            f"{METHODS[name][0]} did not build a RetrievalMethod (name, gallery_mode, protocol, query_embeddings)."
        )
    return method
