"""The subnetwork search: learn a sparse mask that makes the masked model match a target.

Objective (as in the paper): ``target loss + lambda * sum(soft mask) / |M|``, optimised with
AdamW over the mask logits only (base weights frozen). For neuron/head masks the sum weights
each entry by the weights it gates (``penalty_weighting="params"``), which equals the paper's
plain mean for weight masks.

Targets (:class:`Target`): the bigram distribution (sparse soft cross-entropy of
:class:`~bigram_circuits.ngrams.BigramStats`), the full model's own output distribution (the
paper's "optimal subnetwork"), the true next token, or any callable; named targets are
registered in :mod:`bigram_circuits.targets` (:func:`register_target`), where :class:`Target` lives.

Schedule and stopping: temperature ``T`` starts at 1 and is multiplied by ``temperature_growth``
(paper: 1.001) after every optimizer step; a run stops once the undecided entries (soft mask in
[0.1, 0.9]) are fewer than 1% of the entries above 0.9 (or none are undecided), or at
``max_steps`` / ``time_budget_s``.
The paper's stability check then looks for loss spikes (a step above the previous 10 steps'
mean by +0.25 or x1.25); a run with a spike in its last 100 steps, or whose loss does not
regain the pre-spike mean 100 steps before the end, is retried (at batches smaller than the
paper's 32 x 128 tokens a "step" of the check is the mean of enough steps to cover that many
tokens, :func:`steps_per_check_point`, so batch noise is not read as a spike) on a new data shuffle (up to
``max_attempts`` runs).

Defaults converge in a few hundred steps at every granularity: learning rate per granularity
(``SearchConfig.lr=None``: neuron and head logits 0.05, weight logits 0.01) and ``T`` x1.01 per
step (the ``slow`` schedule's, which replaced x1.02, now ``fast``, after the schedule
comparison). An entry is forced to decide once one optimizer step moves ``T * m`` across the
sigmoid's transition (``T * lr`` of about 4): before that, entries whose target gradient balances the
penalty hover at fractional soft masks and the stopping rule cannot fire (on the default model
with lr 0.05 and x1.01 about 950 of 4128 neuron/head entries stayed undecided for 250 steps).
``SearchConfig.paper()`` is the paper's schedule for weight masks: lr 5e-5, x1.001, 5-15k steps.

Every metric of a result (``SearchResult.metrics``) is measured with the *binary* mask that is
returned and saved, never with the soft mask.

Checkpoints (mask logits, optimizer state, step, temperature, attempt, noise generator and
history; data order is a function of seed, attempt and step) are written atomically to
``out_dir/checkpoint.pt`` every ``checkpoint_every`` steps and on Ctrl-C; ``resume=True``
continues from there and gives the same result as an uninterrupted run.

The code has three parts: :class:`SearchState`, everything a run needs to continue (its
``state_dict`` is the checkpoint, ``save``/``load`` write and read ``checkpoint.pt``);
:func:`search_step`, one optimizer step without I/O; and :func:`search`, the driver: it checks
the inputs, locks ``out_dir``, resumes, loops over steps (progress bar, NaN handling,
checkpoints, stopping rule), retries unstable attempts and saves the binary result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Integer
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.data import iterate_batches
from bigram_circuits.devices import input_device
from bigram_circuits.distributed import ShardedMaskSet, launched_by_torchrun
from bigram_circuits.distributed import current as current_group
from bigram_circuits.errors import GradientOverflow, NonFiniteLoss, SearchError, TokenError
from bigram_circuits.evaluate import pearson_r
from bigram_circuits.io import atomic_write_bytes, ensure_output_dir, run_directory_lock
from bigram_circuits.manifest import write_manifest
from bigram_circuits.masks import (
    DEFAULT_GRANULARITIES,
    DEFAULT_LEARNING_RATES,
    MaskSet,
    masks_attached,
    parse_granularities,
)
from bigram_circuits.models import check_tokens_fit, frozen_parameters
from bigram_circuits.models import model_id as model_fingerprint
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.rundir import RunDir
from bigram_circuits.runspec import RunLike, RunSpec
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.tables import sparsest_within
from bigram_circuits.targets import Target, TargetSpec, register_target, target_spec

__all__ = [
    "DEFAULT_LR",
    "PAPER_TOKENS_PER_STEP",
    "NonFiniteLoss",
    "SearchClock",
    "SearchConfig",
    "SearchResult",
    "SearchState",
    "StepLosses",
    "Target",
    "TargetSpec",
    "bigram_correlation",
    "choose_subnetwork",
    "flush_denormals",
    "register_target",
    "search",
    "search_step",
    "stability_check",
    "steps_per_check_point",
    "sweep",
    "target_spec",
]

# Each registered granularity's ``GranularitySpec.default_lr``: neuron 0.05, head 0.05, weight 0.01.
DEFAULT_LR: Mapping[str, float] = DEFAULT_LEARNING_RATES
TEMPERATURE_RULES = ("every_step", "after_settle")
# Named schedules (``SearchConfig.named``, ``find --schedule``): fields that differ from the defaults.
SCHEDULES: dict[str, dict] = {
    # the SearchConfig defaults: T x1.01 from the first step, masks at 0.5, lr per granularity, at
    # most 600 steps (on the default model, 3 seeds at lambda 10: the same r as "fast" with 13% fewer
    # weights, in 1.9x the steps; benchmarks/results/schedule_default_model.md)
    "default": {},
    # the defaults before "slow" won the schedule comparison: T x1.02, up to 2000 steps
    "fast": {"temperature_growth": 1.02, "max_steps": 2000},
    # the paper's weight-mask schedule
    "paper": {"lr": 5e-5, "temperature_growth": 1.001, "batch_size": 32, "max_steps": 15000},
    # T held at 1 until the target loss has settled, then x1.03 per step
    "settle": {"temperature_rule": "after_settle", "temperature_growth": 1.03},
    # start from (nearly) the full model: masks at sigmoid(2) = 0.88, then as "settle"
    "warm_settle": {"init": 2.0, "temperature_rule": "after_settle", "temperature_growth": 1.03},
    # the winner of the SmolLM2 schedule comparison (benchmarks/results/schedule_comparison.md):
    # T x1.01 for about 500-600 steps, so T reaches 20 only at step 300 and masks learn for longer
    # before they harden; lr 0.01 at every granularity (= "default" at weight masks)
    "slow": {"lr": 0.01, "temperature_growth": 1.01, "max_steps": 600},
}
# The run layout's names (bigram_circuits.rundir owns them; kept here under their old names).
CHECKPOINT_FILE = RunDir.CHECKPOINT
HISTORY_FILE = RunDir.HISTORY
SWEEP_FILE = RunDir.SWEEP
# Config fields that may change when a run is resumed (they do not change the trajectory).
_RESUMABLE_FIELDS = {
    "max_steps",
    "time_budget_s",
    "checkpoint_every",
    "log_every",
    "eval_batches",
    "recompute_masked_weights",  # bitwise the same gradients either way
}
# "auto" recomputes soft masks and masked weights for the backward only when keeping them (8
# bytes per mask entry) would take more than this share of the device's memory.
RECOMPUTE_MEMORY_SHARE = 0.125
# A step whose mask-logit gradients overflow float32 (seen in SmolLM2 at random init: once its
# masks thin out, the residual stream is small and each RMSNorm's backward multiplies the gradient
# by 1 / rms, ~1e37 by layer 2) is redone with the loss scaled by this factor, up to this many
# times; the smaller scale is kept for the rest of the run (AdamW's update does not depend on a
# constant gradient scale, up to its eps).
GRADIENT_BACKOFF = 2.0**-16
MAX_GRADIENT_RESCALES = 4


@dataclass
class SearchConfig:
    """Hyperparameters of one search. ``lr=None`` picks :data:`DEFAULT_LR` per granularity."""

    lam: float = 1.0  # sparsity weight lambda of the search
    lr: float | None = None  # mask learning rate (default None: per granularity, weight 0.01, neuron/head 0.05)
    weight_decay: float = 0.01  # AdamW weight decay of the mask logits (torch's, as in the authors' code)
    temperature_init: float = 1.0  # mask temperature at step 0
    temperature_growth: float = 1.01  # temperature factor per step (the paper: 1.001; the "fast" schedule: 1.02)
    temperature_rule: str = (
        "every_step"  # every_step: T grows from step 1; after_settle: T stays until the target loss has settled
    )
    settle_window: int = 25  # steps per window of the settling test (mean target loss of two consecutive windows)
    settle_tolerance: float = (
        0.01  # settled: the last window's mean target loss is not below the previous one's by more than this share
    )
    max_steps: int = 600  # steps per lambda (fewer when the stopping rule fires; T x1.01 reaches 390 by then)
    batch_size: int = 32  # windows per batch
    seq_len: int = 128  # tokens per window (<= the model's context)
    seed: int = 0  # seed of the mask initialisation and the batch order
    parameterization: str = "continuous"  # continuous (the paper's) or hard_concrete
    init: float = 0.0  # initial mask logit
    penalty_weighting: str = "params"  # params (weight each entry by the weights it gates) or entries
    undecided_low: float = 0.1  # lower bound of an undecided mask entry's probability
    undecided_high: float = 0.9  # upper bound of an undecided mask entry's probability
    stop_undecided_fraction: float = 0.01  # converged: fewer undecided entries than this share of the kept ones
    min_steps: int = 0  # steps before the stopping rule may fire
    stability_check: bool = True  # retry a run whose loss spiked (the paper's check)
    max_attempts: int = 3  # runs per lambda when the stability check fails
    checkpoint_every: int = 100  # steps between checkpoints
    time_budget_s: float | None = None  # search time per lambda, in seconds
    keep_top_k: int | None = None  # keep exactly the k largest mask logits instead of logit > 0
    eval_batches: int = 8  # batches for each run's held-out target loss
    log_every: int = 1  # steps between progress-bar updates
    recompute_masked_weights: str = (
        "auto"  # auto, always or never: recompute W*mask for the backward (memory) or keep it (speed)
    )

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.lam) and self.lam >= 0):
            problems.append(f"lam must be >= 0, got {self.lam}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        # NaN fails every comparison, so test for the valid range rather than the invalid one.
        if not (
            math.isfinite(self.temperature_init)
            and self.temperature_init > 0
            and math.isfinite(self.temperature_growth)
            and self.temperature_growth >= 1
        ):
            problems.append(
                "temperature schedule needs a finite temperature_init > 0 and a finite "
                f"temperature_growth >= 1, got {self.temperature_init} and {self.temperature_growth}"
            )
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            problems.append(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}")
        if self.max_steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            problems.append("max_steps and batch_size must be >= 1 and seq_len >= 2")
        if self.max_attempts < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("max_attempts, checkpoint_every and log_every must be >= 1")
        if self.temperature_rule not in TEMPERATURE_RULES:
            problems.append(
                f"temperature_rule must be one of {', '.join(TEMPERATURE_RULES)}, got {self.temperature_rule!r}"
            )
        if self.settle_window < 1 or not (math.isfinite(self.settle_tolerance) and self.settle_tolerance >= 0):
            problems.append("settle_window must be >= 1 and settle_tolerance a finite number >= 0")
        if self.recompute_masked_weights not in ("auto", "always", "never"):
            problems.append(
                f"recompute_masked_weights must be auto, always or never, got {self.recompute_masked_weights!r}"
            )
        if not 0 <= self.undecided_low < self.undecided_high <= 1:
            problems.append("need 0 <= undecided_low < undecided_high <= 1")
        if problems:
            raise SearchError("; ".join(problems))

    @classmethod
    def paper(cls, **overrides) -> SearchConfig:
        """The paper's settings for weight masks: lr 5e-5, T x1.001 per step, batch 32, at most
        15k steps."""
        return cls.named("paper", **overrides)

    @classmethod
    def named(cls, schedule: str, **overrides) -> SearchConfig:
        """The config of a named schedule (:data:`SCHEDULES`), with ``overrides`` on top."""
        if schedule not in SCHEDULES:
            raise SearchError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        return cls(**{**SCHEDULES[schedule], **overrides})

    def learning_rates(self, granularities: Sequence[str]) -> dict[str, float]:
        return {g: (self.lr if self.lr is not None else DEFAULT_LR[g]) for g in granularities}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- results


@dataclass
class SearchResult:
    """A finished search: the binary subnetwork, per-step history and binary-mask metrics."""

    subnetwork: Subnetwork
    history: pd.DataFrame
    metrics: dict
    config: SearchConfig
    out_dir: Path | None = None
    mask_set: MaskSet | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- helpers


def _check_windows(windows, seq_len: int) -> np.ndarray:
    array = windows.cpu().numpy() if isinstance(windows, torch.Tensor) else windows
    if getattr(array, "ndim", 0) != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise TokenError(
            f"windows must be a [n_windows, seq_len >= 2] array, got shape {getattr(array, 'shape', None)}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TokenError(f"windows must hold integer token ids, got {array.dtype}")
    return array[:, :seq_len]


def _batches(windows: np.ndarray, config: SearchConfig, attempt: int, start_step: int) -> Iterator[np.ndarray]:
    """Endless batches; the order depends only on (seed, attempt, step), so resume is exact."""
    n_batches = len(windows) // config.batch_size
    if n_batches == 0:
        raise SearchError(
            f"{len(windows)} windows are fewer than one batch of {config.batch_size}; "
            "use more data or a smaller batch_size"
        )
    step = start_step
    while True:
        epoch = step // n_batches
        seed = int(np.random.SeedSequence([config.seed, attempt, epoch]).generate_state(1)[0])
        for batch in iterate_batches(windows, config.batch_size, shuffle=True, seed=seed, start_batch=step % n_batches):
            yield batch
            step += 1


# The paper's batch: its stability thresholds are for the mean loss over this many tokens.
PAPER_TOKENS_PER_STEP = 32 * 128


def steps_per_check_point(batch_size: int, seq_len: int) -> int:
    """How many consecutive steps of ``batch_size x seq_len`` tokens make one point of the
    stability check: as close to the paper's 32 x 128 tokens as whole steps allow (1 at the
    paper's batch). At 4 x 32 a single step's loss has a batch-noise sd of about 0.14 nats, so
    the paper's +0.25 threshold would call noise a spike."""
    return max(1, round(PAPER_TOKENS_PER_STEP / (batch_size * seq_len)))


