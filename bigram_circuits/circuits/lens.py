"""Logit lens and the paper's linear lens (ridge maps to the input and output representations).

Hidden states X_0..X_L are the residual stream before the final layer norm: X_0 the embedding
output, X_l the stream entering block l, X_L the stream after the last block
(:func:`bigram_circuits.circuits.runs.hidden_state_names`).

*Logit lens*: apply the model's final layer norm and unembedding to every X_l. Reported per
layer: KL divergence from the run's own final output distribution, agreement of the top
token with the final top token, next-token loss and (given bigram statistics) the Pearson r
between the lens surprisal and the bigram surprisal of the actual next token.

*Linear lens* (Chang & Bergen 2025, "Mechanistic analyses"): ridge regressions (alpha 1, with
an unpenalised intercept, closed form in float64) from X_l to X_in (the raw token embeddings
W_E of the input tokens) and to X_out (= X_L). Maps are fitted on the first windows and
evaluated on held-out windows (``test_fraction``). Reported per layer and target:

- ``rotation_deg``: median |angle| (degrees) of the complex eigenvalues of the d x d map;
- ``r2``: held-out coefficient of determination of the map;
- ``recall@k``: for the *input* target, the fraction of held-out tokens whose input token is
  among the k token embeddings most cosine-similar to the map's prediction; for the *output*
  target, the fraction whose actual next token is in the top k of the model's final layer
  norm + unembedding applied to the predicted X_out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer
from tqdm.auto import tqdm

from bigram_circuits.circuits.runs import (
    SubnetworkLike,
    as_token_tensor,
    collect_activations,
    hidden_state_names,
    run_context,
    select_windows,
)
from bigram_circuits.errors import StatsError, TokenError
from bigram_circuits.models import input_device

__all__ = [
    "LinearLensConfig",
    "RidgeMap",
    "fit_ridge",
    "lens_report",
    "linear_lens",
    "logit_lens",
    "logit_lens_logits",
    "logit_lens_report",
    "logit_lens_top_tokens",
    "recall_at_k",
    "rotation_degrees",
    "vocab_size_of",
]

PAPER_LENS_TOKENS = 128 * 1024


def vocab_size_of(bridge: Any, tokenizer: Any = None) -> int:
    """The vocabulary size V: the tokenizer's (logits of padded unembedding rows are dropped).

    Without a tokenizer, every row of the embedding counts.
    """
    if tokenizer is None:
        return int(bridge.cfg.d_vocab)
    from bigram_circuits.models import model_vocab_size

    return model_vocab_size(bridge, tokenizer)


def _unembed(bridge: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Final layer norm + unembedding of hidden states [..., d_model]."""
    return bridge.unembed(bridge.ln_final(hidden))


