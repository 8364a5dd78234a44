"""Logit lens and the paper's linear lens (ridge maps to the input and output representations).

Hidden states X_0..X_L are the residual stream before the final layer norm: X_0 the embedding
output, X_l the stream entering block l, X_L the stream after the last block
(:func:`bigram_circuits.circuits.runs.hidden_state_names`).

Both lenses are :class:`Lens` objects (as in the tuned-lens package): ``lens(hidden, layer)`` maps
the hidden states of one layer to a target space. :func:`read_hidden_states` is the one loop
that runs the bridge under a run (batch by batch) and reads every X_l through a lens;
:class:`LensReadout` applies a lens layer by layer to hidden states already collected.

*Logit lens* (:class:`LogitLens`): the model's final layer norm and unembedding applied to
every X_l, through TransformerLens' ``logit_readout`` (``transformer_lens.tools.analysis``);
:func:`logit_lens_logits` is TransformerLens' ``logit_lens`` under a run. Reported per layer
(:func:`logit_lens`, which TransformerLens lacks): KL divergence from the run's own final output
distribution, agreement of the top token with the final top token, next-token loss and (given
bigram statistics) the Pearson r between the lens surprisal and the bigram surprisal of the
actual next token.

*Linear lens* (:class:`LinearLens`; Chang & Bergen 2025, "Mechanistic analyses"): ridge
regressions (alpha 1, with an unpenalised intercept, closed form in float64) from X_l to X_in
(the raw token embeddings W_E of the input tokens) and to X_out (= X_L). Maps are fitted on the
first windows and evaluated on held-out windows (``test_fraction``). Reported per layer and
target:

- ``rotation_deg``: median |angle| (degrees) of the complex eigenvalues of the d x d map;
- ``r2``: held-out coefficient of determination of the map;
- ``recall@k``: for the *input* target, the fraction of held-out tokens whose input token is
  among the k token embeddings most cosine-similar to the map's prediction; for the *output*
  target, the fraction whose actual next token is in the top k of the logit lens (final layer
  norm + unembedding) applied to the predicted X_out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis import logit_lens as tl_logit_lens
from transformer_lens.tools.analysis import logit_readout

from bigram_circuits.circuits.runs import (
    RunLike,
    RunSpec,
    as_token_tensor,
    hidden_state_names,
    select_windows,
)
from bigram_circuits.devices import input_device
from bigram_circuits.errors import BigramCircuitsError, ConfigError, StatsError, TokenError
from bigram_circuits.evaluate import pearson_r
from bigram_circuits.models import model_vocab_size

__all__ = [
    "Lens",
    "LensReadout",
    "LinearLens",
    "LinearLensConfig",
    "LogitLens",
    "NextTokenSurprisal",
    "RidgeMap",
    "fit_ridge",
    "lens_report",
    "linear_lens",
    "logit_lens",
    "logit_lens_logits",
    "logit_lens_report",
    "logit_lens_top_tokens",
    "read_hidden_states",
    "recall_at_k",
    "rotation_degrees",
    "vocab_size_of",
]

PAPER_LENS_TOKENS = 128 * 1024
LINEAR_LENS_TARGETS = ("input", "output")


def vocab_size_of(bridge: TransformerBridge, tokenizer: Any = None) -> int:
    """The vocabulary size V: the tokenizer's (logits of padded unembedding rows are dropped).

    Without a tokenizer, every row of the embedding counts.
    """
    if tokenizer is None:
        return int(bridge.cfg.d_vocab)
    return model_vocab_size(bridge, tokenizer)


# --------------------------------------------------------------------------- lenses


@runtime_checkable
class Lens(Protocol):
    """Maps the hidden states X_l of one layer, ``[..., d_model]``, to a target space ``[..., d]``
    (logits for the logit lens, X_in or X_out for a linear lens)."""

    def __call__(self, hidden: Float[torch.Tensor, "... d_model"], layer: int) -> torch.Tensor:
        """The lens' reading of ``hidden``, the hidden states of layer ``layer`` (0..L)."""
        ...


