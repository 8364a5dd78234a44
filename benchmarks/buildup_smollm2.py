"""Circuits built on the bigram base of SmolLM2-135M (issue 15): candidates, build-up, overlap.

    python benchmarks/buildup_smollm2.py                                   # SmolLM2, runs/smollm2_weight
    python benchmarks/buildup_smollm2.py --model default --base runs/default_weight_buildup --label default

For the weight-mask bigram subnetwork (``--base``: a ``bigram-circuits find`` run, its chosen
lambda, or a subnetwork directory) and, side by side, the optimal subnetwork (``--optimal``,
default ``BASE/optimal``: target = the full model's own distribution):

1. candidates from three methods, found on the full model: head scores (induction heads,
   induction + previous-token heads), TransformerLens 4.3's node-level attribution patching
   and activation patching (top-k heads per task), and how much they agree;
2. the build-up on in-context repetition (second-half loss of repeated random tokens) and name
   copying (logit difference answer - repeated name): base, base + candidate, base + random
   heads (3 seeds), full, full - candidate, full - random heads; recovered fraction
   ``(m - m_base) / (m_full - m_base)``;
3. weight-level overlap of each base with each circuit (exact null) and per-layer placement;
4. the figure (base, candidates, full model per behaviour) under ``figures/buildup/``.

Writes ``benchmarks/results/buildup_<label>.json`` and ``.md``. Run with one thread on a shared
machine (``--threads 1``, the default). The candidates depend on the full model only, so
``--candidates-only`` finds them before the bases exist; they are cached in
``--candidates-cache`` (default ``runs/buildup_candidates_<label>.json``) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.app.buildup import (
    BuildUpConfig,
    build_up_experiment,
    find_candidates,
)
from bigram_circuits.app.options import add_options, build, given, options_of
from bigram_circuits.circuits.candidates import (
    ATTRIBUTION_SOURCE,
    transformer_lens_version,
)
from bigram_circuits.errors import MaskError
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.models import load_model, model_id
from bigram_circuits.plots import fig_build_up, save_figure
from bigram_circuits.rundir import RunDir
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.tables import to_markdown


def find_subnetwork(path: Path) -> Path:
    """The subnetwork directory of a run: itself, its chosen lambda, or its only ``lambda_*``."""
    try:
        return RunDir(path).subnetwork_dir()
    except MaskError:
        found = [run.path for run in RunDir(path).lambda_runs() if run.holds_subnetwork()]
        if len(found) == 1:
            return found[0]
        raise


def candidate_settings(config: BuildUpConfig) -> str:
    """The settings the candidates' score tables depend on (top-k cuts are made afterwards)."""
    names = (
        "tasks",
        "seq_len",
        "n_sequences",
        "low",
        "n_score_sequences",
        "n_prompts",
        "n_attribution",
        "n_patching",
        "batch_size",
        "seed",
    )
    return json.dumps({name: getattr(config, name) for name in names})


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def base_summary(label: str, directory: Path, sub: Subnetwork) -> dict:
    metrics = dict(sub.metadata.get("metrics", {}) or {})
    config = dict(sub.metadata.get("config", {}) or {})
    return {
        "label": label,
        "path": str(directory.relative_to(REPO) if directory.is_relative_to(REPO) else directory),
        "target": sub.metadata.get("target"),
        "lambda": config.get("lam"),
        **sub.summary(),
        "bigram_r": metrics.get("bigram_r"),
        "steps": metrics.get("steps"),
        "stop_reason": metrics.get("stop_reason"),
    }