@torch.no_grad()
def logit_lens_logits(
    bridge: Any,
    tokens: Integer[torch.Tensor, "batch pos"],
    subnetwork: SubnetworkLike | None = None,
    mode: str = "keep",
    *,
    vocab_size: int | None = None,
) -> Float[torch.Tensor, "layer batch pos vocab"]:
    """Logit-lens logits of X_0..X_L (layer L reproduces the model's logits), truncated to V."""
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    names = hidden_state_names(bridge)
    with run_context(bridge, subnetwork, mode):
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
        stacked = torch.stack([_unembed(bridge, cache[name]) for name in names])
    return stacked if vocab_size is None else stacked[..., :vocab_size]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the pairs where the bigram surprisal is finite (inf = unseen bigram)."""
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


@torch.no_grad()
def logit_lens(
    bridge: Any,
    windows: Any,
    subnetwork: SubnetworkLike | None = None,
    mode: str = "keep",
    *,
    bigram_stats: Any = None,
    vocab_size: int | None = None,
    n_tokens: int | None = 16384,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-layer logit-lens summary of one run over ``windows`` [n, seq].

    Columns: ``layer``, ``kl_to_final`` (mean KL(final || lens), nats), ``top1_agreement``
    (lens argmax = final argmax), ``next_token_loss`` (nats) and ``bigram_r`` (Pearson r of
    lens vs bigram surprisal of the actual next token, unseen bigrams dropped; NaN without
    ``bigram_stats``, any object with ``surprisal(current, next) -> nats``).
    """
    if bigram_stats is not None and not hasattr(bigram_stats, "surprisal"):
        raise StatsError("bigram_stats needs a surprisal(current, next) method; pass a BigramStats")
    tokens = select_windows(windows, n_tokens)
    vocab = vocab_size or vocab_size_of(bridge)
    if int(tokens.max()) >= int(bridge.cfg.d_vocab):
        raise TokenError(f"token id {int(tokens.max())} is outside the model's vocabulary")
    names = hidden_state_names(bridge)
    device = input_device(bridge)
    n_layers = len(names)
    kl_sum = np.zeros(n_layers)
    agree_sum = np.zeros(n_layers)
    loss_sum = np.zeros(n_layers)
    n_positions = 0
    n_next = 0
    lens_surprisal: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    bigram_surprisal: list[np.ndarray] = []
    with run_context(bridge, subnetwork, mode):
        for start in tqdm(
            range(0, tokens.shape[0], batch_size), desc="logit lens", disable=not progress
        ):
            batch = tokens[start : start + batch_size].to(device)
            _, cache = bridge.run_with_cache(batch, names_filter=names)
            final_logp = torch.log_softmax(
                _unembed(bridge, cache[names[-1]])[..., :vocab].float(), -1
            )
            final_top = final_logp.argmax(-1)
            targets = batch[:, 1:]
            n_positions += batch.numel()
            n_next += targets.numel()
            if bigram_stats is not None:
                bigram_surprisal.append(
                    np.asarray(
                        bigram_stats.surprisal(batch[:, :-1].cpu().numpy(), targets.cpu().numpy()),
                        dtype=np.float64,
                    ).reshape(-1)
                )
            for layer, name in enumerate(names):
                logp = torch.log_softmax(_unembed(bridge, cache[name])[..., :vocab].float(), -1)
                kl_sum[layer] += (
                    (final_logp.exp() * (final_logp - logp)).sum(dtype=torch.float64).item()
                )
                agree_sum[layer] += (logp.argmax(-1) == final_top).sum().item()
                surprisal = -logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                loss_sum[layer] += surprisal.sum(dtype=torch.float64).item()
                if bigram_stats is not None:
                    lens_surprisal[layer].append(surprisal.reshape(-1).cpu().numpy())
    rows = []
    for layer in range(n_layers):
        r = float("nan")
        if bigram_stats is not None:
            r = _pearson(np.concatenate(bigram_surprisal), np.concatenate(lens_surprisal[layer]))
        rows.append(
            {
                "layer": layer,
                "kl_to_final": kl_sum[layer] / n_positions,
                "top1_agreement": agree_sum[layer] / n_positions,
                "next_token_loss": loss_sum[layer] / n_next,
                "bigram_r": r,
            }
        )
    return pd.DataFrame(rows)