def stability_check(
    losses: Sequence[float],
    window: int = 10,
    abs_spike: float = 0.25,
    rel_spike: float = 1.25,
    tail: int = 100,
    steps_per_point: int = 1,
) -> tuple[bool, str]:
    """The paper's check: ``(stable, reason)``. A spike is a loss above the previous ``window``
    points' mean by ``+abs_spike`` or ``x rel_spike``; a run is unstable if a spike falls in the
    last ``tail`` points or the loss does not regain a spike's reference mean ``tail`` points
    before the end. A point is the mean loss of ``steps_per_point`` consecutive steps
    (:func:`steps_per_check_point`; the earliest steps that do not fill a point are left out),
    so every point covers about the paper's tokens; messages give step numbers."""
    k = max(1, int(steps_per_point))
    raw = np.asarray(losses, dtype=np.float64)
    offset = len(raw) % k  # leave out the earliest steps, so the last point ends at the last step
    values = raw[offset:].reshape(-1, k).mean(axis=1)
    n = len(values)
    if n <= window:
        return True, "too short to check"
    csum = np.concatenate([[0.0], np.cumsum(values)])
    means = (csum[window:n] - csum[: n - window]) / window  # mean of the `window` points before i
    idx = np.arange(window, n)
    spikes = idx[(values[window:] > means + abs_spike) | (values[window:] > means * rel_spike)]
    unit = "steps" if k == 1 else f"points of {k} steps"

    def step_of(i: int) -> int:  # the last step of point i, 1-based
        return offset + (i + 1) * k

    for i in spikes.tolist():  # Python ints
        ref = means[i - window]
        if i >= n - tail:
            return False, f"loss spike at step {step_of(i)} within the last {tail} {unit}"
        after = np.nonzero(values[i + 1 :] <= ref)[0]
        if len(after) == 0 or i + 1 + after[0] > n - 1 - tail:
            return False, f"loss did not recover from the spike at step {step_of(i)} {tail} {unit} before the end"
    return True, f"{len(spikes)} spikes, all recovered" + ("" if k == 1 else f" (points of {k} steps)")


