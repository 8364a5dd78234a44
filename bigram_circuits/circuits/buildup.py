"""Build circuits up from a base subnetwork: base, base + candidate, base + random heads, full.

The paper's stated purpose for bigram subnetworks is "a foundation for studying language model
circuits by building up from a minimal circuit". This module measures that for a behaviour
(a *task* with a metric):

==========================  ===============================================================
condition                   run
==========================  ===============================================================
``base``                    the base subnetwork alone (e.g. the bigram subnetwork)
``base + candidate``        the base with the candidate's heads/neurons switched on as well
                            (:func:`~bigram_circuits.circuits.ablation.add_candidate`: a
                            weight-mask base gets the head's W_Q/W_K/W_V rows and W_O columns)
``base + random heads``     the base plus as many random heads per layer (one row per seed)
``full``                    the full model
``full - candidate``        the full model with the candidate's heads zeroed (``hook_z``)
``full - random heads``     the full model without as many random heads (one row per seed)
==========================  ===============================================================

**Recovered fraction** of a run with metric value ``m``:
``recovered = (m - m_base) / (m_full - m_base)``: 0 = the base alone, 1 = the full model. For
a loss (lower is better) this is ``(loss_base - loss) / (loss_base - loss_full)``, the share of
the full model's loss reduction over the base that the run achieves; for a logit difference
(higher is better) it is the share of the full model's gain. ``full - candidate`` rows report
how much of that improvement is left without the candidate.

Tasks (behaviours) provide clean and corrupted prompts of equal shape, so the same object
also drives the patching methods of :mod:`~bigram_circuits.circuits.candidates`:

- :class:`RepetitionTask`: in-context repetition. Clean = random token sequences repeated
  twice; corrupted = the same second halves after a *different* random first half, so nothing
  can be copied. Metric: mean loss (nats) on the second half (lower is better).
- :class:`NameCopyingTask`: copying a name from earlier in the prompt (the indirect-object
  pattern, "When Mary and John went to the store, John gave a drink to" -> " Mary"). Chosen
  because it is a documented behaviour of small LMs (GPT-2 small's IOI circuit), it needs
  in-context information that no bigram statistic can supply (the answer follows " to"
  whatever the names), and it has a natural corruption of the same length: the first two
  names replaced by two other names, so the answer no longer occurs in the prompt. Metric:
  logit(answer) - logit(repeated name) at the last position (higher is better).

Everything returns DataFrames; nothing is plotted or written except by :func:`save_build_up`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import (
    Candidate,
    _unit_as_weight_masks,
    add_candidate,
    repeated_random_tokens,
)
from bigram_circuits.circuits.candidates import (
    ATTRIBUTION_SOURCE,
    attribution_scores,
    candidate_agreement,
    candidate_from_scores,
    head_label,
    head_score_candidates,
    method_head_table,
    patching_scores,
    transformer_lens_version,
)
from bigram_circuits.circuits.overlap import overlap
from bigram_circuits.circuits.runs import RunSpec
from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError, MaskError
from bigram_circuits.masks import MaskKey, granularity_of_key, model_geometry

__all__ = [
    "CONDITIONS",
    "NAMES",
    "BuildUpConfig",
    "NameCopyingTask",
    "RepetitionTask",
    "build_up",
    "build_up_experiment",
    "build_up_report",
    "candidate_weight_masks",
    "candidates_from_tables",
    "circuit_overlap",
    "circuit_placement",
    "find_candidates",
    "make_task",
    "recovered_fraction",
    "summarize_build_up",
]

CONDITIONS = (
    "base",
    "base + candidate",
    "base + random heads",
    "full",
    "full - candidate",
    "full - random heads",
)


def recovered_fraction(value: float, base: float, full: float) -> float:
    """``(value - base) / (full - base)``: 0 at the base, 1 at the full model (NaN if equal)."""
    gap = full - base
    if gap == 0 or not math.isfinite(gap):
        return float("nan")
    return (value - base) / gap


# --------------------------------------------------------------------------- tasks


class _Task:
    """Shared machinery of a task: batched evaluation of its metric on the clean prompts."""

    name: str
    metric_name: str
    higher_is_better: bool
    clean: Integer[torch.Tensor, "n pos"]
    corrupted: Integer[torch.Tensor, "n pos"]
    batch_size: int = 16

    def per_example(self, logits: Float[torch.Tensor, "n pos vocab"], index: slice) -> Float[torch.Tensor, " n"]:
        """The metric of each prompt ``index`` from its logits."""
        raise NotImplementedError

    def metric_fn(self, index: slice = slice(None)) -> Callable[[torch.Tensor], torch.Tensor]:
        """``logits -> mean metric`` for the prompts ``index`` (a scalar tensor, differentiable)."""
        index = slice(*index.indices(self.clean.shape[0]))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return self.per_example(logits, index).mean()

        return metric

    def extra(self, logits: Float[torch.Tensor, "n pos vocab"], index: slice) -> dict[str, Float[torch.Tensor, " n"]]:
        """Further per-prompt values reported next to the metric."""
        return {}

    @torch.no_grad()
    def __call__(self, bridge: TransformerBridge) -> dict[str, float]:
        """The metric (and extras), averaged over the clean prompts, under the active run."""
        sums: dict[str, float] = {}
        n = self.clean.shape[0]
        device = input_device(bridge)
        for start in range(0, n, self.batch_size):
            index = slice(start, min(start + self.batch_size, n))
            logits = bridge(self.clean[index].to(device)).float().cpu()
            values = {self.metric_name: self.per_example(logits, index), **self.extra(logits, index)}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value.double().sum())
        return {key: total / n for key, total in sums.items()}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            "name": self.name,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "n_prompts": int(self.clean.shape[0]),
            "n_positions": int(self.clean.shape[1]),
        }


class RepetitionTask(_Task):
    """In-context repetition: loss on the second copy of a repeated random token sequence.

    ``clean`` = ``[prefix] + A + A`` (``A`` = ``seq_len`` random tokens from ``[low, vocab)``
    or from ``pool``); ``corrupted`` = ``[prefix] + B + A`` with another random ``B``, so the
    scored tokens are identical but nothing can be copied. Scored: the predictions of tokens
    2..seq_len of the second copy (as in
    :func:`~bigram_circuits.circuits.ablation.repeated_sequence_losses`).
    """

    name = "repetition"
    metric_name = "second_half_loss"
    higher_is_better = False

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 24,
        n_sequences: int = 16,
        seed: int = 0,
        *,
        low: int = 0,
        pool: Sequence[int] | None = None,
        prefix_token: int | None = None,
        batch_size: int = 16,
    ) -> None:
        self.vocab_size, self.seq_len, self.seed = int(vocab_size), int(seq_len), int(seed)
        self.low, self.pool = int(low), None if pool is None else tuple(int(t) for t in pool)
        self.prefix = int(prefix_token is not None)
        self.batch_size = int(batch_size)
        self.clean = repeated_random_tokens(
            vocab_size, seq_len, n_sequences, seed, prefix_token=prefix_token, low=low, pool=pool
        )
        other = repeated_random_tokens(
            vocab_size,
            seq_len,
            n_sequences,
            seed + 10_007,
            prefix_token=prefix_token,
            low=low,
            pool=pool,
        )
        self.corrupted = self.clean.clone()
        first = slice(self.prefix, self.prefix + self.seq_len)
        self.corrupted[:, first] = other[:, first]
        start = self.prefix + self.seq_len
        self._predict = torch.arange(start, start + self.seq_len - 1)
        self._first = torch.arange(self.prefix, self.prefix + self.seq_len - 1)

    def _nll(self, logits: torch.Tensor, index: slice, positions: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, positions, : self.vocab_size].double(), -1)
        targets = self.clean[index][:, positions + 1].to(logits.device)
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)

    def per_example(self, logits, index):
        """Mean next-token loss (nats) over the scored second-copy positions of each prompt."""
        return self._nll(logits, index, self._predict)

    def extra(self, logits, index):
        """``first_half_loss`` (nothing to copy yet) and ``copy_gain`` = first - second."""
        first = self._nll(logits, index, self._first)
        return {"first_half_loss": first, "copy_gain": first - self._nll(logits, index, self._predict)}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            **super().describe(),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": f"pool of {len(self.pool)}" if self.pool else f"uniform [{self.low}, {self.vocab_size})",
        }


# Common English first names; a tokenizer's single-token ones (with a leading space) are used.
NAMES = (
    "Mary",
    "John",
    "Alice",
    "Bob",
    "James",
    "Tom",
    "Anna",
    "David",
    "Sarah",
    "Michael",
    "Robert",
    "William",
    "George",
    "Thomas",
    "Henry",
    "Paul",
    "Peter",
    "Mark",
    "Lisa",
    "Emma",
    "Jack",
    "Kate",
    "Susan",
    "Frank",
    "Charles",
    "Edward",
    "Richard",
    "Joseph",
    "Daniel",
    "Andrew",
    "Steven",
    "Kevin",
    "Brian",
    "Jason",
    "Matthew",
    "Eric",
    "Stephen",
    "Scott",
    "Samuel",
    "Patrick",
    "Adam",
    "Nathan",
    "Walter",
    "Carl",
    "Roger",
    "Arthur",
    "Louis",
    "Philip",
    "Christian",
    "Linda",
    "Barbara",
    "Elizabeth",
    "Jennifer",
    "Maria",
    "Margaret",
    "Nancy",
    "Karen",
    "Helen",
    "Laura",
    "Jessica",
    "Rachel",
    "Emily",
    "Julia",
    "Diana",
    "Rose",
    "Jane",
    "Anne",
    "Victoria",
    "Grace",
    "Alan",
)

# Templates: {a} first name (the answer), {b} second name, repeated as the giver.
TEMPLATES = (
    "When{a} and{b} went to the store,{b} gave a drink to",
    "When{a} and{b} went to the park,{b} gave a ball to",
    "After{a} and{b} went to the office,{b} handed a letter to",
    "While{a} and{b} were at the house,{b} gave a book to",
)


class NameCopyingTask(_Task):
    """Copying a name from earlier in the prompt (indirect-object identification).

    Clean: ``"When A and B went to the store, B gave a drink to"`` (answer `` A``). Corrupted:
    the same prompt with A and B in the first clause replaced by two other names C and D, so
    the answer is nowhere in the prompt. Metric ``logit_diff`` = logit(`` A``) - logit(`` B``)
    at the last position (higher is better); extras ``answer_prob`` and ``accuracy``
    (answer logit above the repeated name's). Only names that are one token with a leading
    space are used (at least four are needed), and only the templates whose prompts all have
    the most common length, so prompts batch without padding.
    """

    name = "names"
    metric_name = "logit_diff"
    higher_is_better = True

    def __init__(
        self,
        tokenizer: Any,
        n_prompts: int = 24,
        seed: int = 0,
        *,
        names: Sequence[str] | None = None,
        templates: Sequence[str] = TEMPLATES,
        vocab_size: int | None = None,
        batch_size: int = 16,
    ) -> None:
        if n_prompts < 1:
            raise ConfigError(f"n_prompts must be >= 1, got {n_prompts}")
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        ids: dict[str, int] = {}
        for name in dict.fromkeys(names or NAMES):
            encoded = tokenizer.encode(" " + name, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] < self.vocab_size:
                ids[name] = int(encoded[0])
        if len(ids) < 4:
            raise ConfigError(
                f"the tokenizer has only {len(ids)} single-token names ({', '.join(ids)}); "
                "the name task needs 4: pass names="
            )
        self.names = tuple(ids)
        rng = np.random.default_rng(seed)
        # Keep the templates of the most common length (names are one token each).
        first = self.names[:2]
        lengths = [
            len(tokenizer.encode(t.format(a=" " + first[0], b=" " + first[1]), add_special_tokens=False))
            for t in templates
        ]
        if not lengths:
            raise ConfigError("no name-copying template given; pass templates=")
        common = int(pd.Series(lengths).mode().iloc[0])
        templates = [t for t, n in zip(templates, lengths) if n == common]
        prompts: list[tuple[list[int], list[int], int, int, str]] = []
        attempts = 0
        while len(prompts) < n_prompts and attempts < 50 * n_prompts:
            attempts += 1
            template = templates[int(rng.integers(len(templates)))]
            a, b, c, d = (self.names[i] for i in rng.choice(len(self.names), 4, replace=False))
            clean_text = template.format(a=" " + a, b=" " + b)
            corrupted_text = self._corrupt(template, c, d, b)
            clean_ids = tokenizer.encode(clean_text, add_special_tokens=False)
            corrupted_ids = tokenizer.encode(corrupted_text, add_special_tokens=False)
            if not len(clean_ids) == len(corrupted_ids) == common:
                continue
            prompts.append((clean_ids, corrupted_ids, ids[a], ids[b], clean_text))
        if not prompts:
            raise ConfigError("no name prompt tokenized to the templates' length; pass other templates=")
        self.texts = [p[4] for p in prompts]
        self.clean = torch.tensor([p[0] for p in prompts], dtype=torch.int64)
        self.corrupted = torch.tensor([p[1] for p in prompts], dtype=torch.int64)
        self.answers = torch.tensor([p[2] for p in prompts], dtype=torch.int64)
        self.repeated = torch.tensor([p[3] for p in prompts], dtype=torch.int64)

    @staticmethod
    def _corrupt(template: str, c: str, d: str, b: str) -> str:
        """The template with the first name C, the second D and the repeated name still B."""
        first, rest = template.split("{b}", 1)
        return first.format(a=" " + c) + " " + d + rest.format(b=" " + b)

    def _last(self, logits: torch.Tensor, index: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last = logits[:, -1, : self.vocab_size]
        answers = self.answers[index].to(last.device)
        repeated = self.repeated[index].to(last.device)
        return last, answers, repeated

    def per_example(self, logits, index):
        """logit(answer) - logit(repeated name) at the last position."""
        last, answers, repeated = self._last(logits, index)
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, answers] - last[rows, repeated]

    def extra(self, logits, index):
        """``answer_prob`` (softmax over the vocabulary) and ``accuracy`` (answer beats B)."""
        last, answers, _ = self._last(logits, index)
        rows = torch.arange(last.shape[0], device=last.device)
        prob = torch.softmax(last.double(), -1)[rows, answers]
        return {"answer_prob": prob, "accuracy": (self.per_example(logits, index) > 0).double()}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            **super().describe(),
            "seed": self.seed,
            "n_names": len(self.names),
            "example": self.texts[0] if self.texts else None,
        }


def make_task(name: str, tokenizer: Any, vocab_size: int, config: BuildUpConfig | None = None) -> _Task:
    """The task ``"repetition"`` or ``"names"`` with the sizes of ``config``."""
    config = config or BuildUpConfig()
    if name == "repetition":
        return RepetitionTask(
            vocab_size,
            config.seq_len,
            config.n_sequences,
            config.seed,
            low=config.low,
            batch_size=config.batch_size,
        )
    if name == "names":
        return NameCopyingTask(
            tokenizer,
            config.n_prompts,
            config.seed,
            vocab_size=vocab_size,
            batch_size=config.batch_size,
        )
    raise ConfigError(f"unknown task {name!r}; choose 'repetition' or 'names'")


# --------------------------------------------------------------------------- build-up


def _measure(bridge: TransformerBridge, run: RunSpec, task: Callable[[Any], Mapping[str, float]]) -> dict[str, float]:
    with run.context(bridge):
        return {key: float(value) for key, value in task(bridge).items()}


def build_up(
    bridge: TransformerBridge,
    base: Any,
    candidates: Mapping[str, Candidate] | Sequence[Candidate],
    task: Any,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    base_label: str = "bigram",
    necessity: bool = True,
    full: Mapping[str, float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure ``task`` on base, base + each candidate, base + random heads (one row per seed),
    the full model and (with ``necessity``) the full model minus each candidate / random heads.

    ``task(bridge) -> {metric: value, ...}`` under the active run and names its main metric in
    ``task.metric_name``. ``full`` reuses an already measured full-model result (e.g. for a
    second base). Columns: task, metric, base, condition (see :data:`CONDITIONS`), candidate,
    seed, heads, neurons, added_weights (mask entries switched on in the base), value,
    recovered, then every value the task returns. ``attrs``: base_value, full_value.
    """
    if isinstance(candidates, Mapping):
        named = dict(candidates)
    else:
        named = {c.name: c for c in candidates}
    if not named:
        raise MaskError("build_up needs at least one candidate")
    metric = getattr(task, "metric_name", None)
    if metric is None:
        raise ConfigError("the task must name its main metric in task.metric_name")
    task_name = getattr(task, "name", "task")
    jobs: list[tuple[str, str, int | None, Candidate | None, RunSpec | None, str]] = []
    for name, candidate in named.items():
        jobs.append(("base + candidate", name, None, candidate, None, "add"))
        for seed in seeds:
            control = candidate.random_control(bridge, seed=int(seed), exclude=dict(base.masks))
            jobs.append(("base + random heads", name, int(seed), control, None, "add"))
    if necessity:
        for name, candidate in named.items():
            jobs.append(("full - candidate", name, None, candidate, RunSpec(candidate, "ablate"), "run"))
            for seed in seeds:
                control = candidate.random_control(bridge, seed=int(seed))
                jobs.append(("full - random heads", name, int(seed), control, RunSpec(control, "ablate"), "run"))

    rows: list[dict[str, Any]] = []

    def record(condition, name, seed, candidate, added, values):
        rows.append(
            {
                "task": task_name,
                "metric": metric,
                "base": base_label,
                "condition": condition,
                "candidate": name,
                "seed": seed,
                "heads": 0 if candidate is None else candidate.n_heads,
                "neurons": 0 if candidate is None else candidate.n_neurons,
                "added_weights": added,
                **values,
            }
        )

    bar = tqdm(total=len(jobs) + 2, desc=f"build-up {task_name} ({base_label})", disable=not progress, leave=False)
    record("base", None, None, None, None, _measure(bridge, RunSpec(base, "keep"), task))
    bar.update()
    full_values = dict(full) if full is not None else _measure(bridge, RunSpec(None), task)
    record("full", None, None, None, None, full_values)
    bar.update()
    for condition, name, seed, candidate, run, how in jobs:
        added = None
        if how == "add":
            combined = add_candidate(base, candidate, bridge)
            added = int(sum(combined.metadata["added_entries"].values()))
            run = RunSpec(combined, "keep")
        record(condition, name, seed, candidate, added, _measure(bridge, run, task))
        bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc(metric), "value", table[metric])
    base_value = float(table.loc[table["condition"] == "base", "value"].iloc[0])
    full_value = float(full_values[metric])
    table.insert(
        table.columns.get_loc("value") + 1,
        "recovered",
        [recovered_fraction(v, base_value, full_value) for v in table["value"]],
    )
    table["seed"] = table["seed"].astype("Int64")
    table["added_weights"] = table["added_weights"].astype("Int64")
    order = {c: i for i, c in enumerate(CONDITIONS)}
    table = table.sort_values("condition", key=lambda s: s.map(order), kind="stable", ignore_index=True)
    table.attrs.update(base_value=base_value, full_value=full_value, metric=metric)
    return table


