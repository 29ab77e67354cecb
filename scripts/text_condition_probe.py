"""Does the world backbone's text tower keep the verb of an instruction? Pooled vs token-level text (issue 18).

    python scripts/text_condition_probe.py [--backbone-cache DIR] [--max-text-tokens 32] [--n 2000]

Two measurements on the shapes-world backbone (loaded from its cache, never trained here):

1. Cosine similarities between "remove the {colour} {shape}", "a {colour} {shape}", "add a {colour} {shape}",
   "without the {colour} {shape}" and "there is no {colour} {shape}" over every colour x shape, for the pooled embedding ``f(T)``, for the masked mean of the token states,
   and for the state at the verb's position ("remove" vs "add"; the object phrase has no verb).
2. A linear probe (logistic regression, weight decay) telling removal from addition instructions, trained on
   the world's training phrasing (``data_synth.shapes.instructions``) and tested on the benchmark's held-out
   phrasing (``data_synth.shapes.benchmark_phrasings``), on the same edits of fresh training-split scenes.
   Features: pooled ``f(T)``; masked mean of token states; all token states (padded, masked to zero).
   The world's add instructions often name a place and its removals rarely do, so this probe can pass on the
   rest of the sentence: hence
3. the verb alone: "remove {object phrase}" vs "add {object phrase}" with the same object phrases (size, colour,
   shape, place), trained on half of the objects and tested on the other half.

``--random-init``: the same on an untrained tower of the backbone's architecture (what training changed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import torch
import torch.nn.functional as F

from data_synth.shapes.backbone import WORLD_MODEL, load_world_embedder
from data_synth.shapes.benchmark_phrasings import describe_edit_benchmark
from data_synth.shapes.captions import object_phrase
from data_synth.shapes.edits import sample_edit
from data_synth.shapes.instructions import describe_edit
from data_synth.shapes.scene import COLOURS, GRID, SHAPES, random_object, sample_scene_in_split
from fusion_diff.embedding import OpenCLIPEmbedder
from fusion_diff.embedding.base import JointEmbedder, TextTokens


def masked_mean(tokens: TextTokens) -> torch.Tensor:
    return F.normalize((tokens.states * tokens.mask[..., None]).sum(1) / tokens.mask.sum(1, keepdim=True), dim=-1)


def cosines(embedder: JointEmbedder, max_tokens: int) -> dict[str, dict[str, float]]:
    """Mean cosine similarity of the three phrasings of every colour x shape, per representation."""
    things = [f"{colour} {shape}" for colour, shape in itertools.product(COLOURS, SHAPES)]
    texts = {
        "remove": [f"remove the {t}" for t in things],
        "object": [f"a {t}" for t in things],
        "add": [f"add a {t}" for t in things],
        "without": [f"without the {t}" for t in things],  # negation words (the backbone's captions may use them)
        "no": [f"there is no {t}" for t in things],
    }
    pooled = {k: embedder.embed_texts(v) for k, v in texts.items()}
    tokens = {k: embedder.encode_text_tokens(v, max_tokens) for k, v in texts.items()}
    mean = {k: masked_mean(v) for k, v in tokens.items()}
    verb = {k: F.normalize(tokens[k].states[:, 1], dim=-1) for k in ("remove", "add")}  # position 1: the verb

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float((a * b).sum(-1).mean()), 4)

    pairs = [("remove", "object"), ("remove", "add"), ("add", "object"), ("without", "object"), ("no", "object")]
    return {
        "pooled f(T)": {f"{a} vs {b}": cos(pooled[a], pooled[b]) for a, b in pairs},
        "token states, masked mean": {f"{a} vs {b}": cos(mean[a], mean[b]) for a, b in pairs},
        "token state at the verb": {"remove vs add": cos(verb["remove"], verb["add"])},
    }


def instructions(n: int, seed: int) -> tuple[list[str], list[str], torch.Tensor]:
    """``n`` add/remove edits of training-split scenes (half each): training phrasing, benchmark phrasing, labels."""
    rng = random.Random(seed)
    train, bench, labels = [], [], []
    while len(labels) < n:
        kind = "remove" if len(labels) % 2 else "add"
        scene = sample_scene_in_split(rng, heldout=False)
        edit = sample_edit(scene, rng, kinds=[kind], allow_composite=False)
        if edit is None:
            continue
        train.append(describe_edit(scene, edit, rng))
        bench.append(describe_edit_benchmark(scene, edit, rng))
        labels.append(int(kind == "remove"))
    return train, bench, torch.tensor(labels, dtype=torch.float32)


def verb_only(n: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """ "remove P" / "add P" for ``n // 2`` random object phrases P: texts, labels, and a split by object (half)."""
    rng = random.Random(seed)
    phrases = [
        object_phrase(random_object(rng, (rng.randrange(GRID), rng.randrange(GRID))), rng) for _ in range(n // 2)
    ]
    texts = [f"{verb} {p}" for p in phrases for verb in ("add", "remove")]
    labels = torch.tensor([0.0, 1.0] * len(phrases))
    train_rows = torch.arange(len(texts)) < len(texts) // 2  # the first half of the objects, both verbs
    return texts, labels, train_rows


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    """Logistic regression (full-batch AdamW, standardised features); train and held-out accuracy."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], 1)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(linear(x_train).squeeze(1), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = [
            float(((linear(x).squeeze(1) > 0).float() == y).float().mean())
            for x, y in ((x_train, y_train), (x_test, y_test))
        ]
    return {"train_acc": round(accuracy[0], 4), "heldout_acc": round(accuracy[1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone-cache", default=None, help="world backbone cache folder (default: the shared one)")
    parser.add_argument("--max-text-tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=2000, help="add/remove instructions for the probe (half each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true", help="an untrained tower of the same architecture")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.random_init:
        embedder = OpenCLIPEmbedder(WORLD_MODEL)
    else:
        embedder = load_world_embedder(cache=args.backbone_cache, train_if_missing=False, progress=False)
    train_texts, bench_texts, labels = instructions(args.n, args.seed)
    features = {}
    for name, texts in (("train", train_texts), ("bench", bench_texts)):
        tokens = embedder.encode_text_tokens(texts, args.max_text_tokens)
        features[name] = {
            "pooled f(T)": embedder.embed_texts(texts),
            "token states, masked mean": masked_mean(tokens),
            "token states, all (flattened)": tokens.states.flatten(1),
        }
    texts, verb_labels, train_rows = verb_only(args.n, args.seed)
    tokens = embedder.encode_text_tokens(texts, args.max_text_tokens)
    verb_features = {
        "pooled f(T)": embedder.embed_texts(texts),
        "token states, masked mean": masked_mean(tokens),
        "token states, all (flattened)": tokens.states.flatten(1),
    }
    result = {
        "protocol": (
            f"world backbone {embedder.identity.describe()}{' (random init)' if args.random_init else ''}; "
            f"{args.n} add/remove edits of training-split scenes, "
            f"seed {args.seed}; probe trained on the training phrasing, tested on the benchmark phrasing; "
            f"token states up to {args.max_text_tokens} tokens"
        ),
        "cosine": cosines(embedder, args.max_text_tokens),
        "probe_remove_vs_add": {
            name: probe(features["train"][name], labels, features["bench"][name], labels) for name in features["train"]
        },
        "probe_verb_only_heldout_objects": {
            name: probe(x[train_rows], verb_labels[train_rows], x[~train_rows], verb_labels[~train_rows])
            for name, x in verb_features.items()
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
