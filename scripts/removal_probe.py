"""Why removals fail (issue 18): can a small network map a triplet's cached inputs to its target, per edit kind?

    python scripts/removal_probe.py runs/demo/triplets runs/demo/triplet_embeddings [--oracle-kind] [--oracle-place] [--epochs 20]
    python scripts/removal_probe.py runs/demo/triplets runs/demo/triplet_embeddings --residual
    python scripts/removal_probe.py runs/demo/triplets runs/demo/triplet_embeddings --attention [--reference-patches] [--instruction-tokens 24]
    python scripts/removal_probe.py runs/demo/triplets runs/demo/triplet_embeddings --reverse-rerank 50

Reads a shapes triplet set and its stage-2 embedding caches (``reference_fused``, ``instruction_text``,
``target_fused``: what the Control-Adapter is trained on), splits the triplets 80/20 at random, trains a 2-layer
MLP (1,024 hidden, cosine loss) from ``[reference fused, pooled instruction text]`` to the target's fused
embedding, and prints R@1 per edit kind: each query's prediction against every held-out target (and, to tell
underfitting from overfitting, against 7,200 of its own training targets). ``--oracle-kind`` also feeds the
edit kind as a one-hot, i.e. what a text condition that names the operation perfectly would give;
``--oracle-place`` the edited object's cell and size (what "remove the red circle" does not say). ``--residual``
makes the MLP predict the edit instead of the target, ``reference + mean + std x mlp(...)`` with the statistics of
``target - reference`` on the training triplets: the whole width of the network goes to the (small) change a
removal makes, none to copying the reference.

``--attention`` swaps the MLP for a small transformer (2 blocks of the prior's kind) that reads the same inputs as
tokens and can also read what one pooled vector hides: ``--reference-patches`` adds the reference image's
per-patch states (where each object is), ``--instruction-tokens N`` the instruction's token states (its verb)
instead of its pooled embedding. Both come from the world backbone the caches were made with (``--backbone-cache``,
default ``$FUSION_DIFF_CACHE``); a backbone of another identity is refused.

``--reverse-rerank K`` also trains the MLP the other way round, ``[target fused, pooled instruction] -> reference
fused`` (for a removal that is adding the object back: composing, which the forward probe does well), and
re-ranks each query's forward top-K candidates by ``forward score + w * cos(reverse(candidate, instruction),
reference)`` (analysis by synthesis: which candidate, edited back, gives the reference?), for several ``w``.
(Its gain here does not carry over to the benchmark's near misses: ``scripts/reverse_rerank_check.py``.)

No benchmark data is read: this measures what the training signal allows, not a method.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from data_synth.shapes.backbone import load_world_embedder
from data_synth.shapes.instructions import NEGATED_REMOVAL_TEMPLATES, compile_template
from data_synth.shapes.scene import GRID, SIZES
from data_synth.triplets.format import decode, iter_samples
from fusion_diff.embedding.base import EmbedderIdentity
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError
from fusion_diff.models.prior import TransformerBlock
from fusion_diff.utils.io import read_json

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


def backbone_states(
    triplets: str, embeddings: str, ids: list[str], patches: bool, max_tokens: int, cache: str | None
) -> dict[str, torch.Tensor]:
    """The reference images' per-patch states and/or the instructions' token states (with their mask), in the
    order of ``ids``, from the world backbone that made the caches."""
    embedder = load_world_embedder(cache, train_if_missing=False, progress=False)
    made_by = read_json(f"{embeddings}/manifest.json", "triplet embedding manifest")["embedder"]
    differing = EmbedderIdentity.space_differences(made_by, embedder.identity.as_dict())
    if differing:
        raise CacheMismatchError(
            f"{embeddings} was embedded by another backbone than the one in "
            f"{cache or '$FUSION_DIFF_CACHE'} (differing: {differing}); pass the backbone cache it was made with "
            "as --backbone-cache."
        )
    row = {key: i for i, key in enumerate(ids)}
    images, instructions = [None] * len(ids), [""] * len(ids)
    for sample in iter_samples(triplets):
        triplet = decode(sample, images=patches)
        images[row[triplet.id]], instructions[row[triplet.id]] = triplet.reference_image, triplet.instruction
    out = {}
    if patches:
        out["patches"] = embedder.encode_image_tokens(images, batch_size=512)
    if max_tokens:
        out["tokens"], out["token_mask"] = embedder.encode_text_tokens(instructions, max_tokens)
    return out


class AttentionProbe(nn.Module):
    """``[reference fused, output query, instruction (pooled, or its tokens), reference patches?]`` -> target,
    read out at the query token. Each input kind is layer-normed, projected and tagged with a type embedding;
    token and patch sequences also get positions."""

    def __init__(self, dim: int, num_tokens: int, num_patches: int, hidden: int = 192, num_blocks: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))  # reference, instruction, patches
        self.projs = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(3))
        self.types = nn.Parameter(torch.randn(4, hidden) * 0.02)  # + the query's
        self.query = nn.Parameter(torch.randn(hidden) * 0.02)
        self.token_positions = nn.Parameter(torch.randn(max(num_tokens, 1), hidden) * 0.02)
        self.patch_positions = nn.Parameter(torch.randn(max(num_patches, 1), hidden) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, 4) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def embed(self, kind: int, x: torch.Tensor) -> torch.Tensor:
        return self.projs[kind](self.norms[kind](x)) + self.types[kind]

    def forward(
        self, reference: torch.Tensor, instruction: torch.Tensor, mask: torch.Tensor | None, patches: torch.Tensor | None
    ) -> torch.Tensor:
        b = reference.shape[0]
        sequence = [self.embed(0, reference)[:, None], (self.query + self.types[3]).expand(b, 1, -1)]
        if instruction.dim() == 2:
            sequence.append(self.embed(1, instruction)[:, None])
        else:
            sequence.append(self.embed(1, instruction) + self.token_positions[: instruction.shape[1]])
        if patches is not None:
            sequence.append(self.embed(2, patches) + self.patch_positions)
        hidden = torch.cat(sequence, 1)
        keep = None
        if mask is not None:
            keep = torch.ones(b, hidden.shape[1], dtype=torch.bool)
            keep[:, 2 : 2 + mask.shape[1]] = mask
            keep = keep[:, None, None]
        for block in self.blocks:
            hidden = block(hidden, keep)
        return self.out(hidden[:, 1])


def recall_at_1(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per query: is its own target the nearest of all ``targets``?"""
    scores = F.normalize(pred, dim=-1) @ F.normalize(targets, dim=-1).T
    return scores.argmax(1) == torch.arange(len(pred))