def summarize_build_up(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, base, condition, candidate): mean and std over random seeds.

    Columns: task, metric, base, condition, candidate, heads, value, value_std, recovered,
    recovered_std, n_seeds (std is NaN for single rows).
    """
    keys = ["task", "metric", "base", "condition", "candidate"]
    missing = [c for c in keys + ["value", "recovered", "heads"] if c not in table.columns]
    if missing:
        raise ConfigError(f"the build-up table lacks column(s) {missing}; pass build_up's output")
    frame = table.assign(candidate=table["candidate"].fillna(""))
    grouped = frame.groupby(keys, sort=False, dropna=False)
    summary = grouped.agg(
        heads=("heads", "first"),
        value=("value", "mean"),
        value_std=("value", "std"),
        recovered=("recovered", "mean"),
        recovered_std=("recovered", "std"),
        n_seeds=("value", "size"),
    ).reset_index()
    summary["candidate"] = summary["candidate"].replace("", None)
    return summary


def build_up_report(summary: pd.DataFrame) -> pd.DataFrame:
    """A wide table, one row per (task, base, candidate): the base and full values and their
    ``gap`` (the denominator of every recovered fraction: when it is small against the spread of
    the random controls, the fractions mean little), the value and recovered fraction with the
    candidate, with random heads (mean and std over seeds), and of the full model without the
    candidate / without random heads."""
    rows = []
    for (task, base), part in summary.groupby(["task", "base"], sort=False):
        base_value = float(part.loc[part["condition"] == "base", "value"].iloc[0])
        full_value = float(part.loc[part["condition"] == "full", "value"].iloc[0])
        for name in part["candidate"].dropna().unique():
            mine = part[part["candidate"] == name].set_index("condition")

            def get(condition: str, column: str, mine: pd.DataFrame = mine) -> float:
                return float(mine.loc[condition, column]) if condition in mine.index else float("nan")

            rows.append(
                {
                    "task": task,
                    "metric": part["metric"].iloc[0],
                    "base": base,
                    "candidate": name,
                    "heads": int(mine["heads"].iloc[0]),
                    "base_value": base_value,
                    "full_value": full_value,
                    "gap": full_value - base_value,
                    "with_candidate": get("base + candidate", "value"),
                    "recovered": get("base + candidate", "recovered"),
                    "random_heads": get("base + random heads", "value"),
                    "random_recovered": get("base + random heads", "recovered"),
                    "random_recovered_std": get("base + random heads", "recovered_std"),
                    "full_minus_candidate": get("full - candidate", "value"),
                    "full_minus_recovered": get("full - candidate", "recovered"),
                    "full_minus_random_recovered": get("full - random heads", "recovered"),
                    "full_minus_random_recovered_std": get("full - random heads", "recovered_std"),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- circuits vs the base


def candidate_weight_masks(
    candidate: Candidate, bridge: TransformerBridge, reference: Mapping[str, torch.Tensor]
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """The weights a candidate uses, as masks over the weight keys of ``reference``
    (canonical ``[out, in]`` layout): a head's W_Q rows and W_O columns and its K/V group's
    W_K/W_V rows; a neuron's MLP input row(s) and output column; plus ``candidate.weights``."""
    out = {key: torch.zeros(tuple(mask.shape), dtype=torch.bool) for key, mask in reference.items()}
    geometry = model_geometry(bridge)
    for key, units in candidate.masks(bridge).items():
        if key in out and not MaskKey.is_unit_key(key):
            out[key] |= units.cpu()
            continue
        for weight_key, grid in _unit_as_weight_masks(key, units.cpu(), reference, geometry).items():
            out[weight_key] |= grid
    return out


