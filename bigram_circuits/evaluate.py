"""Held-out metrics, ablation tables and sample generations of full models and subnetworks.

Every metric is measured with the *binary* mask of a subnetwork applied
(``subnetwork.applied(bridge, mode)``), never with soft masks:

- ``r_dropped`` / ``r_clipped``: Pearson r between the model's surprisal of each actual next
  token and its bigram surprisal; infinite bigram surprisals (P = 0) are dropped, or clipped
  to the largest finite bigram surprisal in the sample.
- ``soft_xent``: cross-entropy of the model's next-token distribution against the bigram
  distribution P(. | current token), averaged over every position.
- ``lm_loss_nats`` / ``lm_loss_bits`` / ``perplexity``: the usual language-model loss.

Logits are truncated to the tokenizer's vocabulary V when the unembedding is padded wider.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError, StatsError, TokenError
from bigram_circuits.models import check_tokens_fit
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.rundir import RunDir
from bigram_circuits.runspec import RunLike, RunSpec
from bigram_circuits.subnetwork import Subnetwork

__all__ = [
    "METRIC_COLUMNS",
    "TokenSurprisals",
    "ablation_table",
    "evaluate_metrics",
    "generate",
    "generate_table",
    "generation_conditions",
    "loss_increase_ratio",
    "mean_next_token_loss",
    "metrics_from_surprisals",
    "next_tokens",
    "noise_ceiling",
    "pearson_r",
    "surprisals_from_logits",
    "token_surprisals",
]

METRIC_COLUMNS = ["r_dropped", "r_clipped", "soft_xent", "lm_loss_nats", "lm_loss_bits", "perplexity"]


@dataclass(frozen=True)
class TokenSurprisals:
    """Per-token surprisals (nats) on held-out text, plus the summed soft cross-entropy.

    ``model`` and ``bigram`` are aligned: one entry per (window, position) that has a next
    token. ``bigram`` is inf where the bigram probability is 0. ``soft_xent_sum`` is summed
    over ``soft_xent_count`` positions (every position, the last included).
    """

    model: Float[np.ndarray, " n"]
    bigram: Float[np.ndarray, " n"]
    soft_xent_sum: float
    soft_xent_count: int


def _check_windows(windows, vocab_size: int) -> np.ndarray:
    array = windows.cpu().numpy() if isinstance(windows, torch.Tensor) else np.asarray(windows)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise TokenError(
            f"windows must be a [n_windows, seq_len >= 2] array, got shape {array.shape}; use TokenDataset.windows()"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TokenError(f"windows must hold integer token ids, got dtype {array.dtype}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise TokenError(
            f"token ids must lie in [0, {vocab_size}); got {int(array.min())}..{int(array.max())}; "
            "tokenise with the model's tokenizer"
        )
    return array


@torch.no_grad()
def surprisals_from_logits(
    logits_fn: Callable[[Integer[torch.Tensor, "batch pos"]], Float[torch.Tensor, "batch pos vocab"]],
    stats: BigramStats,
    windows: Integer[np.ndarray, "n seq"],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    desc: str = "evaluate",
    show_progress: bool = True,
) -> TokenSurprisals:
    """Model and bigram surprisal of every actual next token, for any next-token predictor
    ``logits_fn(tokens [batch, pos]) -> logits [batch, pos, >= V]`` (a model, a model with a
    subnetwork applied, or a baseline such as :class:`bigram_circuits.baselines.LinearMapBaseline`)."""
    vocab_size = int(stats.vocab_size)
    array = _check_windows(windows, vocab_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    model_parts: list[np.ndarray] = []
    bigram_parts: list[np.ndarray] = []
    xent_sum, xent_count = 0.0, 0
    for start in tqdm(
        range(0, len(array), batch_size), desc=desc, unit="batch", disable=not show_progress, leave=False
    ):
        batch_np = np.asarray(array[start : start + batch_size], dtype=np.int64)
        batch = torch.as_tensor(batch_np, device=device)
        logits = logits_fn(batch)
        if logits.shape[-1] < vocab_size:
            raise StatsError(
                f"model has {logits.shape[-1]} logits but the bigram stats have vocab {vocab_size}; "
                "build the stats with this model's tokenizer"
            )
        logits = logits[..., :vocab_size].float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        surprisal = -log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1)
        model_parts.append(surprisal.double().cpu().numpy().ravel())
        bigram_parts.append(np.asarray(stats.next_token_surprisal(batch_np), dtype=np.float64).ravel())
        xent_sum += float(stats.soft_cross_entropy(logits, batch_np, reduction="sum"))
        xent_count += batch.numel()
    return TokenSurprisals(
        model=np.concatenate(model_parts),
        bigram=np.concatenate(bigram_parts),
        soft_xent_sum=xent_sum,
        soft_xent_count=xent_count,
    )


@torch.no_grad()
def token_surprisals(
    bridge: TransformerBridge,
    stats: BigramStats,
    windows: Integer[np.ndarray, "n seq"],
    run: RunLike = None,
    *,
    batch_size: int = 16,
    show_progress: bool = True,
) -> TokenSurprisals:
    """Model and bigram surprisal of every actual next token under ``run`` (default the full model)."""
    array = _check_windows(windows, int(stats.vocab_size))
    check_tokens_fit(bridge, array)
    run = RunSpec.coerce(run)
    label = "full model" if run.subnetwork is None else f"subnetwork ({run.mode})"
    with run.context(bridge):
        return surprisals_from_logits(
            bridge,
            stats,
            array,
            input_device(bridge),
            batch_size,
            desc=f"evaluate {label}",
            show_progress=show_progress,
        )


@torch.no_grad()
def mean_next_token_loss(
    logits_fn: Callable[[Integer[torch.Tensor, "batch pos"]], Float[torch.Tensor, "batch pos vocab"]],
    windows: Integer[np.ndarray, "n seq"],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    vocab_size: int | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) of ``logits_fn`` on ``windows``: the one eval-loss
    loop (the demo, training and the evaluation tables use it). ``vocab_size`` drops padded
    logit columns."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.as_tensor(np.asarray(windows[start : start + batch_size], dtype=np.int64), device=device)
        logits = logits_fn(batch)[:, :-1]
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def next_tokens(
    logits_fn: Callable[[Integer[torch.Tensor, "1 pos"]], Float[torch.Tensor, "1 pos vocab"]],
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    vocab_size: int | None = None,
    eos: int | None = None,
    context: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[int]:
    """The one decoding loop: ``max_new_tokens`` tokens after ``ids`` (greedy at
    ``temperature=0``, else sampled from a generator seeded with ``seed``), stopping at ``eos``;
    the model sees at most the last ``context`` tokens."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            window = tokens if not context else tokens[:, -int(context) :]
            logits = logits_fn(window)[0, -1]
            logits = (logits[:vocab_size] if vocab_size is not None else logits).float().cpu()
            if temperature == 0:
                next_id = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            if eos is not None and next_id == eos:
                break
            new.append(next_id)
            tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
    return new