@torch.no_grad()
def bigram_correlation(
    bridge: TransformerBridge,
    stats: BigramStats,
    windows: Integer[np.ndarray, "n seq"],
    run: RunLike = None,
    batch_size: int = 16,
) -> float:
    """Pearson r between the model's surprisal of each actual next token under ``run`` (default
    the full model; a subnetwork is kept, binary) and its bigram surprisal, over ``windows``;
    infinite bigram surprisals are dropped. (:mod:`bigram_circuits.evaluate` has the full metric
    suite.)"""

    array = _check_windows(windows, windows.shape[1])
    vocab = int(stats.vocab_size)
    device = input_device(bridge)
    model_parts, bigram_parts = [], []
    with RunSpec.coerce(run).context(bridge):
        for start in range(0, len(array), batch_size):
            batch_np = np.asarray(array[start : start + batch_size], dtype=np.int64)
            batch = torch.as_tensor(batch_np, device=device)
            log_probs = torch.log_softmax(bridge(batch)[:, :-1, :vocab].float(), dim=-1)
            model_parts.append(-log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1).double().cpu().numpy().ravel())
            bigram_parts.append(
                np.asarray(stats.surprisal(batch_np[:, :-1], batch_np[:, 1:]), dtype=np.float64).ravel()
            )
    model, bigram = np.concatenate(model_parts), np.concatenate(bigram_parts)
    finite = np.isfinite(bigram)
    return pearson_r(model[finite], bigram[finite])


@torch.no_grad()
def _target_loss(
    bridge: TransformerBridge,
    target: Target,
    windows: np.ndarray,
    subnetwork: Subnetwork | None,
    batch_size: int,
    max_batches: int,
) -> float:
    """Mean target loss over the first ``max_batches`` batches, with ``subnetwork`` kept."""
    device = input_device(bridge)
    total, count = 0.0, 0
    for start in range(0, min(len(windows), batch_size * max_batches), batch_size):
        batch = torch.as_tensor(np.asarray(windows[start : start + batch_size], dtype=np.int64), device=device)
        reference = bridge(batch) if target.needs_reference else None
        with RunSpec(subnetwork).context(bridge):
            loss = float(target(bridge(batch), batch, reference).detach())
        total += loss * len(batch)
        count += len(batch)
    return total / max(count, 1)


