"""Why removals fail (issue 18): can a small network map a triplet's cached inputs to its target, per edit kind?

    python scripts/removal_probe.py runs/demo/triplets runs/demo/triplet_embeddings [--oracle-kind] [--oracle-place] [--epochs 20]

Reads a shapes triplet set and its stage-2 embedding caches (``reference_fused``, ``instruction_text``,
``target_fused``: what the Control-Adapter is trained on), splits the triplets 80/20 at random, trains a 2-layer
MLP (1,024 hidden, cosine loss) from ``[reference fused, pooled instruction text]`` to the target's fused
embedding, and prints R@1 per edit kind: each query's prediction against every held-out target (and, to tell
underfitting from overfitting, against 7,200 of its own training targets). ``--oracle-kind`` also feeds the
edit kind as a one-hot, i.e. what a text condition that names the operation perfectly would give;
``--oracle-place`` the edited object's cell and size (what "remove the red circle" does not say). No benchmark
data is read: this measures what the training signal allows, not a method.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from data_synth.shapes.instructions import NEGATED_REMOVAL_TEMPLATES, compile_template
from data_synth.shapes.scene import GRID, SIZES
from data_synth.triplets.format import iter_samples
from fusion_diff.embedding.cache import EmbeddingCache

CACHES = ("reference_fused", "instruction_text", "target_fused")
SHOWN_KINDS = ("add", "remove", "remove, negated", "recolour", "resize", "move", "replace_shape", "swap", "change_count")


NEGATED = [compile_template(t) for t in NEGATED_REMOVAL_TEMPLATES]


def where(edit: dict) -> torch.Tensor:
    """One-hot cell and size of the (first) object a single edit touches (an addition: the new object); zeros
    for a composite. What "remove the red circle" leaves unsaid."""
    out = torch.zeros(GRID * GRID + len(SIZES))
    if edit["kind"] == "composite":
        return out
    obj = edit["value"] if edit["kind"] == "add" else (edit["objects"] or [None])[0]
    if not isinstance(obj, dict):  # an edit of no single object
        return out
    out[obj["position"][0] * GRID + obj["position"][1]] = 1.0
    out[GRID * GRID + SIZES.index(obj["size"])] = 1.0
    return out


def load(triplets: str, embeddings: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The three caches aligned on the triplet ids, the edited object's place (``where``), and each triplet's
    edit kind (composites as "composite"; removals worded as a negation, ``--negated-removals``, as "remove,
    negated")."""
    kinds, places = {}, {}
    for sample in iter_samples(triplets):
        record = json.loads(sample.files["json"])
        negated = any(t.fullmatch(record["instruction"]) for t in NEGATED)
        kinds[sample.key] = "remove, negated" if negated else sample.kind
        places[sample.key] = where(record["edit"])
    ids, target = EmbeddingCache.read(f"{embeddings}/target_fused").load()
    tensors = {"target_fused": target, "where": torch.stack([places[i] for i in ids])}
    for name in CACHES[:2]:
        tensors[name] = EmbeddingCache.read(f"{embeddings}/{name}").load(ids)[1]
    labels = [kinds[i] if not kinds[i].startswith("composite") else "composite" for i in ids]
    return tensors, labels


def recall_at_1(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per query: is its own target the nearest of all ``targets``?"""
    scores = F.normalize(pred, dim=-1) @ F.normalize(targets, dim=-1).T
    return scores.argmax(1) == torch.arange(len(pred))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("triplets", help="a shapes triplet set (fusion-diff synth shapes / the demo's triplets/)")
    parser.add_argument("embeddings", help="its stage-2 embedding caches (the demo's triplet_embeddings/)")
    parser.add_argument("--oracle-kind", action="store_true", help="also give the network the edit kind (one-hot)")
    parser.add_argument("--oracle-place", action="store_true", help="also give it the edited object's cell and size (one-hot)")
    parser.add_argument("--train-fraction", type=float, default=0.8,
                        help="share of the triplets trained on (<= 0.8; the last 20%% are always the held-out ones)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.train_fraction <= 0.8:
        parser.error(f"--train-fraction must be in (0, 0.8], got {args.train_fraction}")
    torch.manual_seed(args.seed)

    tensors, labels = load(args.triplets, args.embeddings)
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    train, test = order[: int(args.train_fraction * n)], order[int(0.8 * n) :]  # the held-out 20% stay fixed
    inputs = torch.cat([tensors["reference_fused"], tensors["instruction_text"]], 1)
    inputs = (inputs - inputs[train].mean(0)) / inputs[train].std(0).clamp_min(1e-6)
    kinds = sorted(set(labels))
    if args.oracle_kind:
        inputs = torch.cat([inputs, 3.0 * F.one_hot(torch.tensor([kinds.index(k) for k in labels]), len(kinds))], 1)
    if args.oracle_place:
        inputs = torch.cat([inputs, 3.0 * tensors["where"]], 1)
    target = tensors["target_fused"]
    net = torch.nn.Sequential(
        torch.nn.Linear(inputs.shape[1], 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, target.shape[1]),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(args.epochs):
        for batch in train[torch.randperm(len(train))].split(256):
            loss = 1 - F.cosine_similarity(net(inputs[batch]), target[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    seen = train[: len(test)]
    with torch.no_grad():
        hits = {"held-out": recall_at_1(net(inputs[test]), target[test]), "training": recall_at_1(net(inputs[seen]), target[seen])}
    shown = [k for k in (*SHOWN_KINDS, "composite") if k in kinds]
    print("| triplets | " + " | ".join([*shown, "all"]) + " |")
    print("|---|" + "---|" * (len(shown) + 1))
    for split, rows in (("held-out", test), ("training", seen)):
        split_labels = [labels[i] for i in rows.tolist()]
        cells = [100 * float(hits[split][torch.tensor([label == k for label in split_labels])].float().mean()) for k in shown]
        cells.append(100 * float(hits[split].float().mean()))
        print(f"| {split} ({len(rows)}) | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    feed = "reference fused + pooled instruction text" + (" + edit kind (oracle one-hot)" if args.oracle_kind else "")
    feed += " + edited object's cell and size (oracle one-hot)" if args.oracle_place else ""
    print(
        f"\nR@1 (%) of a 2-layer MLP probe ({feed} -> target fused; cosine loss, {args.epochs} epochs, seed {args.seed}, "
        f"trained on {len(train)} triplets), "
        f"each query against the {len(test)} targets of its split; triplets {args.triplets}, embeddings {args.embeddings}."
    )


if __name__ == "__main__":
    main()
