"""``bigram-circuits build-up``: circuits built on a run's bigram subnetwork.

The experiment's orchestration lives here: :class:`BuildUpConfig` (its sizes),
:func:`find_candidates` (candidates from three methods on the full model),
:func:`candidates_from_tables` (the same candidates read back from its tables) and
:func:`build_up_experiment` (the build-up of
:func:`~bigram_circuits.circuits.buildup.build_up` on every base and task, then
:func:`~bigram_circuits.circuits.overlap.circuit_overlap` and
:func:`~bigram_circuits.circuits.overlap.circuit_placement`), and the command that loads the
model and bases and writes the tables and figure.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import Candidate
from bigram_circuits.circuits.buildup import (
    CONDITIONS,
    build_up,
    build_up_report,
    recovered_fraction,
    summarize_build_up,
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
from bigram_circuits.circuits.overlap import circuit_overlap, circuit_placement
from bigram_circuits.circuits.tasks import NameCopyingTask, RepetitionTask
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import ConfigError, MaskError

__all__ = [
    "BuildUpConfig",
    "build_up_command",
    "build_up_experiment",
    "candidates_from_tables",
    "find_candidates",
    "make_task",
    "save_build_up",
]


UNITS = ("heads", "heads_mlps")  # what a candidate adds to the base (BuildUpConfig.unit)


@dataclass(frozen=True)
class BuildUpConfig:
    """Sizes of :func:`build_up_experiment` (defaults suit SmolLM2-135M on 2 CPU cores)."""

    tasks: tuple[str, ...] = ("repetition", "names")  # repetition (in-context repetition), names (name copying)
    top_k: int = 5  # heads per candidate of every method
    n_previous: int = 3  # previous-token heads joined to the induction heads
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the random-head controls
    seq_len: int = 24  # repetition: length of each copy
    n_sequences: int = 16  # repetition: prompts
    low: int = 0  # repetition: smallest random token id
    n_score_sequences: int = 16  # head scores: repeated sequences (seq_len tokens per copy)
    n_prompts: int = 24  # names: prompts
    n_attribution: int = 8  # prompt pairs for attribution patching
    n_patching: int = 8  # prompt pairs for activation patching (one forward per head)
    wide_k: int = 0  # also the top wide_k heads by attribution patching (0: off)
    # what each candidate adds to the base: heads (its heads' weights), or heads_mlps (its heads
    # and every MLP neuron of their layers; the random controls then add as many random neurons)
    unit: str = "heads"
    batch_size: int = 8  # sequences per batch
    necessity: bool = True  # full - candidate rows
    n_random_overlap: int = 10_000  # random pairs for the overlap null
    seed: int = 0  # seed of the task sequences

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
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {', '.join(UNITS)}; got {self.unit!r}")
        if self.wide_k < 0:
            raise ConfigError(f"wide_k must be >= 0, got {self.wide_k}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be >= 2")


def make_task(
    name: str, tokenizer: Any, vocab_size: int, config: BuildUpConfig | None = None
) -> RepetitionTask | NameCopyingTask:
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
    activation patching. With ``config.unit="heads_mlps"`` each candidate adds its heads and
    the whole MLP of every layer they are in (:meth:`Candidate.with_layer_mlps`); the overlap and
    placement stay those of the heads. Returns the tables of :func:`find_candidates` and ``build_up`` (one
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
    added = per_task
    if config.unit == "heads_mlps":
        added = {
            task: {name: candidate.with_layer_mlps(bridge) for name, candidate in named.items()}
            for task, named in per_task.items()
        }
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
                added[name],
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


def save_build_up(tables: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike) -> list[Path]:
    """Write every table as CSV + Markdown under ``out_dir`` (atomic writes); return the paths."""
    from bigram_circuits.io import ensure_output_dir
    from bigram_circuits.tables import write_tables

    ensure_output_dir(out_dir)
    return write_tables(tables, out_dir)


def build_up_command(
    model: str = "default",  # the model the base was found on
    base: str | os.PathLike = "",  # a `find` run (its chosen lambda) or a subnetwork directory
    out: str | os.PathLike | None = None,  # write tables (CSV + Markdown) and the figure here
    *,
    optimal: str | os.PathLike | None = None,  # an optimal-subnetwork run to compare as a second base
    config: BuildUpConfig | None = None,
    device: str | torch.device = "cpu",
    png: bool = True,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """``bigram-circuits build-up``: the build-up experiment on a run's chosen subnetwork
    (``base``, a ``find`` run or subnetwork directory) and optionally an optimal subnetwork;
    writes the tables and ``build_up.html``/``.png`` under ``out`` when given."""
    from bigram_circuits.circuits.runs import subnetwork_dir_of
    from bigram_circuits.models import load_model
    from bigram_circuits.subnetwork import Subnetwork

    device = resolve_device(device)  # once, before any work
    if not base:
        raise ConfigError("pass --base RUN_DIR: a `bigram-circuits find` run or subnetwork directory")
    if out is not None:
        from bigram_circuits.io import ensure_output_dir

        ensure_output_dir(out)
    bases = {"bigram": Subnetwork.load(subnetwork_dir_of(base))}
    if optimal is not None:
        bases["optimal"] = Subnetwork.load(subnetwork_dir_of(optimal))
    bridge, tokenizer = load_model(model, device=device)
    tables = build_up_experiment(bridge, tokenizer, bases, config or BuildUpConfig(), progress=progress)
    if out is not None:
        from bigram_circuits.plots import fig_build_up, save_figure

        save_build_up(tables, out)
        save_figure(fig_build_up(tables["build_up_summary"]), Path(out) / "build_up", png=png)
    return tables
