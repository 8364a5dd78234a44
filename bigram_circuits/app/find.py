"""``bigram-circuits find``: a lambda sweep of subnetwork searches on a model and corpus, one
run directory per seed, each with its chosen subnetwork."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from collections.abc import Sequence

import pandas as pd
import torch

from bigram_circuits.devices import resolve_device
from bigram_circuits.distributed import current as current_group
from bigram_circuits.errors import SearchError
from bigram_circuits.io import atomic_write_bytes, ensure_output_dir, run_directory_lock
from bigram_circuits.manifest import write_manifest
from bigram_circuits.masks import DEFAULT_GRANULARITIES, parse_granularities
from bigram_circuits.rundir import RunDir
from bigram_circuits.search import SearchConfig, Target, sweep
from bigram_circuits.targets import target_spec

__all__ = ["find_command", "seeds_summary"]


def find_command(
    model: str = "default",
    granularities: str | Sequence[str] = DEFAULT_GRANULARITIES,
    lambdas: Sequence[float] = (0.0, 1.0, 10.0, 100.0),  # comma-separated sparsity weights
    out_dir: str | os.PathLike = "runs/find",
    *,
    corpus: str = "default",
    target: str = "bigram",
    seeds: Sequence[int] = (0,),  # comma-separated seeds; several seeds run the sweep once per seed (OUT/seed_N)
    # the paper's schedule for weight masks (SearchConfig.paper(): lr 5e-5, T x1.001, batch 32, 15k steps);
    # other options given override it
    paper: bool = False,
    # a named schedule (search.SCHEDULES): default, fast, paper, settle, warm_settle, slow; other options
    # given override it
    schedule: str = "default",
    max_train_windows: int | None = 4096,  # training windows (of seq_len tokens)
    max_eval_windows: int | None = 256,  # held-out windows for r and the target loss
    device: str | torch.device = "cpu",
    resume: bool = True,  # reuse finished runs and continue interrupted ones in the output directory
    show_progress: bool = True,
    **config_options,
) -> pd.DataFrame:
    """``bigram-circuits find``: load the model and the corpus's train/eval splits, count bigram
    stats on the train split when the target needs them (cached in ``out_dir/bigram_stats.npz``;
    :class:`~bigram_circuits.targets.TargetSpec` ``needs_stats``), run the lambda sweep
    (resumable), save each subnetwork under ``out_dir/lambda_{lam}`` plus ``out_dir/sweep.csv``
    and return the sweep table. ``config_options`` are :class:`SearchConfig` fields;
    ``schedule`` names the schedule the config starts from (:meth:`SearchConfig.named`;
    ``paper=True`` is ``schedule="paper"``).

    With several ``seeds`` the sweep runs once per seed in ``out_dir/seed_{s}`` (sharing the
    bigram stats) and the returned table has one row per (seed, lambda); ``out_dir/seeds.csv``
    holds mean and sample std over seeds per lambda (``seeds_summary``).

    ``target`` is any registered target name (:func:`bigram_circuits.targets.register_target`).
    ``target="permuted_contexts"`` or ``"permuted_vocab"`` (``:SEED`` appended picks another
    permutation) searches against the bigram table permuted by :meth:`BigramStats.permuted`, the
    faithfulness control; each run's ``bigram_r`` is then measured against that permuted table.
    """
    from bigram_circuits.data import load_token_dataset
    from bigram_circuits.models import load_model, model_vocab_size

    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(config_options) - known)
    if unknown:
        # The closest valid names, not the whole list: SearchConfig has too many fields for one line.
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3, cutoff=0.5)})
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SearchError(
            f"unknown search option(s) {unknown}; {hint}"
            "the options are SearchConfig's fields (bigram-circuits find --help)"
        )
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SearchError(f"seeds must be distinct integers, at least one; got {seeds}")
    if "seed" in config_options:
        raise SearchError("pass seeds=[...] (CLI: --seeds), not seed")
    config = SearchConfig.named("paper" if paper else schedule, **config_options)
    try:  # every lambda's config is checked before the model and corpus are loaded
        for lam in lambdas:
            dataclasses.replace(config, lam=float(lam))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SearchError):
            raise
        raise SearchError(f"lambdas must be numbers >= 0, got {list(lambdas)!r}") from exc
    if not lambdas:
        raise SearchError("give at least one lambda")
    parse_granularities(granularities)
    spec = target_spec(target)  # an unknown target is one line before the model and corpus load
    device = resolve_device(device)  # once, rank-aware; an impossible device is one line before any output
    out_path = ensure_output_dir(out_dir)
    run = RunDir(out_path)
    # One writer per run directory: a second `find` on it fails with one line (rank 0 holds it).
    with run_directory_lock(out_path) if current_group().is_writer else contextlib.nullcontext(out_path):
        bridge, tokenizer = load_model(model, device=device)
        vocab = model_vocab_size(bridge, tokenizer)
        train = load_token_dataset(corpus, tokenizer, split="train", show_progress=show_progress)
        evaluation = load_token_dataset(corpus, tokenizer, split="eval", show_progress=show_progress)
        # Counted only for a target that needs them: the sweep's bigram_r is measured against the
        # target's own stats (Target.stats), so a target without them reports no r and nothing
        # else here reads the table; evaluate and lens count them on demand (RunDir.bigram_stats).
        stats = (
            run.bigram_stats(
                tokenizer,
                corpus,
                config.seq_len,
                vocab,
                train=train,
                save=current_group().is_writer,
                show_progress=show_progress,
            )
            if spec.needs_stats
            else None
        )
        train_windows = train.windows(config.seq_len, max_train_windows)
        eval_windows = evaluation.windows(config.seq_len, max_eval_windows)
        the_target = Target.from_name(target, stats=stats, vocab_size=vocab)
        meta = {
            "corpus": corpus,
            "n_train_windows": len(train_windows),
            "n_eval_windows": len(eval_windows),
            "model": str(model),
        }
        tables = []
        for seed in seeds:
            # One seed keeps the single-run layout; several get a folder each.
            seed_path = out_path if len(seeds) == 1 else ensure_output_dir(run.seed_run(seed).path)
            table = sweep(
                bridge,
                train_windows,
                the_target,
                [float(x) for x in lambdas],
                granularities,
                dataclasses.replace(config, seed=seed),
                seed_path,
                eval_windows=eval_windows,
                resume=resume,
                show_progress=show_progress,
                metadata=meta,
            )
            tables.append(table.assign(seed=seed))
        table = pd.concat(tables, ignore_index=True) if len(seeds) > 1 else tables[0]
        if not current_group().is_writer:  # data-parallel: rank 0 writes the summaries
            return table
        summary = {
            "model": str(model),
            "granularities": list(parse_granularities(granularities)),
            "target": target,
            "corpus": corpus,
            "seeds": seeds,
        }
        if len(seeds) > 1:
            by_seed = seeds_summary(table)
            atomic_write_bytes(out_path / RunDir.SEEDS, by_seed.to_csv(index=False).encode("utf-8"))
            summary["seeds_summary"] = by_seed.to_dict("records")
        if table["chosen"].any():
            summary["chosen"] = table[table["chosen"]].iloc[0].to_dict()
        atomic_write_bytes(out_path / RunDir.FIND, json.dumps(summary, indent=2, default=str).encode("utf-8"))
        write_manifest(
            out_path,
            "find",
            {
                **summary,
                "lambdas": [float(x) for x in lambdas],
                "config": config.to_dict(),
                "max_train_windows": max_train_windows,
                "max_eval_windows": max_eval_windows,
                "device": str(device),
                "paper_schedule": paper,
                "schedule": "paper" if paper else schedule,
            },
        )
        return table


def seeds_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds, per lambda, of a sweep table with a ``seed`` column:
    weights kept, percent kept, bigram r, steps, wall time, and how often it was chosen."""
    if "seed" not in table.columns:
        raise SearchError("seeds_summary needs a sweep table with a seed column (find with several seeds)")
    rows = []
    for lam, group in table.groupby("lambda", sort=True):
        row: dict[str, float | int] = {"lambda": float(lam), "n_seeds": len(group)}
        for column in ("n_params", "percent_params", "bigram_r", "steps", "wall_time_s"):
            values = group[column].astype(float)
            row[f"{column}_mean"] = float(values.mean())
            row[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        row["converged"] = int((group["stop_reason"] == "converged").sum())
        row["chosen"] = int(group["chosen"].sum())
        rows.append(row)
    return pd.DataFrame(rows)
