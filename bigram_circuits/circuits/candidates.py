"""Candidate circuits from three methods, each a scored :class:`~bigram_circuits.circuits.ablation.Candidate`.

- **Head scores** (:func:`head_score_candidates`): previous-token and induction scores of every
  head on repeated random tokens (:func:`~bigram_circuits.circuits.ablation.head_scores`);
  no task, no corrupted prompt.
- **Activation patching** (:func:`patching_scores`): each head's output (``attn.hook_z``, all
  positions at once) is copied from the clean run into the corrupted run, one head at a time;
  score = the fraction of the clean-corrupted metric gap that the patch recovers. Exact, one
  forward pass per head.
- **Attribution patching** (:func:`attribution_scores`): TransformerLens' own node-level
  attribution patching on the bridge
  (:func:`transformer_lens.tools.analysis.attribution_patch`, first shipped in
  transformer-lens 4.3.0: ``(a_clean - a_corrupt) . d metric / d a`` on the corrupted run).
  Its per-position node scores are summed over positions (the linear estimate of patching the
  head at every position) and divided by the clean-corrupted gap, so the score estimates the
  same recovered fraction as activation patching from two forward passes and one backward pass
  per prompt pair.

A *task* supplies ``clean`` and ``corrupted`` token batches of equal shape and
``metric_fn(index) -> (logits -> scalar)`` for the prompts ``index`` (:class:`PairTask`; see
:mod:`bigram_circuits.circuits.tasks`). Every score is oriented so that larger means "restores
more of the clean behaviour"; candidates keep the scores of every head, so
``candidate.top_k(k)`` cuts them and :func:`candidate_agreement` compares methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import Candidate, head_scores
from bigram_circuits.circuits.patching import patch
from bigram_circuits.circuits.runs import RunLike, RunSpec
from bigram_circuits.circuits.tasks import PairTask
from bigram_circuits.errors import ConfigError, MaskError, TokenError

__all__ = [
    "ATTRIBUTION_SOURCE",
    "PairTask",
    "attribution_candidate",
    "attribution_scores",
    "candidate_agreement",
    "candidate_from_scores",
    "head_candidates_from_scores",
    "head_label",
    "head_score_candidates",
    "method_head_table",
    "patching_candidate",
    "patching_scores",
    "transformer_lens_version",
]

# Where attribution patching comes from (recorded in results next to the installed version).
ATTRIBUTION_SOURCE = "transformer_lens.tools.analysis.attribution_patch (node granularity)"


def transformer_lens_version() -> str:
    """The installed transformer-lens version (``"unknown"`` when not installed as a package)."""
    try:
        return version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        return "unknown"


def head_label(layer: int, head: int) -> str:
    """``L{layer}H{head}``, the usual way to name a head."""
    return f"L{int(layer)}H{int(head)}"


def candidate_from_scores(
    scores: pd.DataFrame,
    name: str,
    top_k: int,
    *,
    column: str = "score",
    method: str | None = None,
) -> Candidate:
    """A head candidate from a per-head score table (columns ``layer``, ``head``, ``column``):
    the ``top_k`` highest-scoring heads; the scores of every head travel with it."""
    missing = [c for c in ("layer", "head", column) if c not in scores.columns]
    if missing:
        raise MaskError(f"the score table lacks column(s) {missing}; it needs layer, head, {column}")
    if "kind" in scores.columns:
        scores = scores[scores["kind"] == "head"]
    finite = scores[np.isfinite(scores[column].astype(float))]
    if finite.empty or top_k < 1:
        raise MaskError(f"no finite {column} scores to choose heads from (top_k={top_k})")
    table = {
        ("head", int(layer), int(head)): float(value)
        for layer, head, value in zip(finite["layer"], finite["head"], finite[column])
    }
    ranked = finite.sort_values(column, ascending=False, kind="stable").head(int(top_k))
    return Candidate(
        name=name,
        heads=[(int(layer), int(head)) for layer, head in zip(ranked["layer"], ranked["head"])],
        scores=table,
        method=method or name,
    )


# --------------------------------------------------------------------------- head scores


def head_score_candidates(
    bridge: TransformerBridge,
    vocab_size: int,
    *,
    n_induction: int = 5,
    n_previous: int = 3,
    seq_len: int = 32,
    n_sequences: int = 16,
    seed: int = 1,
    low: int = 0,
    pool: Sequence[int] | None = None,
    run: RunLike = None,
) -> tuple[dict[str, Candidate], pd.DataFrame]:
    """Induction and previous-token heads from attention patterns on repeated random tokens.

    Returns ``{"induction heads": ..., "previous-token heads": ...,
    "induction + previous-token": ...}`` (top ``n_induction`` heads by induction score, top
    ``n_previous`` by previous-token score, and their union, scored by the larger of its two
    scores) and the full score table of :func:`head_scores`.
    """
    if n_induction < 1 or n_previous < 0:
        raise ConfigError("n_induction must be >= 1 and n_previous >= 0")
    scores = head_scores(bridge, vocab_size, seq_len, n_sequences, seed, run=run, low=low, pool=pool)
    return head_candidates_from_scores(scores, n_induction, n_previous), scores


def head_candidates_from_scores(
    scores: pd.DataFrame, n_induction: int = 5, n_previous: int = 3
) -> dict[str, Candidate]:
    """The candidates of :func:`head_score_candidates` from an existing :func:`head_scores`
    table (columns layer, head, induction_score, previous_token_score)."""
    if n_induction < 1 or n_previous < 0:
        raise ConfigError("n_induction must be >= 1 and n_previous >= 0")
    induction = candidate_from_scores(
        scores, "induction heads", n_induction, column="induction_score", method="head scores"
    )
    candidates = {"induction heads": induction}
    if n_previous:
        previous = candidate_from_scores(
            scores,
            "previous-token heads",
            n_previous,
            column="previous_token_score",
            method="head scores",
        )
        both = {key: max(induction.scores[key], previous.scores[key]) for key in induction.scores}
        candidates["previous-token heads"] = previous
        candidates["induction + previous-token"] = Candidate(
            name="induction + previous-token",
            heads=sorted(set(induction.heads) | set(previous.heads)),
            scores=both,
            method="head scores",
        )
    return candidates


# --------------------------------------------------------------------------- activation patching


def _pair(task: PairTask, n_examples: int | None) -> tuple[torch.Tensor, torch.Tensor, slice]:
    clean, corrupted = task.clean, task.corrupted
    if clean.shape != corrupted.shape:
        raise TokenError(
            f"task {task.name!r}: clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape"
        )
    n = clean.shape[0] if n_examples is None else min(int(n_examples), clean.shape[0])
    if n < 1:
        raise ConfigError(f"task {task.name!r} has no prompt pairs; pass n_examples >= 1")
    return clean[:n], corrupted[:n], slice(0, n)


def patching_scores(
    bridge: TransformerBridge,
    task: PairTask,
    *,
    n_examples: int | None = None,
    run: RunLike = None,
) -> pd.DataFrame:
    """Activation patching of every head (``attn.hook_z``, all positions at once), clean into
    corrupted, under ``run`` (default the full model) on the first ``n_examples`` pairs.

    Columns: kind ("head"), layer, head, label, score (= recovered fraction of the
    clean-corrupted metric gap), metric. ``attrs``: clean_metric, corrupted_metric.
    """
    clean, corrupted, index = _pair(task, n_examples)
    metric = task.metric_fn(index)
    table = patch(bridge, clean, corrupted, "head", metric, "all", clean_run=run, corrupted_run=run)
    out = pd.DataFrame(
        {
            "kind": "head",
            "layer": table["layer"].astype(int),
            "head": table["head"].astype(int),
            "score": table["recovered"].astype(float),
            "metric": table["metric"].astype(float),
        }
    )
    out.insert(3, "label", [head_label(a, b) for a, b in zip(out["layer"], out["head"])])
    out.attrs.update(
        clean_metric=table.attrs["clean_metric"],
        corrupted_metric=table.attrs["corrupted_metric"],
        method="activation patching",
        n_examples=index.stop,
    )
    return out


def patching_candidate(
    bridge: TransformerBridge,
    task: PairTask,
    *,
    top_k: int = 5,
    n_examples: int | None = None,
    run: RunLike = None,
    name: str | None = None,
) -> Candidate:
    """The ``top_k`` heads whose activation patch recovers the most of ``task``'s gap."""
    scores = patching_scores(bridge, task, n_examples=n_examples, run=run)
    return candidate_from_scores(scores, name or f"patching top {top_k}", top_k, method="activation patching")