def fit(
    predict, train: torch.Tensor, target: torch.Tensor, epochs: int, optimizer: torch.optim.Optimizer, schedule=None
) -> None:
    """Minimise ``1 - cos(predict(rows), target[rows])`` over shuffled batches of 256 training rows."""
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train))].split(256):
            loss = 1 - F.cosine_similarity(predict(batch), target[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()


def mlp(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, outputs))


def standardised(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (x - x[rows].mean(0)) / x[rows].std(0).clamp_min(1e-6)


def print_rows(rows: list[tuple[str, torch.Tensor, torch.Tensor]], labels: list[str], shown: list[str]) -> None:
    """A markdown table: per row name, the share of ``hits`` (bool, one per query of ``queries``) per edit kind."""
    print("| triplets | " + " | ".join([*shown, "all"]) + " |")
    print("|---|" + "---|" * (len(shown) + 1))
    for name, queries, hits in rows:
        kinds = [labels[i] for i in queries.tolist()]
        cells = [100 * float(hits[torch.tensor([kind == k for kind in kinds])].float().mean()) for k in shown]
        cells.append(100 * float(hits.float().mean()))
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def reverse_rerank(
    forward: torch.Tensor, tensors: dict[str, torch.Tensor], train: torch.Tensor, test: torch.Tensor, k: int, epochs: int
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Rows for ``print_rows``: R@1 of the forward predictions re-ranked within their top-``k`` held-out targets by
    a reverse MLP (target + instruction -> reference), for several weights of the reverse score."""
    reference, instruction, target = (tensors[name].float() for name in ("reference_fused", "instruction_text", "target_fused"))
    inputs = torch.cat([standardised(target, train), standardised(instruction, train)], 1)
    net = mlp(inputs.shape[1], reference.shape[1])
    fit(lambda rows: net(inputs[rows]), train, reference, epochs, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01))
    net.eval()
    scores = F.normalize(forward, dim=-1) @ F.normalize(target[test], dim=-1).T
    forward_scores, candidates = scores.topk(min(k, len(test)), dim=1)  # positions within ``test``
    with torch.no_grad():
        d = target.shape[1]  # each candidate's target half with the query's instruction half
        pairs = torch.cat([inputs[test][candidates][..., :d], inputs[test][:, None, d:].expand(-1, candidates.shape[1], -1)], -1)
        edited_back = torch.cat([net(chunk) for chunk in pairs.flatten(0, 1).split(8192)]).view(*candidates.shape, -1)
    reverse_scores = (F.normalize(edited_back, dim=-1) * F.normalize(reference[test], dim=-1)[:, None]).sum(-1)
    own = torch.arange(len(test))[:, None]
    rows = [(f"held-out, target in the forward top-{candidates.shape[1]}", test, (candidates == own).any(1))]
    for weight in (0.0, 0.5, 1.0, 2.0, 4.0, None):
        combined = reverse_scores if weight is None else forward_scores + weight * reverse_scores
        best = candidates.gather(1, combined.argmax(1, keepdim=True))
        name = "held-out, reverse score only" if weight is None else f"held-out, forward + {weight:g} x reverse"
        rows.append((name, test, (best == own).squeeze(1)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("triplets", help="a shapes triplet set (fusion-diff synth shapes / the demo's triplets/)")
    parser.add_argument("embeddings", help="its stage-2 embedding caches (the demo's triplet_embeddings/)")
    parser.add_argument("--oracle-kind", action="store_true", help="also give the network the edit kind (one-hot)")
    parser.add_argument("--oracle-place", action="store_true", help="also give it the edited object's cell and size (one-hot)")
    parser.add_argument("--residual", action="store_true",
                        help="MLP probe: predict target - reference (standardised), added to the reference")
    parser.add_argument("--train-fraction", type=float, default=0.8,
                        help="share of the triplets trained on (<= 0.8; the last 20%% are always the held-out ones)")
    parser.add_argument("--attention", action="store_true", help="a 2-block transformer probe instead of the MLP")
    parser.add_argument("--reference-patches", action="store_true",
                        help="attention probe: also the reference image's per-patch states")
    parser.add_argument("--instruction-tokens", type=int, default=0, metavar="N",
                        help="attention probe: the instruction's first N token states instead of its pooled embedding")
    parser.add_argument("--backbone-cache", default=None,
                        help="the world backbone the caches were made with (default: $FUSION_DIFF_CACHE's)")
    parser.add_argument("--reverse-rerank", type=int, default=0, metavar="K",
                        help="MLP probe: also re-rank the forward top-K by a reverse MLP (target -> reference)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (MLP) or 6 (attention)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.train_fraction <= 0.8:
        parser.error(f"--train-fraction must be in (0, 0.8], got {args.train_fraction}")
    if not args.attention and (args.reference_patches or args.instruction_tokens):
        parser.error("--reference-patches and --instruction-tokens feed the attention probe; add --attention")
    if args.attention and (args.oracle_kind or args.oracle_place or args.reverse_rerank or args.residual):
        parser.error("--oracle-kind, --oracle-place, --residual and --reverse-rerank go with the MLP probe; drop --attention")
    if args.reverse_rerank and (args.oracle_kind or args.oracle_place):
        parser.error("--reverse-rerank compares the plain MLP both ways; drop --oracle-kind / --oracle-place")
    epochs = args.epochs or (6 if args.attention else 20)
    torch.manual_seed(args.seed)

    tensors, labels = load(args.triplets, args.embeddings)
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    train, test = order[: int(args.train_fraction * n)], order[int(0.8 * n) :]  # the held-out 20% stay fixed
    kinds = sorted(set(labels))
    target = tensors["target_fused"]
    if args.attention:
        ids = EmbeddingCache.read(f"{args.embeddings}/target_fused").ids
        states = backbone_states(
            args.triplets, args.embeddings, ids, args.reference_patches, args.instruction_tokens, args.backbone_cache
        )
        patches, tokens = states.get("patches"), states.get("tokens")
        instruction = tokens if tokens is not None else tensors["instruction_text"]
        net = AttentionProbe(target.shape[1], args.instruction_tokens, 0 if patches is None else patches.shape[1])

        def predict(rows: torch.Tensor) -> torch.Tensor:
            return net(
                tensors["reference_fused"][rows],
                instruction[rows],
                None if tokens is None else states["token_mask"][rows],
                None if patches is None else patches[rows],
            )

        optimizer = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.01)
        steps = epochs * -(-len(train) // 256)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-4, total_steps=steps, pct_start=0.05)
    else:
        inputs = standardised(torch.cat([tensors["reference_fused"], tensors["instruction_text"]], 1), train)
        if args.oracle_kind:
            inputs = torch.cat([inputs, 3.0 * F.one_hot(torch.tensor([kinds.index(k) for k in labels]), len(kinds))], 1)
        if args.oracle_place:
            inputs = torch.cat([inputs, 3.0 * tensors["where"]], 1)
        net = mlp(inputs.shape[1], target.shape[1])
        reference = tensors["reference_fused"]
        change = target[train] - reference[train]
        shift, scale = change.mean(0), change.std(0)

        def predict(rows: torch.Tensor) -> torch.Tensor:
            if args.residual:
                return reference[rows] + shift + scale * net(inputs[rows])
            return net(inputs[rows])

        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        schedule = None
    fit(predict, train, target, epochs, optimizer, schedule)
    net.eval()
    seen = train[: len(test)]
    with torch.no_grad():
        predictions = {split: torch.cat([predict(chunk) for chunk in rows.split(1024)]) for split, rows in (("held-out", test), ("training", seen))}
    shown = [k for k in (*SHOWN_KINDS, "composite") if k in kinds]
    rows = [(f"{split} ({len(ids)})", ids, recall_at_1(predictions[split], target[ids])) for split, ids in (("held-out", test), ("training", seen))]
    if args.reverse_rerank:
        rows += reverse_rerank(predictions["held-out"], tensors, train, test, args.reverse_rerank, epochs)
    print_rows(rows, labels, shown)
    if args.attention:
        feed = "reference fused + " + (f"instruction token states (<= {args.instruction_tokens})" if tokens is not None else "pooled instruction text")
        feed += " + reference patch states" if patches is not None else ""
        probe = "2-block transformer probe"
    else:
        feed = "reference fused + pooled instruction text" + (" + edit kind (oracle one-hot)" if args.oracle_kind else "")
        feed += " + edited object's cell and size (oracle one-hot)" if args.oracle_place else ""
        probe = "2-layer MLP probe" + (" of the change (residual: reference + standardised output)" if args.residual else "")
    print(
        f"\nR@1 (%) of a {probe} ({feed} -> target fused; cosine loss, {epochs} epochs, seed {args.seed}, "
        f"trained on {len(train)} triplets), "
        f"each query against the {len(test)} targets of its split; triplets {args.triplets}, embeddings {args.embeddings}."
        + (
            f" Re-ranked rows: a second MLP, [target fused, pooled instruction] -> reference fused, trained alike, "
            f"scores each query's forward top-{args.reverse_rerank} by cos(its output, the reference)."
            if args.reverse_rerank
            else ""
        )
    )


if __name__ == "__main__":
    main()