# --------------------------------------------------------------------------- state


@dataclass
class SearchClock:
    """Wall and process-CPU seconds of a search, counting those of the runs it resumes."""

    wall_before: float = 0.0
    cpu_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def cpu(self) -> float:  # process CPU s: robust on shared CPUs
        return self.cpu_before + time.process_time() - self.cpu_started


@dataclass
class SearchState:
    """Everything an interrupted search needs to continue exactly, as saved in ``checkpoint.pt``.

    ``mask_set`` holds the mask logits, the temperature and the hard-concrete noise generator;
    ``optimizer`` is the AdamW over the logits; ``attempt`` counts stability retries and ``step``
    optimizer steps within it; ``history`` has one row per step; ``previous_attempts`` summarises
    the attempts retried so far. ``run`` is the run's identity (``config``, ``granularities``,
    ``target``, ``model_id``), checked on resume. The data order is a function of seed, attempt
    and step, so it is not stored.
    """

    mask_set: MaskSet
    optimizer: torch.optim.Optimizer
    run: dict
    attempt: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    previous_attempts: list[dict] = field(default_factory=list)
    clock: SearchClock = field(default_factory=SearchClock)
    grad_scale: float = 1.0  # the loss's scale for the backward (< 1 only after a gradient overflow)

    @classmethod
    def fresh(
        cls,
        bridge: TransformerBridge,
        config: SearchConfig,
        run: dict,
        attempt: int = 0,
        previous_attempts: list[dict] | None = None,
        clock: SearchClock | None = None,
    ) -> SearchState:
        """Step 0 of ``attempt``: mask logits at ``config.init``, ``T = temperature_init``, noise
        seeded with ``seed * 1000 + attempt``, a new AdamW (one parameter group per granularity)."""
        clock = clock or SearchClock()
        grans = run["granularities"]
        # Data-parallel with shard_masks: each rank keeps 1/N of the logits (FSDP2).
        mask_class = ShardedMaskSet if current_group().sharded else MaskSet
        mask_set = mask_class.for_model(bridge, grans, config.parameterization, config.init, config.penalty_weighting)
        mask_set.temperature = float(config.temperature_init)
        mask_set.recompute = _recompute(config, mask_set)
        mask_set.seed(config.seed * 1000 + attempt)
        mask_set.train()
        lrs = config.learning_rates(grans)
        groups = [
            {
                "params": [mask_set.parameter(k) for k, c in mask_set.components.items() if c.granularity == g],
                "lr": lrs[g],
                "name": g,
            }
            for g in grans
        ]
        # One fused kernel per tensor (one pass over the logits instead of about eight) where torch
        # has one; a sharded set's DTensor logits take the default implementation.
        fused = not isinstance(mask_set, ShardedMaskSet) and all(
            p.device.type in ("cpu", "cuda") for group in groups for p in group["params"]
        )
        optimizer = torch.optim.AdamW(
            groups, lr=max(lrs.values()), weight_decay=config.weight_decay, fused=fused or None
        )
        return cls(
            mask_set, optimizer, run, attempt, 0, [], previous_attempts if previous_attempts is not None else [], clock
        )

    def next_attempt(self, bridge: TransformerBridge, config: SearchConfig, summary: dict) -> SearchState:
        """A fresh mask for the next attempt (a new data shuffle), with this one's ``summary``
        appended to ``previous_attempts``; the clock runs on."""
        self.previous_attempts.append(summary)
        return SearchState.fresh(bridge, config, self.run, self.attempt + 1, self.previous_attempts, self.clock)

    @property
    def settled(self) -> bool:
        """Whether the target loss has settled by the last recorded step (see :func:`loss_settled`)."""
        return bool(self.history) and bool(self.history[-1].get("settled", False))

    def generator_state(self) -> torch.Tensor | None:
        """The noise generator's state (``None`` without hard-concrete noise)."""
        return self.mask_set.generator.get_state() if self.mask_set.generator is not None else None

    def state_dict(self) -> dict:
        """The checkpoint: the keys of ``checkpoint.pt`` (timings include the resumed runs')."""
        return {
            "attempt": self.attempt,
            "step": self.step,
            "history": self.history,
            "attempts": self.previous_attempts,
            "mask_state": self.mask_set.state_dict(),  # full tensors, also when sharded
            "optimizer": self.mask_set.optimizer_state_dict(self.optimizer),
            "generator": self.generator_state(),
            "grad_scale": self.grad_scale,
            **self.run,
            "elapsed_s": self.clock.wall(),
            "cpu_s": self.clock.cpu(),
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Continue from ``checkpoint`` (a :meth:`state_dict` of the same attempt)."""
        self.mask_set.load_state_dict(checkpoint["mask_state"])
        self.mask_set.load_optimizer_state_dict(self.optimizer, checkpoint["optimizer"])
        if self.mask_set.generator is not None and checkpoint.get("generator") is not None:
            self.mask_set.generator.set_state(checkpoint["generator"])
        self.step, self.history = int(checkpoint["step"]), list(checkpoint["history"])
        self.grad_scale = float(checkpoint.get("grad_scale", 1.0))  # absent before scaling existed

    def save(self, path: Path) -> None:
        """Write :meth:`state_dict` atomically to ``path``. Data-parallel: every rank calls it (a
        sharded mask set is gathered into the one-process layout) and rank 0 writes."""
        _save_checkpoint(path, self.state_dict())

    @classmethod
    def load(
        cls,
        path: Path,
        bridge: TransformerBridge,
        config: SearchConfig,
        granularities: Sequence[str],
        target: Target,
        model_id: str,
    ) -> SearchState:
        """The state saved in ``path``, continued on ``bridge``; ``SearchError`` if the file is
        unreadable or belongs to a run with other settings (see :func:`_load_checkpoint`)."""
        checkpoint = _load_checkpoint(path, config, granularities, target, model_id)
        clock = SearchClock(float(checkpoint.get("elapsed_s", 0.0)), float(checkpoint.get("cpu_s", 0.0)))
        state = cls.fresh(
            bridge,
            config,
            _run_identity(config, granularities, target, model_id),
            int(checkpoint["attempt"]),
            list(checkpoint.get("attempts", [])),
            clock,
        )
        state.load_state_dict(checkpoint)
        return state


def _device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` (physical RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _recompute(config: SearchConfig, mask_set: MaskSet) -> bool:
    """Whether the backward recomputes masks and masked weights (``recompute_masked_weights``):
    ``auto`` does when keeping them would take more than :data:`RECOMPUTE_MEMORY_SHARE` of the
    memory of the device the logits live on (large models), and keeps them otherwise (faster)."""
    if config.recompute_masked_weights != "auto":
        return config.recompute_masked_weights == "always"
    entries = sum(c.n_entries for c in mask_set.components.values())
    return 8 * entries > RECOMPUTE_MEMORY_SHARE * _device_memory_bytes(mask_set.device)


def _run_identity(config: SearchConfig, granularities: Sequence[str], target: Target, model_id: str) -> dict:
    """What a checkpoint records about its run, so that a resume can refuse another run's state."""
    return {
        "config": config.to_dict(),
        "granularities": list(granularities),
        "target": target.name,
        "model_id": model_id,
    }


def _changed_fields(saved: dict, current: dict) -> list[str]:
    """Config fields of ``current`` that differ from a ``saved`` config (a field an older release
    did not save counts as its default, which is how that release ran)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    return sorted(k for k in current if k not in _RESUMABLE_FIELDS and saved.get(k, defaults.get(k)) != current[k])


def _save_checkpoint(path: Path, state: dict) -> None:
    if not current_group().is_writer:  # data-parallel: rank 0 writes, every rank holds the same state
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, config: SearchConfig, granularities, target: Target, model_id: str) -> dict:
    """The checkpoint dict in ``path`` if it was written by a run with these settings, else SearchError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SearchError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it or pass resume=False"
        ) from exc
    saved = state.get("config", {})
    current = config.to_dict()
    changed = _changed_fields(saved, current)
    if (
        changed
        or state.get("granularities") != list(granularities)
        or state.get("target") != target.name
        or state.get("model_id") != model_id
    ):
        what = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed) or "model/target/granularity"
        raise SearchError(
            f"checkpoint in {path.parent} belongs to another run ({what}); use another out_dir or resume=False"
        )
    return state


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepLosses:
    """One step's losses: ``loss`` and ``target_loss`` averaged over data-parallel ranks (the
    whole batch), ``penalty`` the soft-mask penalty (the same on every rank)."""

    loss: float
    target_loss: float
    penalty: float