def _transformer_lens(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A TransformerLens analysis call; its ValueErrors (training mode, unsupported readout)
    become ConfigErrors with TransformerLens' one-line message."""
    try:
        return call(*args, **kwargs)
    except BigramCircuitsError:
        raise
    except ValueError as exc:
        raise ConfigError(f"the logit lens cannot read this bridge: {exc}") from exc


@dataclass(frozen=True)
class LogitLens:
    """The logit lens: the model's final layer norm and unembedding (TransformerLens'
    ``logit_readout``, which also applies an adapter's logit transform), the same at every
    layer; logits are truncated to ``vocab_size`` (V) when given."""

    bridge: Any = field(repr=False)
    vocab_size: int | None = None

    def __call__(self, hidden: Float[torch.Tensor, "... d_model"], layer: int = -1) -> torch.Tensor:
        """Logits ``[..., V]`` of ``hidden`` (one unembedding for all its rows)."""
        rows = max(int(hidden.numel()) // max(int(hidden.shape[-1]), 1), 1)
        logits = _transformer_lens(logit_readout, self.bridge, hidden, chunk_size=rows).values
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]


@dataclass(frozen=True)
class LinearLens:
    """A linear lens to one target: a ridge map per layer from X_l to the target (X_in or X_out)."""

    maps: tuple[RidgeMap, ...]

    @classmethod
    def fit(
        cls,
        hidden: Sequence[Float[torch.Tensor, "n d_model"]],
        target: Float[np.ndarray, "n d"],
        alpha: float = 1.0,
        *,
        progress: bool = False,
        description: str = "ridge maps",
    ) -> LinearLens:
        """Fit one ridge map per layer from the rows of ``hidden[l]`` to the rows of ``target``."""
        return cls(
            tuple(
                fit_ridge(torch.as_tensor(x).detach().cpu().double().numpy(), target, alpha=alpha)
                for x in tqdm(hidden, desc=description, disable=not progress)
            )
        )

    def __call__(self, hidden: Float[torch.Tensor, "... d_model"], layer: int) -> torch.Tensor:
        """The map of ``layer`` applied (in float64) to ``hidden``; float32 on the CPU."""
        rows = torch.as_tensor(hidden).detach().cpu().double()
        return torch.from_numpy(self.maps[layer].predict(rows.numpy())).float()


class LensReadout(Sequence[torch.Tensor]):
    """The per-layer loop of every lens: item l is ``lens(X_l, l)`` of the hidden states
    X_0..X_L, computed when read (one layer's output at a time; negative indices count from X_L)."""

    def __init__(self, lens: Lens | None, hidden: Sequence[torch.Tensor]) -> None:
        self.lens = lens
        self.hidden = list(hidden)

    def __len__(self) -> int:
        return len(self.hidden)

    @overload
    def __getitem__(self, layer: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, layer: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, layer: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self.hidden))[layer]]
        index = range(len(self.hidden))[layer]  # IndexError past X_L ends iteration
        hidden = self.hidden[index]
        return hidden if self.lens is None else self.lens(hidden, index)


@torch.no_grad()
def read_hidden_states(
    bridge: TransformerBridge,
    tokens: Any,
    lens: Lens | None = None,
    run: RunLike = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "lens",
) -> Iterator[tuple[Integer[torch.Tensor, "batch pos"], LensReadout]]:
    """Run ``tokens`` [n, seq] through one run of the bridge (``run``, default the full model),
    ``batch_size`` windows at a time, and read each batch's hidden states X_0..X_L through
    ``lens`` (the states themselves when ``None``).

    Yields ``(batch, readout)``: the batch on the input device and a :class:`LensReadout` of
    its hidden states. The run is applied while the generator is open: exhaust it or close it
    (``contextlib.closing``).
    """
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    names = hidden_state_names(bridge)
    device = input_device(bridge)
    with RunSpec.coerce(run).context(bridge):
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=description, disable=not progress):
            batch = tokens[start : start + batch_size].to(device)
            _, cache = bridge.run_with_cache(batch, names_filter=names)
            yield batch, LensReadout(lens, [cache[name] for name in names])