def pearson_r(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"]) -> float:
    """Pearson correlation in float64; NaN when fewer than two points or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    if denom == 0.0:
        return float("nan")
    return float(np.dot(dx, dy) / denom)


def metrics_from_surprisals(surprisals: TokenSurprisals) -> dict[str, float]:
    """The metric row (``METRIC_COLUMNS`` plus ``n_tokens`` and ``n_inf_bigram``) of a pass."""
    model, bigram = surprisals.model, surprisals.bigram
    finite = np.isfinite(bigram)
    r_dropped = pearson_r(model[finite], bigram[finite])
    if finite.any():
        clipped = np.where(finite, bigram, bigram[finite].max())
        r_clipped = pearson_r(model, clipped)
    else:
        r_clipped = float("nan")
    loss = float(model.mean())
    return {
        "r_dropped": r_dropped,
        "r_clipped": r_clipped,
        "soft_xent": surprisals.soft_xent_sum / surprisals.soft_xent_count,
        "lm_loss_nats": loss,
        "lm_loss_bits": loss / math.log(2.0),
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "n_tokens": int(model.size),
        "n_inf_bigram": int((~finite).sum()),
    }


def _r_dropped_and_clipped(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r of two surprisal arrays where both are finite, and with each one's infinities
    clipped to its own largest finite value (the two conventions of ``r_dropped``/``r_clipped``)."""
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return float("nan"), float("nan")

    def clipped(a: np.ndarray) -> np.ndarray:
        ok = np.isfinite(a)
        return np.where(ok, a, a[ok].max()) if ok.any() else a

    return pearson_r(x[finite], y[finite]), pearson_r(clipped(x), clipped(y))


def noise_ceiling(
    train_windows: Integer[np.ndarray, "n seq"],
    eval_windows: Integer[np.ndarray, "m seq"],
    vocab_size: int,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, float]:
    """How well the bigram target can be predicted at all from this much training text.

    The training windows are split at random into two halves; bigram statistics counted on each
    half give two surprisals of every actual next token of ``eval_windows``; their Pearson r is
    the ceiling a subnetwork's r against a table counted on that much text can be held against
    (a table from half the text is noisier than one from all of it, so this is a conservative
    ceiling). Returns ``r_dropped`` / ``r_clipped`` (the metrics' two conventions for P = 0),
    the share of held-out tokens whose bigram was never seen in the whole training split
    (``unseen_share``) and the split sizes.
    """
    train = _check_windows(train_windows, vocab_size)
    held_out = _check_windows(eval_windows, vocab_size)
    if len(train) < 2:
        raise TokenError("the noise ceiling needs at least 2 training windows to split in halves")
    order = np.random.default_rng(seed).permutation(len(train))
    halves = [train[np.sort(order[: len(train) // 2])], train[np.sort(order[len(train) // 2 :])]]
    surprisal_a, surprisal_b = (
        BigramStats.from_tokens(half, vocab_size, seq_len=train.shape[1], show_progress=show_progress)
        .next_token_surprisal(held_out)
        .ravel()
        for half in halves
    )
    whole = BigramStats.from_tokens(train, vocab_size, seq_len=train.shape[1], show_progress=show_progress)
    r_dropped, r_clipped = _r_dropped_and_clipped(surprisal_a, surprisal_b)
    return {
        "r_dropped": r_dropped,
        "r_clipped": r_clipped,
        "unseen_share": float(np.isinf(whole.next_token_surprisal(held_out)).mean()),
        "half_windows": len(halves[0]),
        "n_tokens": int(surprisal_a.size),
        "seed": seed,
    }


def evaluate_metrics(
    bridge: TransformerBridge,
    stats: BigramStats,
    windows: Integer[np.ndarray, "n seq"],
    run: RunLike = None,
    *,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict[str, float]:
    """Bigram r (dropped / clipped), soft cross-entropy, LM loss and perplexity on ``windows``.

    ``run=None`` evaluates the full model; a subnetwork (or ``RunSpec(subnetwork, "keep")``) is
    evaluated alone through its binary mask, ``RunSpec(subnetwork, "ablate")`` with it removed.
    """
    surprisals = token_surprisals(bridge, stats, windows, run, batch_size=batch_size, show_progress=show_progress)
    return metrics_from_surprisals(surprisals)


def _active_params(run: RunSpec, full_params: float) -> float:
    """Weights (paper unit) the model runs with; ablating keeps the complement's weights."""
    if run.subnetwork is None:
        return full_params
    kept = run.subnetwork if run.mode == "keep" else run.subnetwork.complement()
    return float(kept.n_params())


def ablation_table(
    bridge: TransformerBridge,
    stats: BigramStats,
    windows: Integer[np.ndarray, "n seq"],
    bigram,
    optimal=None,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Metrics of the full model and of subnetworks kept alone or ablated (complement kept).

    Rows: full model; bigram only; bigram ablated; random only and random ablated (random
    subnetworks with the bigram subnetwork's kept count per block, one per seed, reported as
    mean and sample std over seeds); optimal only and optimal ablated when ``optimal`` is given.
    ``loss_increase`` is the LM loss minus the full model's. The summary
    ``table.attrs["loss_increase_ratio"]`` is the loss increase from ablating the bigram
    subnetwork over the mean increase from ablating a random one.
    """
    if not seeds:
        raise ConfigError("seeds must name at least one random control; pass e.g. seeds=(0, 1, 2)")
    full_params = float(bigram.n_params_total())
    conditions: list[tuple[str, RunSpec, int | None]] = [
        ("full model", RunSpec(), None),
        ("bigram only", RunSpec(bigram, "keep"), None),
        ("bigram ablated", RunSpec(bigram, "ablate"), None),
    ]
    randoms = {seed: bigram.random_control(seed) for seed in seeds}
    conditions += [("random only", RunSpec(randoms[s], "keep"), s) for s in seeds]
    conditions += [("random ablated", RunSpec(randoms[s], "ablate"), s) for s in seeds]
    if optimal is not None:
        conditions += [("optimal only", RunSpec(optimal, "keep"), None)]
        conditions += [("optimal ablated", RunSpec(optimal, "ablate"), None)]

    runs = []
    for name, run, seed in tqdm(conditions, desc="ablation table", unit="condition", disable=not show_progress):
        row = evaluate_metrics(bridge, stats, windows, run, batch_size=batch_size, show_progress=False)
        runs.append(
            {
                "condition": name,
                "mode": run.mode,
                "seed": seed,
                "active_params": _active_params(run, full_params),
                **row,
            }
        )
    raw = pd.DataFrame(runs)

    value_columns = ["active_params", *METRIC_COLUMNS]
    rows = []
    for name, group in raw.groupby("condition", sort=False):
        row: dict[str, object] = {"condition": name, "mode": group["mode"].iloc[0], "n_seeds": len(group)}
        for column in value_columns:
            row[column] = float(group[column].mean())
        for column in ("lm_loss_nats", "r_dropped", "soft_xent"):
            row[f"{column}_std"] = float(group[column].std(ddof=1)) if len(group) > 1 else float("nan")
        row["n_tokens"] = int(group["n_tokens"].iloc[0])
        rows.append(row)
    table = pd.DataFrame(rows)
    full_loss = float(table.loc[table["condition"] == "full model", "lm_loss_nats"].iloc[0])
    table.insert(table.columns.get_loc("lm_loss_nats") + 1, "loss_increase", table["lm_loss_nats"] - full_loss)
    order = [
        "condition",
        "mode",
        "n_seeds",
        "active_params",
        "lm_loss_nats",
        "lm_loss_nats_std",
        "loss_increase",
        "lm_loss_bits",
        "perplexity",
        "r_dropped",
        "r_dropped_std",
        "r_clipped",
        "soft_xent",
        "soft_xent_std",
        "n_tokens",
    ]
    table = table[order]
    table.attrs["loss_increase_ratio"] = loss_increase_ratio(table)
    random_increase = raw.loc[raw["condition"] == "random ablated", "lm_loss_nats"] - full_loss
    table.attrs["random_ablated_loss_increase_by_seed"] = [float(x) for x in random_increase]
    return table


def loss_increase_ratio(table: pd.DataFrame) -> float:
    """(loss(bigram ablated) - loss(full)) / mean(loss(random ablated) - loss(full)) of a table."""
    by_name = table.set_index("condition")["loss_increase" if "loss_increase" in table else "lm_loss_nats"]
    if "loss_increase" not in table:
        by_name = by_name - by_name["full model"]
    random = float(by_name["random ablated"])
    if random <= 0.0:
        # Ablating random parameters did not hurt at all: the ratio is unbounded.
        return float("inf") if float(by_name["bigram ablated"]) > 0 else float("nan")
    return float(by_name["bigram ablated"]) / random


def generation_conditions(bigram, random_seed: int = 0) -> dict[str, RunSpec]:
    """The paper's Table 4 conditions: full, bigram only, bigram ablated, random ablated."""
    return {
        "full model": RunSpec(),
        "bigram only": RunSpec(bigram, "keep"),
        "bigram ablated": RunSpec(bigram, "ablate"),
        "random ablated": RunSpec(bigram.random_control(random_seed), "ablate"),
    }


@torch.no_grad()
def generate(
    bridge: TransformerBridge,
    tokenizer,
    prompt: str,
    condition: RunLike = None,
    temperature: float = 1.0,
    max_new_tokens: int = 30,
    seed: int = 0,
) -> str:
    """Sample a continuation of ``prompt`` under ``condition`` (``temperature=0`` is greedy).

    ``condition`` is a run (:data:`~bigram_circuits.runspec.RunLike`): a
    :class:`~bigram_circuits.runspec.RunSpec`, a ``(subnetwork, mode)`` pair, a subnetwork (kept)
    or ``None`` (the full model).

    Sampling uses its own seeded generator, so equal seeds give equal random draws across
    conditions; it stops early at the tokenizer's end-of-text token.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    vocab_size = len(tokenizer)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    eos = tokenizer.eos_token_id
    if not ids:
        if eos is None:
            raise TokenError("empty prompt and the tokenizer has no eos_token_id to start from; pass a prompt")
        ids = [int(eos)]
    max_len = getattr(getattr(bridge, "cfg", None), "n_ctx", None)
    with RunSpec.coerce(condition).context(bridge):
        new = next_tokens(
            bridge,
            ids,
            max_new_tokens,
            temperature=temperature,
            vocab_size=vocab_size,
            eos=eos,
            context=max_len,
            device=input_device(bridge),
            seed=seed,
        )
    return tokenizer.decode(new)


def generate_table(
    bridge: TransformerBridge,
    tokenizer,
    prompt: str,
    conditions: Mapping[str, RunLike],
    temperature: float = 1.0,
    max_new_tokens: int = 30,
    seed: int = 0,
) -> pd.DataFrame:
    """One generation per condition from the same prompt, temperature and seed (Table 4)."""
    rows = []
    for name, condition in conditions.items():
        text = generate(bridge, tokenizer, prompt, condition, temperature, max_new_tokens, seed)
        rows.append({"condition": name, "prompt": prompt, "temperature": temperature, "generation": text})
    return pd.DataFrame(rows)


DEFAULT_PROMPT = "The President of the United States"


def sweep_metrics_table(
    bridge: TransformerBridge,
    stats: BigramStats,
    windows,
    run_dir: str | os.PathLike,
    batch_size: int = 16,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Metrics of the full model and of every subnetwork of a run's lambda sweep (kept alone)."""

    run = RunDir(run_dir)
    sweep_table = run.sweep_table()
    entries: list[tuple[float, bool, Path]] = []
    if sweep_table is None:
        entries.append((float("nan"), True, run.subnetwork_dir()))
    else:
        chosen = sweep_table["chosen"].astype(bool) if "chosen" in sweep_table else [False] * len(sweep_table)
        entries += [
            (float(lam), bool(c), Path(d)) for lam, c, d in zip(sweep_table["lambda"], chosen, sweep_table["dir"])
        ]
    full = evaluate_metrics(bridge, stats, windows, batch_size=batch_size, show_progress=show_progress)
    rows = [
        {
            "subnetwork": "full model",
            "lambda": float("-inf"),
            "chosen": False,
            "active_params": float("nan"),
            "percent_params": 100.0,
            **full,
        }
    ]
    for lam, chosen, directory in entries:
        sub = Subnetwork.load(directory)
        metrics = evaluate_metrics(bridge, stats, windows, sub, batch_size=batch_size, show_progress=show_progress)
        summary = sub.summary()
        rows.append(
            {
                "subnetwork": directory.name,
                "lambda": lam,
                "chosen": chosen,
                "active_params": summary["n_params"],
                "percent_params": summary["percent_params"],
                **metrics,
            }
        )
    table = pd.DataFrame(rows)
    table.loc[0, "active_params"] = float(Subnetwork.load(entries[0][2]).n_params_total())
    return table