def _base_weight_masks(base: Any) -> dict[str, torch.Tensor]:
    if hasattr(base, "to_weight_masks"):
        return base.to_weight_masks()
    masks = dict(base.masks)
    if any(granularity_of_key(key).name != "weight" for key in masks):
        raise MaskError("the base holds head/neuron masks; pass a Subnetwork (it expands to weights)")
    return masks


def circuit_overlap(
    base: Any,
    candidates: Mapping[str, Candidate],
    bridge: TransformerBridge,
    *,
    base_label: str = "bigram",
    n_random: int = 10_000,
    seeds: Sequence[int] = (0, 1, 2),
    seed: int = 0,
) -> pd.DataFrame:
    """Weight-level overlap of the base subnetwork with each candidate circuit.

    The candidate's weights (:func:`candidate_weight_masks`) are compared with the base's
    weight masks by :func:`~bigram_circuits.circuits.overlap.overlap` (exact per-matrix null).
    Columns: base, candidate, heads, circuit_weights, base_weights, shared_weights,
    fraction_overlap, expected, ratio, p_value, p_value_text, circuit_in_base (share of the
    circuit's weights the base keeps), expected_circuit_in_base (under the null: the base's
    density in the circuit's matrices), random_heads_in_base / _std (the same share for random
    heads, same count per layer, over ``seeds``).
    """
    reference = _base_weight_masks(base)
    rows = []
    for name, candidate in candidates.items():
        circuit = candidate_weight_masks(candidate, bridge, reference)
        result = overlap(reference, circuit, n_random=n_random, seed=seed)
        shares = []
        for control_seed in seeds:
            control = candidate.random_control(bridge, seed=int(control_seed))
            control_masks = candidate_weight_masks(control, bridge, reference)
            kept = sum(int((control_masks[k] & reference[k]).sum()) for k in reference)
            total = sum(int(control_masks[k].sum()) for k in reference)
            shares.append(kept / total if total else float("nan"))
        n_circuit = result.n_kept_b
        rows.append(
            {
                "base": base_label,
                "candidate": name,
                "heads": candidate.n_heads,
                "circuit_weights": n_circuit,
                "base_weights": result.n_kept_a,
                "shared_weights": result.n_overlap,
                "fraction_overlap": result.fraction_overlap,
                "expected": result.expected,
                "ratio": result.ratio,
                "p_value": result.p_value,
                "p_value_text": result.p_value_text,
                "circuit_in_base": result.n_overlap / n_circuit if n_circuit else float("nan"),
                "expected_circuit_in_base": result.expected * result.n_entries / n_circuit
                if n_circuit
                else float("nan"),
                "random_heads_in_base": float(np.mean(shares)) if shares else float("nan"),
                "random_heads_in_base_std": float(np.std(shares, ddof=1)) if len(shares) > 1 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def circuit_placement(
    base: Any, candidates: Mapping[str, Candidate], bridge: TransformerBridge, *, base_label: str = "bigram"
) -> pd.DataFrame:
    """Per layer: where the base subnetwork's attention weights sit and where each candidate's
    heads sit, with the share of the candidate's weights in that layer that the base keeps.

    Columns: base, layer, base_attn_share (share of the base's kept weights in that layer's
    attention), base_attn_fraction_kept, base_mlp_share, candidate, heads (in that layer),
    head_labels, circuit_weights, circuit_in_base.
    """
    reference = _base_weight_masks(base)
    if hasattr(base, "layer_distribution"):
        distribution = base.layer_distribution()
    else:
        raise MaskError("the base needs layer_distribution(); pass a Subnetwork")
    by_block = distribution.set_index(["layer", "block"])
    n_layers = int(bridge.cfg.n_layers)
    rows = []
    for name, candidate in candidates.items():
        circuit = candidate_weight_masks(candidate, bridge, reference)
        for layer in range(n_layers):
            heads = [h for h in candidate.heads if h[0] == layer]
            keys = [k for k in reference if getattr(MaskKey.try_parse(k), "layer", None) == layer]
            n_circuit = sum(int(circuit[k].sum()) for k in keys)
            kept = sum(int((circuit[k] & reference[k]).sum()) for k in keys)

            def share(block: str, column: str, layer: int = layer) -> float:
                key = (layer, block)
                return float(by_block.loc[key, column]) if key in by_block.index else float("nan")

            rows.append(
                {
                    "base": base_label,
                    "layer": layer,
                    "base_attn_share": share("attn", "share_of_subnetwork"),
                    "base_attn_fraction_kept": share("attn", "fraction_kept"),
                    "base_mlp_share": share("mlp", "share_of_subnetwork"),
                    "candidate": name,
                    "heads": len(heads),
                    "head_labels": ", ".join(head_label(*h) for h in heads),
                    "circuit_weights": n_circuit,
                    "circuit_in_base": kept / n_circuit if n_circuit else float("nan"),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the whole experiment


@dataclass(frozen=True)
class BuildUpConfig:
    """Sizes of :func:`build_up_experiment` (defaults suit SmolLM2-135M on 2 CPU cores)."""

    tasks: tuple[str, ...] = ("repetition", "names")
    top_k: int = 5  # heads per candidate of every method
    n_previous: int = 3  # previous-token heads joined to the induction heads
    seeds: tuple[int, ...] = (0, 1, 2)  # random-head controls
    seq_len: int = 24  # repetition: length of each copy
    n_sequences: int = 16  # repetition: prompts
    low: int = 0  # repetition: smallest random token id
    n_score_sequences: int = 16  # head scores: repeated sequences (seq_len tokens per copy)
    n_prompts: int = 24  # names: prompts
    n_attribution: int = 8  # prompt pairs for attribution patching
    n_patching: int = 8  # prompt pairs for activation patching (one forward per head)
    wide_k: int = 0  # also the top wide_k heads by attribution patching (0: off)
    batch_size: int = 8
    necessity: bool = True  # full - candidate rows
    n_random_overlap: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ("repetition", "names")]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks must be among 'repetition', 'names'; got {list(self.tasks)}")
        for name in (
            "top_k",
            "seq_len",
            "n_sequences",
            "n_score_sequences",
            "n_prompts",
            "n_attribution",
            "n_patching",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.wide_k < 0:
            raise ConfigError(f"wide_k must be >= 0, got {self.wide_k}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be >= 2")


_SHARED = ("induction heads", "induction + previous-token")  # head-score candidates used for every task


def candidates_from_tables(
    head_score_table: pd.DataFrame, method_scores: pd.DataFrame, config: BuildUpConfig = BuildUpConfig()
) -> dict[str, dict[str, Candidate]]:
    """Rebuild the candidates of :func:`find_candidates` from its ``head_scores`` and
    ``method_scores`` tables (e.g. read back from a results file): ``{task: {name: Candidate}}``."""
    from bigram_circuits.circuits.candidates import head_candidates_from_scores

    missing = [c for c in ("task", "method", "layer", "head", "score") if c not in method_scores.columns]
    if missing:
        raise ConfigError(f"method_scores lacks column(s) {missing}; pass find_candidates' table")
    heads = head_candidates_from_scores(head_score_table, config.top_k, config.n_previous)
    k = config.top_k
    out: dict[str, dict[str, Candidate]] = {}
    for task in dict.fromkeys(method_scores["task"]):
        rows = method_scores[method_scores["task"] == task]
        found = {name: heads[name] for name in _SHARED if name in heads}
        for method, label in (("attribution patching", "attribution"), ("activation patching", "patching")):
            part = rows[rows["method"] == method]
            if not part.empty:
                found[f"{label} top {k}"] = candidate_from_scores(part, f"{label} top {k}", k, method=method)
                if label == "attribution" and config.wide_k > k:
                    wide = config.wide_k
                    found[f"{label} top {wide}"] = candidate_from_scores(
                        part, f"{label} top {wide}", wide, method=method
                    )
        out[str(task)] = found
    return out


def find_candidates(
    bridge: TransformerBridge, tokenizer: Any, config: BuildUpConfig = BuildUpConfig(), *, progress: bool = True
) -> dict[str, pd.DataFrame]:
    """Candidates from the three methods, found on the full model (no base needed).

    Head scores on repeated random tokens (induction heads, previous-token heads and their
    union), and per task of ``config`` attribution patching (TransformerLens) and activation
    patching of every head. Returns tables ``head_scores``, ``method_scores`` (task, method,
    layer, head, label, score, clean/corrupted metric; attribution MLP rows as
    ``"attribution patching (MLP)"``), ``candidates``, ``method_heads``, ``agreement`` and
    ``candidate_timings``; :func:`candidates_from_tables` turns them back into Candidates.
    """
    from bigram_circuits.models import model_vocab_size

    vocab = model_vocab_size(bridge, tokenizer)
    timings: dict[str, float] = {}
    tasks = {name: make_task(name, tokenizer, vocab, config) for name in config.tasks}
    t0 = time.time()
    head_candidates, scores = head_score_candidates(
        bridge,
        vocab,
        n_induction=config.top_k,
        n_previous=config.n_previous,
        seq_len=config.seq_len,
        n_sequences=config.n_score_sequences,
        seed=config.seed + 1,
        low=config.low,
    )
    timings["head_scores_s"] = time.time() - t0
    method_frames = []
    for name, task in tasks.items():
        t0 = time.time()
        attribution = attribution_scores(bridge, task, n_examples=config.n_attribution, progress=progress)
        timings[f"attribution_{name}_s"] = time.time() - t0
        t0 = time.time()
        patching = patching_scores(bridge, task, n_examples=config.n_patching)
        timings[f"patching_{name}_s"] = time.time() - t0
        for method, frame in (("attribution patching", attribution), ("activation patching", patching)):
            for kind, label in (("head", method), ("mlp", f"{method} (MLP)")):
                part = frame[frame["kind"] == kind][["layer", "head", "label", "score"]].copy()
                if part.empty:
                    continue
                part.insert(0, "method", label)
                part.insert(0, "task", name)
                part["clean_metric"] = frame.attrs["clean_metric"]
                part["corrupted_metric"] = frame.attrs["corrupted_metric"]
                part["n_examples"] = frame.attrs["n_examples"]
                method_frames.append(part)
    method_scores = pd.concat(method_frames, ignore_index=True)
    tables = {"head_scores": scores, "method_scores": method_scores}
    tables.update(_candidate_tables(candidates_from_tables(scores, method_scores, config), head_candidates))
    tables["candidate_timings"] = pd.DataFrame([{"step": k, "seconds": v} for k, v in timings.items()])
    return tables


def _candidate_tables(
    per_task: Mapping[str, Mapping[str, Candidate]], head_candidates: Mapping[str, Candidate]
) -> dict[str, pd.DataFrame]:
    """The ``candidates``, ``method_heads`` and ``agreement`` tables of found candidates."""
    agreement_frames, heads_frames = [], []
    for name, found in per_task.items():
        comparable = {**head_candidates, **{n: c for n, c in found.items() if n not in _SHARED}}
        agreement_frames.append(candidate_agreement(comparable).assign(task=name))
        heads_frames.append(method_head_table(comparable).assign(task=name))
    rows = [
        {
            "task": name if cname not in _SHARED else "all",
            "candidate": cname,
            "method": candidate.method,
            "heads": ", ".join(head_label(*h) for h in candidate.heads),
            "n_heads": candidate.n_heads,
        }
        for name, found in per_task.items()
        for cname, candidate in found.items()
    ]
    if "previous-token heads" in head_candidates:
        previous = head_candidates["previous-token heads"]
        rows.append(
            {
                "task": "all",
                "candidate": "previous-token heads",
                "method": previous.method,
                "heads": ", ".join(head_label(*h) for h in previous.heads),
                "n_heads": previous.n_heads,
            }
        )
    table = pd.DataFrame(rows).drop_duplicates(["task", "candidate"]).reset_index(drop=True)
    table.attrs.update(attribution_source=ATTRIBUTION_SOURCE, transformer_lens=transformer_lens_version())
    return {
        "candidates": table,
        "method_heads": pd.concat(heads_frames, ignore_index=True),
        "agreement": pd.concat(agreement_frames, ignore_index=True),
    }


def build_up_experiment(
    bridge: TransformerBridge,
    tokenizer: Any,
    bases: Mapping[str, Any],
    config: BuildUpConfig = BuildUpConfig(),
    *,
    found: Mapping[str, pd.DataFrame] | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Candidates from three methods, the build-up on every base and task, and the comparison
    of each base with the circuits.

    ``bases``: ``{label: Subnetwork}``, e.g. ``{"bigram": ..., "optimal": ...}``. Candidates
    (found on the full model by :func:`find_candidates`, or rebuilt from its tables passed as
    ``found``): induction heads and induction + previous-token heads (head scores, used for
    every task), and per task the top heads by attribution patching (TransformerLens) and by
    activation patching. Returns the tables of :func:`find_candidates` and ``build_up`` (one
    row per run), ``build_up_summary`` (seeds averaged), ``build_up_report`` (wide),
    ``overlap``, ``placement``, ``tasks``, ``timings``, ``config``.
    """
    from bigram_circuits.circuits.candidates import head_candidates_from_scores
    from bigram_circuits.models import model_vocab_size

    if not bases:
        raise MaskError("build_up_experiment needs at least one base subnetwork")
    vocab = model_vocab_size(bridge, tokenizer)
    started = time.time()
    tasks = {name: make_task(name, tokenizer, vocab, config) for name in config.tasks}
    if found is None:
        found = find_candidates(bridge, tokenizer, config, progress=progress)
    per_task = candidates_from_tables(found["head_scores"], found["method_scores"], config)
    missing = [t for t in tasks if t not in per_task]
    if missing:
        raise ConfigError(f"no candidates for task(s) {missing}; run find_candidates with those tasks")
    head_candidates = head_candidates_from_scores(found["head_scores"], config.top_k, config.n_previous)
    shared = {k: v for k, v in head_candidates.items() if k in _SHARED}
    timings: dict[str, float] = {}
    if "candidate_timings" in found:
        timings.update(dict(zip(found["candidate_timings"]["step"], found["candidate_timings"]["seconds"])))

    builds = []
    removed = ("full - candidate", "full - random heads")
    order = {c: i for i, c in enumerate(CONDITIONS)}
    for name, task in tasks.items():
        full_values, first = None, None
        for index, (label, base) in enumerate(bases.items()):
            t0 = time.time()
            table = build_up(
                bridge,
                base,
                per_task[name],
                task,
                seeds=config.seeds,
                base_label=label,
                necessity=config.necessity and index == 0,
                full=full_values,
                progress=progress,
            )
            timings[f"build_up_{name}_{label}_s"] = time.time() - t0
            if first is None:
                first = table
            elif config.necessity:  # the full model without heads does not depend on the base
                reused = first[first["condition"].isin(removed)].assign(base=label)
                reused["recovered"] = [
                    recovered_fraction(v, table.attrs["base_value"], table.attrs["full_value"]) for v in reused["value"]
                ]
                attrs = dict(table.attrs)
                table = pd.concat([table, reused], ignore_index=True).sort_values(
                    "condition", key=lambda c: c.map(order), kind="stable", ignore_index=True
                )
                table.attrs.update(attrs)
            full_values = {
                c: float(table.loc[table["condition"] == "full", c].iloc[0])
                for c in table.columns
                if c
                not in (
                    "task",
                    "metric",
                    "base",
                    "condition",
                    "candidate",
                    "seed",
                    "heads",
                    "neurons",
                    "added_weights",
                    "value",
                    "recovered",
                )
            }
            builds.append(table)
    build = pd.concat(builds, ignore_index=True)
    summary = summarize_build_up(build)

    t0 = time.time()
    unique: dict[str, Candidate] = {}
    for name, task_candidates in per_task.items():
        for cname, candidate in task_candidates.items():
            key = cname if cname in shared else f"{cname} ({name})"
            unique[key] = candidate
    overlaps = pd.concat(
        [
            circuit_overlap(
                base, unique, bridge, base_label=label, n_random=config.n_random_overlap, seeds=config.seeds
            )
            for label, base in bases.items()
        ],
        ignore_index=True,
    )
    placement = pd.concat(
        [circuit_placement(base, unique, bridge, base_label=label) for label, base in bases.items()],
        ignore_index=True,
    )
    timings["overlap_placement_s"] = time.time() - t0
    timings["build_up_total_s"] = time.time() - started

    return {
        **{k: v for k, v in found.items() if k != "candidate_timings"},
        **_candidate_tables(per_task, head_candidates),
        "build_up": build,
        "build_up_summary": summary,
        "build_up_report": build_up_report(summary),
        "overlap": overlaps,
        "placement": placement,
        "tasks": pd.DataFrame([task.describe() for task in tasks.values()]),
        "timings": pd.DataFrame([{"step": k, "seconds": v} for k, v in timings.items()]),
        "config": pd.DataFrame([{k: json.dumps(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}]),
    }