def search_step(
    state: SearchState,
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, "batch seq"],
    target: Target,
    config: SearchConfig,
) -> StepLosses:
    """One optimizer step of the mask logits on ``tokens`` (this rank's shard of the batch).

    Forward with the soft masks attached (and, for targets that need it, the unmasked model
    without grad first), ``target loss + lam * penalty``, backward, gradients averaged over
    data-parallel ranks (:func:`bigram_circuits.distributed.current`), AdamW step, then
    ``T *= temperature_growth`` (with ``temperature_rule="after_settle"`` only once the history
    says the target loss has settled) and ``state.step += 1``. Raises :class:`NonFiniteLoss` before
    the backward pass if the batch loss is not finite. If the mask-logit gradients overflow, the
    step is redone with the loss scaled by :data:`GRADIENT_BACKOFF` (kept in ``state.grad_scale``
    for the rest of the run), and :class:`GradientOverflow` is raised after
    :data:`MAX_GRADIENT_RESCALES` tries, before the optimizer step. No I/O.
    """
    group, mask_set = current_group(), state.mask_set
    reference = None
    if target.needs_reference:
        with torch.no_grad():
            reference = bridge(tokens)
    for _ in range(MAX_GRADIENT_RESCALES + 1):
        # The last step's (or try's) gradients are not needed any more: free them before the
        # forward pass rather than after it (4 bytes per mask entry less at its peak).
        state.optimizer.zero_grad(set_to_none=True)
        with mask_set.attach(bridge) as forward_masks:
            logits = bridge(tokens)
        target_loss = target(logits, tokens, reference)
        # The penalty of the very masks this forward used (the same hard-concrete noise draw).
        penalty = mask_set.penalty(forward_masks).to(target_loss.device)
        del forward_masks, logits  # not kept alive into the next step
        loss = target_loss + config.lam * penalty
        # Loss of the whole batch (the mean over ranks' equal shards) for logs and checks.
        logged = group.average(torch.stack([loss.detach(), target_loss.detach().to(loss.dtype)]))
        if not torch.isfinite(logged[0]):
            raise NonFiniteLoss(logged[0].item(), state.step + 1, config.lam)
        (loss if state.grad_scale == 1.0 else loss * state.grad_scale).backward()
        if not isinstance(mask_set, ShardedMaskSet):  # FSDP2 has reduce-scattered sharded gradients already
            group.after_backward(mask_set)  # average the mask-logit gradients over ranks
        if _gradients_finite(state.optimizer, group):
            break
        state.grad_scale *= GRADIENT_BACKOFF
    else:
        state.optimizer.zero_grad(set_to_none=True)
        raise GradientOverflow(state.step + 1, config.lam, state.grad_scale / GRADIENT_BACKOFF)
    state.optimizer.step()
    if config.temperature_rule == "every_step" or state.settled:
        mask_set.temperature *= config.temperature_growth
    state.step += 1
    return StepLosses(logged[0].item(), logged[1].item(), penalty.item())