# --------------------------------------------------------------------------- logit lens


@runtime_checkable
class NextTokenSurprisal(Protocol):
    """What :func:`logit_lens` needs of ``bigram_stats`` (a :class:`~bigram_circuits.ngrams.BigramStats`)."""

    def surprisal(self, current: Any, next_tokens: Any) -> Any:
        """Surprisal (nats) of each of ``next_tokens`` after the token ``current`` beside it."""
        ...


@torch.no_grad()
def logit_lens_logits(
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, "batch pos"],
    run: RunLike = None,
    *,
    vocab_size: int | None = None,
) -> Float[torch.Tensor, "layer batch pos vocab"]:
    """Logit-lens logits of X_0..X_L (layer L reproduces the model's logits), truncated to V.

    TransformerLens' ``logit_lens`` over every position, under ``run`` (default the full model).
    """
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    with RunSpec.coerce(run).context(bridge):
        result = _transformer_lens(
            tl_logit_lens, bridge, tokens.to(input_device(bridge)), positions=None, chunk_size=1024
        )
    stacked = result.values
    return stacked if vocab_size is None else stacked[..., :vocab_size]


def _finite_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`~bigram_circuits.evaluate.pearson_r` over the pairs where both are finite (the bigram
    surprisal is inf for an unseen bigram)."""
    keep = np.isfinite(a) & np.isfinite(b)
    return pearson_r(a[keep], b[keep])


@torch.no_grad()
def logit_lens(
    bridge: TransformerBridge,
    windows: Any,
    run: RunLike = None,
    *,
    bigram_stats: NextTokenSurprisal | None = None,
    vocab_size: int | None = None,
    n_tokens: int | None = 16384,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-layer logit-lens summary of one run (``run``, default the full model) over ``windows`` [n, seq].

    Columns: ``layer``, ``kl_to_final`` (mean KL(final || lens), nats), ``top1_agreement``
    (lens argmax = final argmax), ``next_token_loss`` (nats) and ``bigram_r`` (Pearson r of
    lens vs bigram surprisal of the actual next token, unseen bigrams dropped; NaN without
    ``bigram_stats``, any :class:`NextTokenSurprisal`: ``surprisal(current, next) -> nats``).
    """
    if bigram_stats is not None and not isinstance(bigram_stats, NextTokenSurprisal):
        raise StatsError("bigram_stats needs a surprisal(current, next) method; pass a BigramStats")
    tokens = select_windows(windows, n_tokens)
    lens = LogitLens(bridge, vocab_size or vocab_size_of(bridge))
    n_layers = len(hidden_state_names(bridge))
    kl_sum = np.zeros(n_layers)
    agree_sum = np.zeros(n_layers)
    loss_sum = np.zeros(n_layers)
    n_positions = 0
    n_next = 0
    lens_surprisal: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    bigram_surprisal: list[np.ndarray] = []
    batches = read_hidden_states(
        bridge, tokens, lens, run, batch_size=batch_size, progress=progress, description="logit lens"
    )
    with closing(batches):
        for batch, logits in batches:
            final_logp = torch.log_softmax(logits[-1].float(), -1)
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
            targets = targets.to(final_logp.device)
            for layer, layer_logits in enumerate(logits):
                logp = torch.log_softmax(layer_logits.float(), -1)
                kl_sum[layer] += (final_logp.exp() * (final_logp - logp)).sum(dtype=torch.float64).item()
                agree_sum[layer] += (logp.argmax(-1) == final_top).sum().item()
                surprisal = -logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                loss_sum[layer] += surprisal.sum(dtype=torch.float64).item()
                if bigram_stats is not None:
                    lens_surprisal[layer].append(surprisal.reshape(-1).cpu().numpy())
    rows = []
    for layer in range(n_layers):
        r = float("nan")
        if bigram_stats is not None:
            r = _finite_pearson(np.concatenate(bigram_surprisal), np.concatenate(lens_surprisal[layer]))
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
    bridge: TransformerBridge,
    tokenizer: Any,
    windows: Any,
    runs: Mapping[str, RunLike],
    *,
    bigram_stats: NextTokenSurprisal | None = None,
    n_tokens: int | None = 16384,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`logit_lens` for several runs (label -> run: a RunSpec, a subnetwork to keep or None),
    with a ``run`` column."""
    frames = []
    for label, run in runs.items():
        frame = logit_lens(
            bridge,
            windows,
            run,
            bigram_stats=bigram_stats,
            vocab_size=vocab_size_of(bridge, tokenizer),
            n_tokens=n_tokens,
            progress=progress,
        )
        frame.insert(0, "run", label)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def logit_lens_top_tokens(
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, " pos"],
    tokenizer: Any,
    *,
    position: int = -1,
    k: int = 5,
    run: RunLike = None,
) -> pd.DataFrame:
    """Top-k tokens of the logit lens at one position of one prompt, per layer, under ``run``
    (default the full model).

    Columns: ``layer``, ``rank``, ``token_id``, ``token`` (decoded), ``probability``.
    """
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    if tokens.shape[0] != 1:
        raise TokenError("logit_lens_top_tokens takes one prompt; pass a 1-D token array")
    vocab = vocab_size_of(bridge, tokenizer)
    probs = torch.softmax(logit_lens_logits(bridge, tokens, run, vocab_size=vocab)[:, 0, position], -1)
    top = probs.topk(min(k, vocab), dim=-1)
    rows = []
    for layer in range(probs.shape[0]):
        for rank, (p, token_id) in enumerate(zip(top.values[layer].tolist(), top.indices[layer].tolist())):
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
        raise ConfigError(f"ridge needs X [n, d_in] and Y [n, d_out] with the same n; got {x.shape} and {y.shape}")
    if alpha < 0:
        raise ConfigError(f"ridge alpha must be >= 0, got {alpha}")
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
        raise ConfigError(f"rotation needs a square map, got shape {matrix.shape}; pass a d x d matrix")
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
        raise ConfigError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
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
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.n_tokens <= 0:
            raise ConfigError(f"n_tokens must be positive, got {self.n_tokens}")


@torch.no_grad()
def linear_lens(
    bridge: TransformerBridge,
    windows: Any,
    run: RunLike = None,
    *,
    config: LinearLensConfig = LinearLensConfig(),
    vocab_size: int | None = None,
    label: str = "full",
    progress: bool = True,
) -> pd.DataFrame:
    """Fit the paper's linear lens for one run (``run``, default the full model); a tidy DataFrame
    with one row per (layer, target).

    Columns: ``run``, ``layer``, ``target`` (``input``/``output``), ``rotation_deg``, ``r2``,
    ``recall@k`` for each k, ``n_train``, ``n_test``. Maps (one :class:`LinearLens` per target)
    are fitted on the first ``1 - test_fraction`` of the windows and scored on the rest.
    """
    tokens = select_windows(windows, config.n_tokens)
    seq_len = tokens.shape[1]
    n_windows = tokens.shape[0]
    n_train_windows = min(max(round(n_windows * (1 - config.test_fraction)), 1), n_windows - 1)
    if n_train_windows < 1:
        raise ConfigError("the linear lens needs at least two windows (one to fit, one to test); pass more tokens")
    batches = read_hidden_states(
        bridge,
        tokens,
        None,
        run,
        batch_size=config.batch_size,
        progress=progress,
        description=f"linear lens ({label})",
    )
    chunks: list[list[torch.Tensor]] = []
    with closing(batches):
        for _, states in batches:
            chunks.append([state.reshape(-1, state.shape[-1]).float().cpu() for state in states])
    hidden = [torch.cat(layer_chunks) for layer_chunks in zip(*chunks)]  # X_l: [n_tokens, d_model]
    vocab = vocab_size or vocab_size_of(bridge)
    n_train = n_train_windows * seq_len
    n_tokens = tokens.numel()
    input_tokens = tokens.reshape(-1)
    next_tokens = torch.cat([tokens[:, 1:], torch.full((n_windows, 1), -1)], dim=1).reshape(-1)
    embeddings = bridge.W_E.detach().float().cpu()
    targets = {
        "input": embeddings[input_tokens].double().numpy(),
        "output": hidden[-1].double().numpy(),
    }
    lenses = {
        target: LinearLens.fit(
            [x[:n_train] for x in hidden],
            y[:n_train],
            alpha=config.alpha,
            progress=progress,
            description=f"ridge maps to X_{'in' if target == 'input' else 'out'} ({label})",
        )
        for target, y in targets.items()
    }
    held_out = [x[n_train:] for x in hidden]
    readouts = {target: LensReadout(lens, held_out) for target, lens in lenses.items()}
    test_next = next_tokens[n_train:]
    has_next = test_next >= 0
    logit_lens = LogitLens(bridge, vocab)
    rows = []
    for layer in range(len(hidden)):
        for target in LINEAR_LENS_TARGETS:
            predicted = readouts[target][layer]
            if target == "input":
                recall = recall_at_k(
                    predicted,
                    input_tokens[n_train:],
                    embeddings[:vocab],
                    config.ks,
                    similarity=config.similarity,
                )
            else:
                recall = _next_token_recall(logit_lens, predicted[has_next], test_next[has_next], config.ks)
            ridge = lenses[target].maps[layer]
            row = {
                "run": label,
                "layer": layer,
                "target": target,
                "rotation_deg": ridge.rotation_deg(),
                "r2": ridge.r2(held_out[layer].double().numpy(), targets[target][n_train:]),
            }
            row.update({f"recall@{k}": recall[k] for k in config.ks})
            row.update({"n_train": n_train, "n_test": n_tokens - n_train})
            rows.append(row)
    return pd.DataFrame(rows)


def _next_token_recall(
    logit_lens: LogitLens,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int = 2048,
) -> dict[int, float]:
    """Recall@k of the actual next token in the logit lens (final norm + unembedding) of predicted X_out."""
    hits = {k: 0 for k in ks}
    for start in range(0, hidden.shape[0], chunk_size):
        logits = logit_lens(hidden[start : start + chunk_size]).float()
        chunk_targets = targets[start : start + chunk_size].to(logits.device)
        for k, count in _count_hits(logits, chunk_targets, ks).items():
            hits[k] += count
    n = max(int(targets.shape[0]), 1)
    return {k: hits[k] / n for k in ks}


def lens_report(
    bridge: TransformerBridge,
    tokenizer: Any,
    windows: Any,
    runs: Mapping[str, RunLike],
    n_tokens: int = PAPER_LENS_TOKENS,
    *,
    config: LinearLensConfig | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Linear lens for several runs side by side, e.g. ``{"full": None, "bigram": sub,
    "random": sub.random_control(0), "bigram ablated": RunSpec(sub, "ablate")}``; one tidy
    DataFrame with a ``run`` column."""
    if not runs:
        raise ConfigError("lens_report needs at least one run; pass e.g. {'full': None}")
    config = replace(config or LinearLensConfig(), n_tokens=n_tokens)
    vocab = vocab_size_of(bridge, tokenizer)
    frames = [
        linear_lens(
            bridge,
            windows,
            run,
            config=config,
            vocab_size=vocab,
            label=label,
            progress=progress,
        )
        for label, run in runs.items()
    ]
    return pd.concat(frames, ignore_index=True)