def markdown(tables: dict[str, pd.DataFrame], summary: dict) -> str:
    report = tables["build_up_report"]
    lines = [
        f"# Circuits built on the bigram base: {summary['model']}",
        "",
        (
            f"Model id `{summary['model_id']}`; transformer-lens {summary['transformer_lens']} "
            f"(attribution patching: `{ATTRIBUTION_SOURCE}`). Wall time {summary['wall_s']:.0f} s "
            f"on {summary['machine']['threads']} torch thread(s) ({summary['machine']['note']})."
        ),
        "",
        (
            "Recovered fraction = (m - m_base) / (m_full - m_base): 0 = the base alone, 1 = the full "
            "model (for the loss: share of the full model's loss reduction over the base). Random "
            "heads: as many heads per layer as the candidate, mean (std) over seeds "
            f"{list(summary['config']['seeds'])}. 'full - candidate': recovered fraction left after "
            "zeroing the candidate's heads in the full model."
        ),
        "",
        "## Bases",
        "",
        to_markdown(pd.DataFrame(summary["bases"])),
        "",
        "## Candidates (found on the full model)",
        "",
        to_markdown(tables["candidates"]),
        "",
    ]
    for task in report["task"].unique():
        part = report[report["task"] == task]
        metric = part["metric"].iloc[0]
        lines += [f"## Build-up: {task} ({metric})", ""]
        shown = part.assign(
            random=[f"{m:.3f} ({s:.3f})" for m, s in zip(part["random_recovered"], part["random_recovered_std"])],
        )[
            [
                "base",
                "candidate",
                "heads",
                "base_value",
                "with_candidate",
                "full_value",
                "gap",
                "recovered",
                "random",
                "full_minus_candidate",
                "full_minus_recovered",
            ]
        ]
        lines += [to_markdown(shown, floatfmt=".4g"), ""]
        for base, rows in part.groupby("base", sort=False):
            gap = float(rows["gap"].iloc[0])
            spread = float(rows["random_recovered_std"].abs().max() * abs(gap))
            if abs(gap) < 0.05 * max(abs(float(rows["base_value"].iloc[0])), 1.0) or abs(gap) < spread:
                lines += [
                    (
                        f"Note ({base} base): the full model and the base differ by only {gap:+.4g}, "
                        "less than the random controls' spread or 5% of the value, so the recovered "
                        "fractions of this base are ratios of noise-sized differences."
                    ),
                    "",
                ]
    agreement = tables["agreement"]
    lines += [
        "## Agreement between methods (per task)",
        "",
        to_markdown(agreement[["task", "a", "b", "shared", "jaccard", "shared_heads", "spearman"]]),
        "",
    ]
    overlap = tables["overlap"][
        [
            "base",
            "candidate",
            "heads",
            "circuit_weights",
            "shared_weights",
            "circuit_in_base",
            "expected_circuit_in_base",
            "random_heads_in_base",
            "ratio",
            "p_value_text",
        ]
    ]
    lines += [
        "## Weight-level overlap of each base with each circuit",
        "",
        (
            "circuit_in_base = share of the circuit's weights (its heads' W_Q/W_K/W_V rows and W_O "
            "columns) the base keeps; expected = the base's density in the same matrices (exact "
            "per-matrix null, 10k pairs); random heads = the same share for random heads."
        ),
        "",
        to_markdown(overlap),
        "",
    ]
    placement = tables["placement"]
    placed = placement[placement["heads"] > 0][
        [
            "base",
            "candidate",
            "layer",
            "head_labels",
            "circuit_in_base",
            "base_attn_fraction_kept",
            "base_attn_share",
            "base_mlp_share",
        ]
    ]
    lines += ["## Per-layer placement (layers holding candidate heads)", "", to_markdown(placed), ""]
    timings = tables["timings"]
    lines += ["## Wall times (s)", "", to_markdown(timings), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--base", default=str(REPO / "runs" / "smollm2_weight"))
    parser.add_argument("--optimal", default=None, help="default: BASE/optimal when it exists")
    parser.add_argument("--label", default="smollm2", help="names the results files")
    # BuildUpConfig's options, generated as the CLI's; here 20 wide heads by default (at most a third of
    # the heads), and the head scores use as many sequences as the repetition task.
    sizes = BuildUpConfig(wide_k=20)
    names = ("tasks", "top_k", "n_previous", "seeds", "seq_len", "n_sequences", "n_prompts", "n_attribution")
    helps = {"wide_k": "also the top wide_k heads by attribution patching (0: off; at most a third of the heads)"}
    build_up = add_options(parser, options_of(sizes, (*names, "n_patching", "wide_k", "unit"), helps=helps))
    parser.add_argument(
        "--candidates-cache",
        default=None,
        help="JSON cache of the candidates (default runs/buildup_candidates_<label>.json)",
    )
    parser.add_argument("--candidates-only", action="store_true", help="find and cache the candidates, then stop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="2-core machine shared with a running SmolLM2 search")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--figure-dir", default=str(REPO / "figures" / "buildup"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    cache = Path(args.candidates_cache or REPO / "runs" / f"buildup_candidates_{args.label}.json")
    t0 = time.time()
    bridge, tokenizer = load_model(args.model)
    load_s = time.time() - t0
    n_heads = int(bridge.cfg.n_layers) * int(bridge.cfg.n_heads)
    config = build(sizes, given(args, build_up))
    config = dataclasses.replace(
        config,
        n_score_sequences=config.n_sequences,
        wide_k=min(config.wide_k, n_heads // 3),  # random controls need free heads
    )
    found = None
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored["config"] == candidate_settings(config) and stored["model_id"] == model_id(bridge):
            found = {name: pd.DataFrame(rows) for name, rows in stored["tables"].items()}
            print(f"candidates from {cache}", flush=True)
    if found is None:
        found = find_candidates(bridge, tokenizer, config, progress=True)
        payload = {
            "config": candidate_settings(config),
            "model_id": model_id(bridge),
            "tables": {k: records(v) for k, v in found.items()},
        }
        atomic_write_bytes(cache, json.dumps(payload).encode("utf-8"))
        print(f"candidates cached in {cache}", flush=True)
    if args.candidates_only:
        print(found["candidates"].to_string(index=False))
        print(found["candidate_timings"].to_string(index=False))
        return 0

    base_dir = find_subnetwork(Path(args.base))
    bases = {"bigram": Subnetwork.load(base_dir)}
    directories = {"bigram": base_dir}
    optimal = Path(args.optimal) if args.optimal else RunDir(args.base).optimal_run().path
    if optimal.exists():
        directories["optimal"] = find_subnetwork(optimal)
        bases["optimal"] = Subnetwork.load(directories["optimal"])
    elif args.optimal:
        raise SystemExit(f"error: no optimal subnetwork at {optimal}")
    print(f"bases: {', '.join(f'{k} = {v}' for k, v in directories.items())}", flush=True)
    tables = build_up_experiment(bridge, tokenizer, bases, config, found=found, progress=True)
    wall = time.time() - started
    tables["timings"] = pd.concat(
        [
            pd.DataFrame([{"step": "load_model_s", "seconds": load_s}]),
            tables["timings"],
            pd.DataFrame([{"step": "script_wall_s", "seconds": wall}]),
        ],
        ignore_index=True,
    )

    summary = {
        "model": args.model,
        "model_id": model_id(bridge),
        "transformer_lens": transformer_lens_version(),
        "attribution_source": ATTRIBUTION_SOURCE,
        "bases": [base_summary(label, directories[label], sub) for label, sub in bases.items()],
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()},
        "wall_s": wall,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": args.note,
        },
        "recovered_fraction": "(m - m_base) / (m_full - m_base)",
    }
    summary["tables"] = {name: records(frame) for name, frame in tables.items()}
    results = Path(args.results_dir)
    atomic_write_bytes(results / f"buildup_{args.label}.json", json.dumps(summary, indent=1).encode("utf-8"))
    atomic_write_bytes(results / f"buildup_{args.label}.md", markdown(tables, summary).encode("utf-8"))
    figure = fig_build_up(tables["build_up_summary"], title=f"Circuits built on the base subnetwork ({args.model})")
    written = save_figure(figure, Path(args.figure_dir) / f"build_up_{args.label}")

    pd.set_option("display.width", 220)
    print(tables["candidates"].to_string(index=False))
    print(tables["build_up_report"].round(3).to_string(index=False))
    print(tables["agreement"].round(3).to_string(index=False))
    print(tables["overlap"].round(4).to_string(index=False))
    print(f"wrote {results}/buildup_{args.label}.{{json,md}} and {', '.join(map(str, written))} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