def _gradients_finite(optimizer: torch.optim.Optimizer, group) -> bool:
    """Whether every mask-logit gradient is finite and its square too (AdamW squares it), on every
    rank: one fused pass (an L2 norm per tensor; it overflows exactly when a square sum does)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # a sharded set's own shard
    if not grads:
        return True
    largest = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)]).max()
    return not group.any(not bool(torch.isfinite(largest)))


# --------------------------------------------------------------------------- the search


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread while the block runs (then back to IEEE).

    A mask that hardens towards 0 makes ``W * sigmoid(T * logit)`` subnormal (below 1.2e-38), and
    x86 CPUs multiply subnormal matrices about 200x slower (an sgemm on SmolLM2's 1536 x 576 MLP
    matrix: 0.09 s per 50 products, 19 s with subnormal weights): a weight-mask search slowed
    from ~4 s to ~19 s per step as its masks hardened. Flushing changes only values below 1.2e-38,
    whose Adam updates underflow to 0 anyway. Threads of torch's CPU pool keep the mode they were
    created with: :func:`bigram_circuits.cli.main` sets it before the pool exists; in a notebook
    with several threads call ``torch.set_flush_denormal(True)`` before the first torch op."""
    changed = torch.set_flush_denormal(True)  # False where the CPU cannot flush (a no-op then)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def search(
    bridge: TransformerBridge,
    windows: Integer[np.ndarray, "n seq"],
    target: Target,
    granularities: str | Sequence[str] = DEFAULT_GRANULARITIES,
    config: SearchConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    eval_windows: Integer[np.ndarray, "n_eval eval_seq"] | None = None,
    resume: bool = True,
    show_progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    metadata: dict | None = None,
) -> SearchResult:
    """Learn a mask over ``bridge`` on ``windows`` so the masked model matches ``target``.

    Returns a :class:`SearchResult` whose subnetwork is the binary mask (``logit > 0``, or the
    ``config.keep_top_k`` largest logits). ``eval_windows`` (held out) are used for the
    result's metrics: target loss with the binary mask and, for the bigram target, the bigram
    surprisal correlation. With ``out_dir`` the run checkpoints there and saves the subnetwork
    (``masks.safetensors``, ``subnetwork.json``) and ``history.csv``; with ``resume=True`` a
    finished run there is loaded and an interrupted one continues. ``callback(step, row)`` runs
    after every step. While it runs, ``out_dir`` is locked (:func:`~bigram_circuits.io.run_directory_lock`):
    a second process searching into the same directory fails at once with one ``OutputError`` line.
    """
    group = current_group()  # data-parallel ranks (bigram_circuits.distributed); rank 0 writes
    with run_directory_lock(out_dir) if out_dir is not None and group.is_writer else contextlib.nullcontext():
        config = config or SearchConfig()
        grans, windows, out_path, fingerprint = _validated(
            bridge, windows, eval_windows, granularities, config, out_dir
        )
        show_progress = show_progress and group.is_writer
        if resume and _finished_in(out_path):
            return _load_finished(out_path, config, grans, target, fingerprint)
        checkpoint = _checkpoint_path(out_path, resume)
        with frozen_parameters(bridge), _evaluation_mode(bridge):  # no dropout: the mask is the only change
            if checkpoint is not None:
                state = SearchState.load(checkpoint, bridge, config, grans, target, fingerprint)
            else:
                state = SearchState.fresh(bridge, config, _run_identity(config, grans, target, fingerprint))
            while True:  # attempts: a new shuffle after an unstable run, up to max_attempts
                with flush_denormals():
                    stop_reason = _run_attempt(
                        state, bridge, windows, target, config, out_path, show_progress, callback
                    )
                stable, stability = _stability(state.history, config)
                outcome = {"stop_reason": stop_reason, "stable": stable, "stability": stability}
                last_attempt = state.attempt + 1 >= config.max_attempts
                if stable or not config.stability_check or last_attempt or stop_reason == "time_budget":
                    break
                state = state.next_attempt(bridge, config, {"attempt": state.attempt, "steps": state.step, **outcome})
        return _finish(bridge, state, target, windows, eval_windows, config, out_path, metadata, outcome)


def _stability(history: Sequence[dict], config: SearchConfig) -> tuple[bool, str]:
    """The paper's check on a run's loss history, at the paper's tokens per point."""
    points = steps_per_check_point(config.batch_size, config.seq_len)
    return stability_check([float(r["loss"]) for r in history], steps_per_point=points)


def _run_attempt(
    state: SearchState,
    bridge: TransformerBridge,
    windows: np.ndarray,
    target: Target,
    config: SearchConfig,
    out_path: Path | None,
    show_progress: bool,
    callback: Callable[[int, dict], None] | None,
) -> str:
    """Step ``state`` until the stopping rule, ``max_steps`` or the time budget; return why it
    stopped (``converged``, ``hardened_unsettled``, ``max_steps`` or ``time_budget``).
    Checkpoints every ``checkpoint_every`` steps, and on Ctrl-C when the state is whole."""
    group, device = current_group(), input_device(bridge)
    batches = _batches(windows, config, state.attempt, state.step)
    bar = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc=f"search lam={config.lam:g}",
        unit="step",
        disable=not show_progress,
        leave=False,
    )
    consistent = True  # whether the in-memory state is a whole number of steps
    try:
        while state.step < config.max_steps:
            if config.time_budget_s is not None and group.any(state.clock.wall() > config.time_budget_s):
                return "time_budget"
            tokens = torch.as_tensor(group.shard(next(batches)), device=device)
            generator_before = state.generator_state()  # the noise before this step samples
            consistent = False
            try:
                losses = search_step(state, bridge, tokens, target, config)
            except NonFiniteLoss as error:
                raise _non_finite_error(error, state, generator_before, out_path) from None
            consistent = True
            row = _record(state, losses, config, bar)
            if out_path is not None and state.step % config.checkpoint_every == 0:
                state.save(out_path / CHECKPOINT_FILE)
            if callback is not None:
                callback(state.step, row)
            if _stopping_rule(state.step, row, config):
                # Decided before the loss settled: by the temperature (or the init), not by learning.
                return "converged" if row["settled"] else "hardened_unsettled"
        return "max_steps"
    except KeyboardInterrupt:
        # A sharded save gathers over ranks, which may already be gone: keep the last periodic one.
        if out_path is not None and consistent and not group.sharded:
            state.save(out_path / CHECKPOINT_FILE)
        raise
    finally:
        bar.close()


def _validated(bridge: TransformerBridge, windows, eval_windows, granularities, config: SearchConfig, out_dir):
    """Check the inputs before any work: ``(granularities, windows cut to seq_len, out_path, model_id)``."""
    grans = parse_granularities(granularities)
    windows = _check_windows(windows, config.seq_len)
    check_tokens_fit(bridge, windows)
    if eval_windows is not None:  # fail now, not after the search
        check_tokens_fit(bridge, _check_windows(eval_windows, config.seq_len))
    if masks_attached(bridge):
        raise SearchError("masks are applied to the model; run the search outside `subnetwork.applied(...)`")
    out_path = ensure_output_dir(out_dir) if out_dir is not None else None
    fingerprint = model_fingerprint(bridge)
    if launched_by_torchrun() and not current_group().active:
        raise SearchError(
            "started by torchrun but not data-parallel: run `torchrun ... -m "
            "bigram_circuits.distributed find ...` or search inside data_parallel()"
        )
    return grans, windows, out_path, fingerprint