def logit_lens_report(
    bridge: Any,
    tokenizer: Any,
    windows: Any,
    subnetworks: Mapping[str, SubnetworkLike | None],
    *,
    bigram_stats: Any = None,
    n_tokens: int | None = 16384,
    mode: str = "keep",
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`logit_lens` for several runs (label -> subnetwork or None), with a ``run`` column."""
    frames = []
    for label, subnetwork in subnetworks.items():
        frame = logit_lens(
            bridge,
            windows,
            subnetwork,
            mode,
            bigram_stats=bigram_stats,
            vocab_size=vocab_size_of(bridge, tokenizer),
            n_tokens=n_tokens,
            progress=progress,
        )
        frame.insert(0, "run", label)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def logit_lens_top_tokens(
    bridge: Any,
    tokens: Integer[torch.Tensor, " pos"],
    tokenizer: Any,
    *,
    position: int = -1,
    k: int = 5,
    subnetwork: SubnetworkLike | None = None,
    mode: str = "keep",
) -> pd.DataFrame:
    """Top-k tokens of the logit lens at one position of one prompt, per layer.

    Columns: ``layer``, ``rank``, ``token_id``, ``token`` (decoded), ``probability``.
    """
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    if tokens.shape[0] != 1:
        raise TokenError("logit_lens_top_tokens takes one prompt; pass a 1-D token array")
    vocab = vocab_size_of(bridge, tokenizer)
    probs = torch.softmax(
        logit_lens_logits(bridge, tokens, subnetwork, mode, vocab_size=vocab)[:, 0, position], -1
    )
    top = probs.topk(min(k, vocab), dim=-1)
    rows = []
    for layer in range(probs.shape[0]):
        for rank, (p, token_id) in enumerate(
            zip(top.values[layer].tolist(), top.indices[layer].tolist())
        ):
            rows.append(
                {
                    "layer": layer,
                    "rank": rank + 1,
                    "token_id": token_id,
                    "token": tokenizer.decode([token_id]),
                    "probability": p,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- linear lens


@dataclass(frozen=True)
class RidgeMap:
    """An affine map Y ~ X @ weight + bias fitted by ridge regression (float64)."""

    weight: Float[np.ndarray, "d_in d_out"]
    bias: Float[np.ndarray, " d_out"]

    def predict(self, x: Float[np.ndarray, "n d_in"]) -> Float[np.ndarray, "n d_out"]:
        """Apply the map to rows of ``x``."""
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias

    def r2(self, x: Float[np.ndarray, "n d_in"], y: Float[np.ndarray, "n d_out"]) -> float:
        """Coefficient of determination over all output dimensions: 1 - SSE / SST."""
        y = np.asarray(y, dtype=np.float64)
        sse = ((y - self.predict(x)) ** 2).sum()
        sst = ((y - y.mean(axis=0)) ** 2).sum()
        return float(1.0 - sse / sst) if sst > 0 else float("nan")

    def rotation_deg(self) -> float:
        """Median |angle| in degrees of the eigenvalues of the (square) map."""
        return rotation_degrees(self.weight)


def fit_ridge(
    x: Float[np.ndarray, "n d_in"],
    y: Float[np.ndarray, "n d_out"],
    alpha: float = 1.0,
    fit_intercept: bool = True,
) -> RidgeMap:
    """Closed-form ridge regression min ||Y - XW - b||^2 + alpha ||W||^2 (intercept not penalised)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise TokenError(
            f"ridge needs X [n, d_in] and Y [n, d_out] with the same n; got {x.shape} and {y.shape}"
        )
    if alpha < 0:
        raise TokenError(f"ridge alpha must be >= 0, got {alpha}")
    x_mean = x.mean(axis=0) if fit_intercept else np.zeros(x.shape[1])
    y_mean = y.mean(axis=0) if fit_intercept else np.zeros(y.shape[1])
    xc = x - x_mean
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xc.T @ (y - y_mean))
    return RidgeMap(weight=weight, bias=y_mean - x_mean @ weight)


def rotation_degrees(matrix: Float[np.ndarray, "d d"]) -> float:
    """Median absolute angle (degrees) of the complex eigenvalues of a square matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise TokenError(f"rotation needs a square map, got shape {matrix.shape}")
    return float(np.median(np.abs(np.angle(np.linalg.eigvals(matrix), deg=True))))


def recall_at_k(
    predicted: Float[torch.Tensor, "n d"],
    targets: Integer[torch.Tensor, " n"],
    candidates: Float[torch.Tensor, "vocab d"],
    ks: Sequence[int] = (1, 5, 10),
    *,
    similarity: str = "cosine",
    chunk_size: int = 2048,
) -> dict[int, float]:
    """Fraction of rows whose target id is among the k candidates most similar to the prediction.

    ``similarity`` is ``"cosine"`` (default; embedding norms vary with frequency) or ``"dot"``.
    """
    if similarity not in ("cosine", "dot"):
        raise TokenError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    predicted = torch.as_tensor(predicted, dtype=torch.float32)
    candidates = torch.as_tensor(candidates, dtype=torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.int64)
    if similarity == "cosine":
        predicted = torch.nn.functional.normalize(predicted, dim=-1)
        candidates = torch.nn.functional.normalize(candidates, dim=-1)
    hits = {k: 0 for k in ks}
    for start in range(0, predicted.shape[0], chunk_size):
        scores = predicted[start : start + chunk_size] @ candidates.T
        hits_for_chunk = _count_hits(scores, targets[start : start + chunk_size], ks)
        for k in ks:
            hits[k] += hits_for_chunk[k]
    n = max(int(predicted.shape[0]), 1)
    return {k: hits[k] / n for k in ks}


def _count_hits(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Per k, how many rows rank their target within the top k (ties counted in the target's favour)."""
    target_scores = scores.gather(-1, targets.unsqueeze(-1))
    rank = (scores > target_scores).sum(-1)  # 0 = best
    return {k: int((rank < k).sum()) for k in ks}


@dataclass(frozen=True)
class LinearLensConfig:
    """Settings of the linear lens; the paper uses 128k tokens, alpha 1 and an intercept."""

    n_tokens: int = PAPER_LENS_TOKENS
    alpha: float = 1.0
    test_fraction: float = 0.2
    ks: tuple[int, ...] = (1, 5, 10)
    similarity: str = "cosine"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise TokenError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.n_tokens <= 0:
            raise TokenError(f"n_tokens must be positive, got {self.n_tokens}")