# --------------------------------------------------------------------------- attribution patching


def attribution_scores(
    bridge: TransformerBridge,
    task: PairTask,
    *,
    n_examples: int | None = None,
    run: RunLike = None,
    progress: bool = False,
) -> pd.DataFrame:
    """TransformerLens 4.3 node-level attribution patching, per head and per MLP layer.

    Calls ``transformer_lens.tools.analysis.attribution_patch`` once per prompt pair (the
    task's metric reads per-prompt answers), sums each node's score over positions and
    averages over pairs; ``score`` = that estimate divided by the measured clean-corrupted
    gap of the metric (an estimated recovered fraction, comparable with
    :func:`patching_scores`). Columns: kind ("head" | "mlp"), layer, head (-1 for MLP rows),
    label, raw (the library's summed score), score. ``attrs``: clean_metric,
    corrupted_metric, transformer_lens version, source.
    """
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    clean, corrupted, index = _pair(task, n_examples)
    spec = RunSpec.coerce(run)
    n_layers, n_heads = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    heads = np.zeros((n_layers, n_heads))
    mlps = np.zeros(n_layers)
    config = EdgeAttributionConfig(granularity="node")
    with spec.context(bridge), torch.enable_grad():
        with torch.no_grad():
            clean_metric = float(task.metric_fn(index)(bridge(clean)))
            corrupted_metric = float(task.metric_fn(index)(bridge(corrupted)))
        for i in tqdm(range(clean.shape[0]), desc="attribution patching", disable=not progress):
            result = attribution_patch(
                bridge,
                clean[i : i + 1],
                corrupted[i : i + 1],
                task.metric_fn(slice(i, i + 1)),
                config,
            )
            for node, value in result.node_scores.items():
                if node.kind == "attn_head_out":
                    heads[node.layer, node.head] += value
                elif node.kind == "mlp_out":
                    mlps[node.layer] += value
    gap = clean_metric - corrupted_metric
    if gap == 0:
        raise ConfigError(
            f"task {task.name!r}: clean and corrupted prompts give the same metric; choose prompts it separates"
        )
    n = clean.shape[0]
    rows = [
        ("head", layer, head, head_label(layer, head), heads[layer, head] / n)
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    rows += [("mlp", layer, -1, f"MLP{layer}", mlps[layer] / n) for layer in range(n_layers)]
    out = pd.DataFrame(rows, columns=["kind", "layer", "head", "label", "raw"])
    out["score"] = out["raw"] / gap
    out.attrs.update(
        clean_metric=clean_metric,
        corrupted_metric=corrupted_metric,
        method="attribution patching",
        source=ATTRIBUTION_SOURCE,
        transformer_lens=transformer_lens_version(),
        n_examples=n,
    )
    return out


def attribution_candidate(
    bridge: TransformerBridge,
    task: PairTask,
    *,
    top_k: int = 5,
    n_examples: int | None = None,
    run: RunLike = None,
    name: str | None = None,
) -> Candidate:
    """The ``top_k`` heads with the largest attribution-patching estimate for ``task``."""
    scores = attribution_scores(bridge, task, n_examples=n_examples, run=run)
    return candidate_from_scores(scores, name or f"attribution top {top_k}", top_k, method="attribution patching")


# --------------------------------------------------------------------------- comparing methods


def _head_scores_of(candidate: Candidate) -> pd.Series:
    pairs = {(layer, index): value for (kind, layer, index), value in candidate.scores.items() if kind == "head"}
    return pd.Series(pairs, dtype=float)


def candidate_agreement(candidates: Mapping[str, Candidate]) -> pd.DataFrame:
    """Pairwise agreement of candidates: shared heads, Jaccard index of their head sets, and
    the Spearman rank correlation of their scores over the heads both methods scored.

    Columns: a, b, n_a, n_b, shared, jaccard, shared_heads (``L..H..`` list), spearman,
    n_scored (heads in the correlation).
    """
    names = list(candidates)
    if len(names) < 2:
        raise MaskError("candidate_agreement needs at least two candidates")
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            heads_a, heads_b = set(candidates[a].heads), set(candidates[b].heads)
            shared = sorted(heads_a & heads_b)
            union = heads_a | heads_b
            scores_a, scores_b = _head_scores_of(candidates[a]), _head_scores_of(candidates[b])
            common = scores_a.index.intersection(scores_b.index)
            spearman = (
                float(scores_a[common].corr(scores_b[common], method="spearman")) if len(common) >= 3 else float("nan")
            )
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "n_a": len(heads_a),
                    "n_b": len(heads_b),
                    "shared": len(shared),
                    "jaccard": len(shared) / len(union) if union else float("nan"),
                    "shared_heads": ", ".join(head_label(*h) for h in shared),
                    "spearman": spearman,
                    "n_scored": len(common),
                }
            )
    return pd.DataFrame(rows)


def method_head_table(candidates: Mapping[str, Candidate]) -> pd.DataFrame:
    """Which candidate picked which head: one row per head chosen by any candidate, with each
    candidate's score and whether it chose the head (``<name>: score`` / ``<name>: chosen``).
    Sorted by how many candidates chose the head."""
    chosen = sorted({head for c in candidates.values() for head in c.heads})
    if not chosen:
        raise MaskError("the candidates hold no heads")
    rows = []
    for layer, head in chosen:
        row: dict[str, Any] = {"head": head_label(layer, head), "layer": layer, "index": head}
        picks = 0
        for name, candidate in candidates.items():
            is_chosen = (layer, head) in candidate.heads
            picks += is_chosen
            row[f"{name}: chosen"] = is_chosen
            row[f"{name}: score"] = candidate.scores.get(("head", layer, head), float("nan"))
        row["n_methods"] = picks
        rows.append(row)
    return (
        pd.DataFrame(rows)
        .sort_values(["n_methods", "layer", "index"], ascending=[False, True, True])
        .reset_index(drop=True)
    )