def _finished_in(out_path: Path | None) -> bool:
    return out_path is not None and RunDir(out_path).is_finished_search()


def _checkpoint_path(out_path: Path | None, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; first removes the temp files a killed process left."""
    if out_path is None:
        return None
    if current_group().is_writer:
        for stale in out_path.glob(f".{CHECKPOINT_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
    path = out_path / CHECKPOINT_FILE
    return path if resume and path.exists() else None


@contextlib.contextmanager
def _evaluation_mode(bridge: TransformerBridge) -> Iterator[None]:
    """``bridge.eval()`` within the block, its previous mode afterwards."""
    was_training = bridge.training
    bridge.eval()
    try:
        yield
    finally:
        bridge.train(was_training)


def _non_finite_error(error: NonFiniteLoss, state: SearchState, generator_before, out_path: Path | None) -> SearchError:
    """The error for a non-finite loss; first checkpoints the last good step when its logits are finite."""
    where = ""
    if out_path is not None:
        if state.mask_set.all_finite():
            _save_checkpoint(out_path / CHECKPOINT_FILE, {**state.state_dict(), "generator": generator_before})
            where = f"; the last good state (step {state.step}) is checkpointed in {out_path}"
        else:
            where = f"; the last periodic checkpoint in {out_path} is kept"
    return SearchError(f"{error}; lower the learning rate or check the target{where}")


def loss_settled(target_losses: Sequence[float], window: int, tolerance: float) -> bool:
    """Whether a loss curve has settled: the mean of its last ``window`` values is not below the
    mean of the ``window`` before by more than ``tolerance`` (a share of that mean). A rising
    loss counts as settled: it is no longer being learned. Needs ``2 * window`` values."""
    if len(target_losses) < 2 * window:
        return False
    last = float(np.mean(target_losses[-window:]))
    before = float(np.mean(target_losses[-2 * window : -window]))
    return before - last <= tolerance * abs(before)


def _record(state: SearchState, losses: StepLosses, config: SearchConfig, bar) -> dict:
    """Append the step's history row (losses, soft density, T, decision counts, whether the
    target loss has settled by now) and show it."""
    undecided, on, _ = state.mask_set.decision_counts(config.undecided_low, config.undecided_high)
    settled = state.settled or loss_settled(
        [r["target_loss"] for r in state.history[-2 * config.settle_window :]] + [losses.target_loss],
        config.settle_window,
        config.settle_tolerance,
    )
    row = {
        "step": state.step,
        "loss": losses.loss,
        "target_loss": losses.target_loss,
        "soft_density": losses.penalty,
        "temperature": float(state.mask_set.temperature),
        "undecided": undecided,
        "on": on,
        "settled": settled,
    }
    state.history.append(row)
    if state.step % config.log_every == 0:
        bar.set_postfix(
            loss=f"{row['loss']:.3f}",
            density=f"{row['soft_density']:.3f}",
            T=f"{row['temperature']:.2f}",
            refresh=False,
        )
    bar.update(1)
    return row


def _stopping_rule(step: int, row: dict, config: SearchConfig) -> bool:
    """Converged: past ``min_steps``, and no entry is undecided or fewer than
    ``stop_undecided_fraction`` of the entries that are on."""
    undecided, on = row["undecided"], row["on"]
    return step >= config.min_steps and (undecided == 0 or undecided < config.stop_undecided_fraction * on)


def _finish(
    bridge: TransformerBridge,
    state: SearchState,
    target: Target,
    windows: np.ndarray,
    eval_windows,
    config: SearchConfig,
    out_path: Path | None,
    metadata: dict | None,
    outcome: dict,
) -> SearchResult:
    """The binary subnetwork, its metrics and the saved result (rank 0 writes; the checkpoint goes)."""
    group, grans = current_group(), state.run["granularities"]
    wall_time, cpu_time = state.clock.wall(), state.clock.cpu()
    mask_set = state.mask_set
    mask_set.eval()
    binary = mask_set.binary(top_k=config.keep_top_k)
    meta = {
        **(metadata or {}),
        "model_name": getattr(bridge.cfg, "model_name", None),
        "target": target.name,
        "granularities": list(grans),
        "config": config.to_dict(),
        "learning_rates": config.learning_rates(grans),
    }
    subnetwork = Subnetwork.from_masks(bridge, binary, meta)
    metrics = _binary_metrics(bridge, subnetwork, target, windows, eval_windows, config)
    metrics.update(
        {
            "steps": state.step,
            "attempts": state.attempt + 1,
            "stop_reason": outcome["stop_reason"],
            "converged": outcome["stop_reason"] == "converged",
            "stable": outcome["stable"],
            "stability": outcome["stability"],
            "stability_steps_per_point": steps_per_check_point(config.batch_size, config.seq_len),
            "wall_time_s": wall_time,
            "cpu_time_s": cpu_time,
            "final_temperature": float(mask_set.temperature),
            "grad_scale": state.grad_scale,
            "previous_attempts": state.previous_attempts,
        }
    )
    if group.active:  # how the run was executed (not part of its identity: any layout resumes it)
        metrics["data_parallel"] = {"world_size": group.world_size, "sharded_masks": group.sharded}
    subnetwork.metadata["metrics"] = metrics
    history_df = pd.DataFrame(state.history)
    if out_path is not None and group.is_writer:
        subnetwork.save(out_path)
        atomic_write_bytes(out_path / HISTORY_FILE, history_df.to_csv(index=False).encode("utf-8"))
        (out_path / CHECKPOINT_FILE).unlink(missing_ok=True)
        write_manifest(out_path, "search", {**meta, "model_id": state.run["model_id"]})
    group.barrier()  # other ranks go on only once the result is on disk
    return SearchResult(subnetwork, history_df, metrics, config, out_path, mask_set)


def _binary_metrics(
    bridge: TransformerBridge,
    subnetwork: Subnetwork,
    target: Target,
    train_windows: np.ndarray,
    eval_windows,
    config: SearchConfig,
) -> dict:
    """Metrics of the binary subnetwork (held-out windows when given, else training windows)."""
    held_out = eval_windows is not None
    windows = _check_windows(eval_windows, config.seq_len) if held_out else train_windows
    summary = subnetwork.summary()
    metrics = {
        "n_params": summary["n_params"],
        "n_params_total": summary["n_params_total"],
        "percent_params": summary["percent_params"],
        "n_kept": summary["n_kept"],
        "n_entries": summary["n_entries"],
        "density": subnetwork.density,
        "target_loss": _target_loss(bridge, target, windows, subnetwork, config.batch_size, config.eval_batches),
        "metrics_on": "eval" if held_out else "train",
    }
    if target.stats is not None and held_out:
        metrics["bigram_r"] = bigram_correlation(bridge, target.stats, windows, subnetwork)
    return metrics


def _load_finished(
    out_path: Path, config: SearchConfig, grans, target: Target, fingerprint: str
) -> SearchResult | None:
    """The saved result in ``out_path`` if it was made with the same settings, else SearchError."""
    subnetwork = Subnetwork.load(out_path)
    saved = subnetwork.metadata.get("config", {})
    current = config.to_dict()
    changed = _changed_fields(saved, current)
    if (
        changed
        or subnetwork.model_id != fingerprint
        or subnetwork.metadata.get("target") != target.name
        or tuple(subnetwork.metadata.get("granularities", ())) != tuple(grans)
    ):
        raise SearchError(
            f"{out_path} holds a finished run with other settings ({', '.join(changed) or 'model/target'}); "
            "use another out_dir or resume=False"
        )
    history = pd.read_csv(out_path / HISTORY_FILE)
    metrics = dict(subnetwork.metadata.get("metrics", {}))
    if "stability_steps_per_point" not in metrics and "loss" in history:
        # Saved before the check measured points of the paper's tokens: recheck the saved history
        # (the check reads nothing else), and say so.
        metrics["stable"], metrics["stability"] = _stability(history.to_dict("records"), config)
        metrics["stability_steps_per_point"] = steps_per_check_point(config.batch_size, config.seq_len)
        metrics["stability_rechecked"] = True
        subnetwork.metadata["metrics"] = metrics
    return SearchResult(subnetwork, history, metrics, config, out_path)


# --------------------------------------------------------------------------- sweeps


# Columns of a sweep table that a target may select on (``Target.selection_metric``; higher is better).
SELECTION_METRICS = ("bigram_r",)


def sweep(
    bridge: TransformerBridge,
    windows: Integer[np.ndarray, "n seq"],
    target: Target,
    lambdas: Sequence[float],
    granularities: str | Sequence[str] = DEFAULT_GRANULARITIES,
    config: SearchConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    eval_windows: Integer[np.ndarray, "n_eval eval_seq"] | None = None,
    resume: bool = True,
    show_progress: bool = True,
    tolerance: float = 0.04,
    metadata: dict | None = None,
) -> pd.DataFrame:
    """Run :func:`search` for every lambda (each in ``out_dir/lambda_{lam}``; finished ones are
    reused) and return one row per lambda, with a ``chosen`` column from
    :func:`choose_subnetwork` on the target's ``selection_metric`` (none: no run is chosen).
    Writes ``out_dir/sweep.csv``."""
    config = config or SearchConfig()
    if not lambdas:
        raise SearchError("give at least one lambda")
    metric = target.selection_metric
    if metric is not None and metric not in SELECTION_METRICS:
        raise SearchError(
            f"target {target.name!r} selects on {metric!r}, which a sweep does not record; "
            f"use one of {', '.join(SELECTION_METRICS)} or None"
        )
    rows = []
    for lam in tqdm(list(lambdas), desc="lambda sweep", unit="lambda", disable=not show_progress or len(lambdas) < 2):
        run_dir = RunDir(out_dir).lambda_run(lam).path if out_dir is not None else None
        result = search(
            bridge,
            windows,
            target,
            granularities,
            dataclasses.replace(config, lam=float(lam)),
            run_dir,
            eval_windows=eval_windows,
            resume=resume,
            show_progress=show_progress,
            metadata=metadata,
        )
        m = result.metrics
        rows.append(
            {
                "lambda": float(lam),
                "n_params": m["n_params"],
                "percent_params": m["percent_params"],
                "density": m["density"],
                "bigram_r": m.get("bigram_r", float("nan")),
                "target_loss": m["target_loss"],
                "steps": m["steps"],
                "stop_reason": m["stop_reason"],
                "stable": m["stable"],
                "attempts": m["attempts"],
                "wall_time_s": m["wall_time_s"],
                "cpu_time_s": m.get("cpu_time_s"),
                "path": str(run_dir) if run_dir is not None else "",
            }
        )
    table = pd.DataFrame(rows)
    table["chosen"] = False
    if metric is not None and table[metric].notna().any():
        chosen = choose_subnetwork(table, tolerance=tolerance, metric=metric)
        table.loc[chosen.name, "chosen"] = True
    if out_dir is not None and current_group().is_writer:
        atomic_write_bytes(Path(out_dir) / SWEEP_FILE, table.to_csv(index=False).encode("utf-8"))
        write_manifest(
            out_dir,
            "sweep",
            {
                "lambdas": [float(x) for x in lambdas],
                "target": target.name,
                "granularities": list(parse_granularities(granularities)),
                "config": config.to_dict(),
                "tolerance": tolerance,
                "metadata": metadata or {},
            },
        )
    return table


def choose_subnetwork(table: pd.DataFrame, tolerance: float = 0.04, metric: str = "bigram_r") -> pd.Series:
    """The paper's choice: the sparsest lambda whose ``metric`` is within ``tolerance`` of the
    lambda = 0 run (if the sweep has no lambda 0, of its best run)."""
    chosen = sparsest_within(table, metric, "n_params", tolerance)
    if chosen is None:
        raise SearchError(f"no run of the sweep has a {metric}; pass eval_windows and a bigram target")
    return chosen


# --------------------------------------------------------------------------- CLI entry