@torch.no_grad()
def linear_lens(
    bridge: Any,
    windows: Any,
    subnetwork: SubnetworkLike | None = None,
    mode: str = "keep",
    *,
    config: LinearLensConfig = LinearLensConfig(),
    vocab_size: int | None = None,
    label: str = "full",
    progress: bool = True,
) -> pd.DataFrame:
    """Fit the paper's linear lens for one run; a tidy DataFrame with one row per (layer, target).

    Columns: ``run``, ``layer``, ``target`` (``input``/``output``), ``rotation_deg``, ``r2``,
    ``recall@k`` for each k, ``n_train``, ``n_test``. Maps are fitted on the first
    ``1 - test_fraction`` of the windows and scored on the rest.
    """
    tokens = select_windows(windows, config.n_tokens)
    seq_len = tokens.shape[1]
    n_windows = tokens.shape[0]
    n_train_windows = min(max(round(n_windows * (1 - config.test_fraction)), 1), n_windows - 1)
    if n_train_windows < 1:
        raise TokenError(
            "the linear lens needs at least two windows (one to fit, one to test); pass more tokens"
        )
    names = hidden_state_names(bridge)
    collected = collect_activations(
        bridge,
        tokens,
        names,
        subnetwork,
        mode,
        batch_size=config.batch_size,
        progress=progress,
        description=f"linear lens ({label})",
    )
    vocab = vocab_size or vocab_size_of(bridge)
    n_train = n_train_windows * seq_len
    embeddings = bridge.W_E.detach().float().cpu()
    x_in = embeddings[collected.input_tokens].double().numpy()
    x_out = collected.activations[names[-1]].double().numpy()
    test_next = collected.next_tokens[n_train:]
    has_next = test_next >= 0
    rows = []
    for layer, name in enumerate(tqdm(names, desc=f"ridge maps ({label})", disable=not progress)):
        x_layer = collected.activations[name].double().numpy()
        for target, y in (("input", x_in), ("output", x_out)):
            ridge = fit_ridge(x_layer[:n_train], y[:n_train], alpha=config.alpha)
            predicted = torch.from_numpy(ridge.predict(x_layer[n_train:])).float()
            if target == "input":
                recall = recall_at_k(
                    predicted,
                    collected.input_tokens[n_train:],
                    embeddings[:vocab],
                    config.ks,
                    similarity=config.similarity,
                )
            else:
                recall = _next_token_recall(
                    bridge, predicted[has_next], test_next[has_next], vocab, config.ks
                )
            row = {
                "run": label,
                "layer": layer,
                "target": target,
                "rotation_deg": ridge.rotation_deg(),
                "r2": ridge.r2(x_layer[n_train:], y[n_train:]),
            }
            row.update({f"recall@{k}": recall[k] for k in config.ks})
            row.update({"n_train": n_train, "n_test": collected.n_tokens - n_train})
            rows.append(row)
    return pd.DataFrame(rows)


def _next_token_recall(
    bridge: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    ks: Sequence[int],
    chunk_size: int = 2048,
) -> dict[int, float]:
    """Recall@k of the actual next token in final norm + unembedding of predicted X_out."""
    hits = {k: 0 for k in ks}
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _unembed(bridge, hidden[start : start + chunk_size])[..., :vocab].float()
        for k, count in _count_hits(logits, targets[start : start + chunk_size], ks).items():
            hits[k] += count
    n = max(int(targets.shape[0]), 1)
    return {k: hits[k] / n for k in ks}


def lens_report(
    bridge: Any,
    tokenizer: Any,
    windows: Any,
    subnetworks: Mapping[str, SubnetworkLike | None],
    n_tokens: int = PAPER_LENS_TOKENS,
    *,
    mode: str = "keep",
    config: LinearLensConfig | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Linear lens for several runs side by side, e.g. ``{"full": None, "bigram": sub,
    "random": sub.random_control(0)}``; one tidy DataFrame with a ``run`` column."""
    if not subnetworks:
        raise TokenError("lens_report needs at least one run, e.g. {'full': None}")
    config = replace(config or LinearLensConfig(), n_tokens=n_tokens)
    vocab = vocab_size_of(bridge, tokenizer)
    frames = [
        linear_lens(
            bridge,
            windows,
            subnetwork,
            mode,
            config=config,
            vocab_size=vocab,
            label=label,
            progress=progress,
        )
        for label, subnetwork in subnetworks.items()
    ]
    return pd.concat(frames, ignore_index=True)


