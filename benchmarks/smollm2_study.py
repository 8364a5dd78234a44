"""Bigram subnetwork of SmolLM2-135M (LLaMA-style, 30 layers) at weight masks (the paper's unit) on CPU.

    python benchmarks/smollm2_study.py --lambdas 0 1 10 --max-steps 350 --batch-size 8 --seq-len 64 \
        --time-budget-s 1500 --out runs/smollm2_weight

``--granularity neuron,head`` runs the coarser neuron + head masks instead.

Steps: load SmolLM2-135M and its tokenizer (``load_model("smollm2")``); tokenise the default
corpus's train/eval splits; count bigram statistics on the train split; bigram r of the full
model on the eval windows; a short, resumable lambda sweep (``bigram_circuits.search.sweep``,
checkpoints under ``--out``); then for the chosen subnetwork its r, size in the paper's unit
(attention + MLP weight entries, i.e. non-embedding weight matrices), layer distribution and an
ablation comparison (bigram subnetwork ablated vs a random subnetwork of the same shape ablated)
with sample generations; an optimal subnetwork (target: the full model's own distribution) at
``--optimal-lambda`` and its overlap with the bigram subnetwork of the same lambda (exact null);
the linear-lens rotation (Fig 3) and covariance similarity (Fig 4) of full, bigram and random.

Writes ``benchmarks/results/smollm2_study.json`` and ``.md``. The search is far shorter than the
paper's (up to 15k steps): the result says whether it converged. Re-running with the same
``--out`` resumes the sweep from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.circuits.lens import lens_report
from bigram_circuits.circuits.overlap import overlap_table
from bigram_circuits.circuits.similarity import similarity_report
from bigram_circuits.data import load_token_dataset
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.evaluate import (
    ablation_table,
    evaluate_metrics,
    generate_table,
    generation_conditions,
    metrics_from_surprisals,
    pearson_r,
    token_surprisals,
)
from bigram_circuits.plots import fig1_r_vs_params, fig3_rotation, fig4_similarity, fig_layer_distribution, save_figure
from bigram_circuits.tables import from_search_sweep, to_markdown
from bigram_circuits.masks import parse_granularities
from bigram_circuits.models import load_model, model_id, model_vocab_size
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, sweep
from bigram_circuits.subnetwork import Subnetwork

# Chang & Bergen (2025), /work/shared/paper.md: bigram r of the chosen subnetwork vs the full model.
PAPER_ROWS = [
    {"model": "Pythia 160M (paper)", "full_model_r": 0.69, "subnetwork_r": 0.964},
    {"model": "GPT-2 small (paper)", "full_model_r": 0.624, "subnetwork_r": 0.979},
]
PAPER_NOTE = ("paper: chosen subnetworks ~1M weights (<0.2% of non-embedding parameters), "
              "concentrated in the first MLP layer (layer 0)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="any load_model name (e.g. default for a quick check)")
    parser.add_argument("--label", default="SmolLM2-135M", help="the model's name in tables and figures")
    parser.add_argument("--corpus", default="default", help="any load_token_dataset name or text file")
    parser.add_argument("--granularity", default="weight",
                        help="mask unit(s), comma-separated: weight (the paper's) or neuron,head")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    parser.add_argument("--optimal-lambda", type=float, default=10.0,
                        help="lambda of the optimal subnetwork compared with the bigram one (negative: skip)")
    parser.add_argument("--max-steps", type=int, default=350)
    parser.add_argument("--lr", type=float, default=SearchConfig.lr,
                        help="mask learning rate (default: per granularity, weight 0.01)")
    parser.add_argument("--max-attempts", type=int, default=1,
                        help="stability retries (a retry restarts the search, so the default reports "
                        "stability without retrying inside the time budget)")
    parser.add_argument("--prompts", nargs="+",
                        default=["The President of the United States", "The city is located in"])
    parser.add_argument("--generation-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-windows", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--time-budget-s", type=float, default=1500.0, help="search time per lambda")
    parser.add_argument("--temperature-growth", type=float, default=SearchConfig.temperature_growth,
                        help="mask temperature factor per step (the paper: 1.001 over up to 15k steps)")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=2, help="batches for each run's target loss")
    parser.add_argument("--analysis-tokens", type=int, default=8192,
                        help="held-out tokens for the linear lens (Fig 3) and layer similarity (Fig 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "smollm2")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "smollm2_study")
    parser.add_argument("--figures", type=Path, default=REPO / "figures" / "smollm2",
                        help="folder for the study's figures (PNG when Chromium is available, HTML always)")
    return parser.parse_args(argv)


def layer_summary(subnetwork: Subnetwork) -> dict:
    """Where the subnetwork's weights sit: plurality layer, MLP vs attention share, top layers."""
    dist = subnetwork.layer_distribution()
    by_layer = dist.groupby("layer")["kept_params"].sum()
    by_block = dist.groupby("block")["kept_params"].sum()
    kept = max(int(by_layer.sum()), 1)
    top = dist.sort_values("kept_params", ascending=False).head(5)
    return {
        "plurality_layer": int(by_layer.idxmax()),
        "plurality_layer_share": float(by_layer.max() / kept),
        "mlp_share": float(by_block.get("mlp", 0) / kept),
        "attn_share": float(by_block.get("attn", 0) / kept),
        "mlp_layer0_share": float(dist.query("layer == 0 and block == 'mlp'")["kept_params"].sum() / kept),
        "top_blocks": [{"layer": int(r.layer), "block": r.block, "kept_params": int(r.kept_params),
                        "share_of_subnetwork": float(r.share_of_subnetwork), "fraction_kept": float(r.fraction_kept)}
                       for r in top.itertuples()],
        "per_layer_kept_params": {int(k): int(v) for k, v in by_layer.items()},
    }


def circuits_summary(lens: pd.DataFrame, similarity: dict[str, pd.DataFrame]) -> dict:
    """Per run: rotation to the input at layers 0-2 (the paper's layer-0 jump), rotation to the
    output at layer 1, and the mean covariance similarity of layer 0 with later layers and
    among layers >= 1 (the paper: near 1 for random subnetworks)."""
    summary = {}
    for run, matrix in similarity.items():
        part = lens[lens["run"] == run].set_index(["target", "layer"])["rotation_deg"]
        values = matrix.to_numpy(dtype=float)
        later = values[1:, 1:][np.triu_indices(values.shape[0] - 1, k=1)]
        summary[run] = {
            "rotation_to_input_deg": {int(layer): float(part.get(("input", layer), float("nan"))) for layer in (0, 1, 2)},
            "rotation_to_output_layer1_deg": float(part.get(("output", 1), float("nan"))),
            "similarity_layer0_vs_later": float(values[0, 1:].mean()),
            "similarity_among_later_layers": float(later.mean()),
        }
    return summary


def render_markdown(result: dict, sweep_table: pd.DataFrame, ablation: pd.DataFrame) -> str:
    chosen = result["chosen"]
    comparison = pd.DataFrame(PAPER_ROWS + [{
        "model": f"{result['label']} (this run)", "full_model_r": result["full_model"]["r_dropped"],
        "subnetwork_r": chosen["r_dropped"]}])
    lines = [
        f"# {result['label']} bigram subnetwork ({' + '.join(result['granularities'])} masks, CPU)", "",
        f"Command: `{result['command']}`  ",
        (f"Search wall time {sum(row['wall_time_s'] for row in result['sweep']):.0f} s in all (each lambda's "
        f"time, also over resumed runs); this invocation {result['wall_time_s']:.0f} s; "
        f"{result['torch_threads']} CPU threads; "
        f"{result['n_train_windows']} train / {result['n_eval_windows']} eval windows of {result['seq_len']} tokens."),
        "",
        "## Bigram r: paper vs this run", "", to_markdown(comparison, floatfmt=".3f"), "", PAPER_NOTE, "",
        "## Sweep", "", to_markdown(sweep_table.drop(columns=["path"], errors="ignore")), "",
        f"Converged: {result['converged']} (stop reasons: {', '.join(map(str, sweep_table['stop_reason']))}).", "",
        "## Chosen subnetwork", "",
        (f"lambda {chosen['lambda']:g}: {chosen['n_params']:,} weights = {chosen['percent_params']:.3f}% of the "
        f"{chosen['n_params_total']:,} attention + MLP weights (non-embedding); bigram r {chosen['r_dropped']:.3f} "
        f"(full model {result['full_model']['r_dropped']:.3f}).  "),
        (f"Plurality layer {chosen['layers']['plurality_layer']} "
        f"({100 * chosen['layers']['plurality_layer_share']:.1f}% of kept weights); MLP share "
        f"{100 * chosen['layers']['mlp_share']:.1f}%, attention {100 * chosen['layers']['attn_share']:.1f}%; "
        f"MLP layer 0 holds {100 * chosen['layers']['mlp_layer0_share']:.1f}%."), "",
        "## Ablation", "", to_markdown(ablation[["condition", "active_params", "lm_loss_nats", "loss_increase",
                                                    "r_dropped", "n_tokens"]]), "",
        f"Loss increase ratio (bigram ablated / random ablated): {result['loss_increase_ratio']:.3g}", "",
        "## Generations (temperature 1, same seed per condition)", "",
        to_markdown(pd.DataFrame(result["generations"])[["prompt", "condition", "generation"]]), "",
        *(["## Overlap with the optimal subnetwork", "",
           (f"Bigram and optimal subnetworks at lambda {result['optimal']['lambda']:g} (optimal: "
           f"{result['optimal']['n_params']:,} weights, r with the full model's surprisal "
           f"{result['optimal']['r_model']:.3f}, bigram r {result['optimal']['r_bigram']:.3f})."), "",
           to_markdown(pd.DataFrame(result["overlap"]), floatfmt=".4g"), ""] if result.get("optimal") else []),
        "## Where each lambda's subnetwork sits", "",
        to_markdown(pd.DataFrame(result["sweep_layers"]).rename(columns={
            "layer0_share": "share in layer 0", "mlp0_share": "share in MLP 0", "mlp_share": "share in MLPs",
            "mlp0_fraction_kept": "MLP 0 kept (fraction of its units)", "mlp_mean_fraction_kept": "MLPs kept (mean over layers)"}),
            floatfmt=".3g"), "",
        f"## Circuits ({result['analysis_tokens']:,} held-out tokens)", "",
        to_markdown(pd.DataFrame([
            {"run": run, "to input, layer 1 (deg)": c["rotation_to_input_deg"][1],
             "to input, layer 2 (deg)": c["rotation_to_input_deg"][2],
             "to output, layer 1 (deg)": c["rotation_to_output_layer1_deg"],
             "similarity layer 0 vs later": c["similarity_layer0_vs_later"],
             "similarity among layers >= 1": c["similarity_among_later_layers"]}
            for run, c in result["circuits"].items()]), floatfmt=".3g"), "",
        "Figures: " + ", ".join(f"`{p}`" for p in result["figures"] if p.endswith(".png")), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    bridge, tokenizer = load_model(args.model)
    vocab = model_vocab_size(bridge, tokenizer)
    train = load_token_dataset(args.corpus, tokenizer, split="train")
    evaluation = load_token_dataset(args.corpus, tokenizer, split="eval")
    timings["load_s"] = time.perf_counter() - t

    args.out.mkdir(parents=True, exist_ok=True)
    stats_path = args.out / "bigram_stats.npz"
    t = time.perf_counter()
    if stats_path.exists():  # same file and layout as `bigram-circuits find`, so reruns reuse it
        stats = BigramStats.load(stats_path, tokenizer=tokenizer)
    else:
        stats = BigramStats.from_tokens(train, vocab, seq_len=args.seq_len)
        stats.save(stats_path, tokenizer=tokenizer)
    timings["bigram_stats_s"] = time.perf_counter() - t

    train_windows = train.windows(args.seq_len, args.train_windows)
    eval_windows = evaluation.windows(args.seq_len, args.eval_windows)

    t = time.perf_counter()
    full = evaluate_metrics(bridge, stats, eval_windows, batch_size=args.batch_size)
    timings["full_model_eval_s"] = time.perf_counter() - t
    print(f"full model: r={full['r_dropped']:.4f} loss={full['lm_loss_nats']:.4f}", flush=True)

    granularities = parse_granularities(args.granularity.split(","))
    config = SearchConfig(max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          checkpoint_every=args.checkpoint_every, time_budget_s=args.time_budget_s,
                          temperature_growth=args.temperature_growth, lr=args.lr,
                          max_attempts=args.max_attempts, eval_batches=args.eval_batches)
    t = time.perf_counter()
    table = sweep(bridge, train_windows, Target.bigram(stats), args.lambdas, granularities, config, args.out,
                  eval_windows=eval_windows,
                  metadata={"model": args.model, "corpus": args.corpus, "n_train_windows": len(train_windows),
                            "n_eval_windows": len(eval_windows)})
    timings["sweep_s"] = time.perf_counter() - t
    print(table.to_string(), flush=True)

    chosen_row = table[table["chosen"]].iloc[0]
    subnetwork = Subnetwork.load(Path(chosen_row["path"]))
    summary = subnetwork.summary()
    t = time.perf_counter()
    layers = layer_summary(subnetwork)
    ablation = ablation_table(bridge, stats, eval_windows, subnetwork, seeds=(0,), batch_size=args.batch_size)
    timings["ablation_s"] = time.perf_counter() - t
    by_condition = ablation.set_index("condition")
    t = time.perf_counter()
    conditions = generation_conditions(subnetwork, random_seed=0)
    generations = pd.concat([generate_table(bridge, tokenizer, prompt, conditions, temperature=1.0,
                                            max_new_tokens=args.generation_tokens, seed=0)
                             for prompt in args.prompts], ignore_index=True)
    timings["generations_s"] = time.perf_counter() - t

    # The optimal subnetwork (target: the full model) at one lambda, and its overlap with the
    # bigram subnetwork of the same lambda (the paper's Table 3).
    optimal, overlap = None, None
    if args.optimal_lambda >= 0:
        t = time.perf_counter()
        optimal_table = sweep(bridge, train_windows, Target.full_model(vocab), [args.optimal_lambda], granularities,
                              config, args.out / "optimal", eval_windows=eval_windows,
                              metadata={"model": args.model, "corpus": args.corpus, "target": "full_model"})
        timings["optimal_search_s"] = time.perf_counter() - t
        optimal_row = optimal_table.iloc[0]
        optimal_sub = Subnetwork.load(Path(optimal_row["path"]))
        paired = table[table["lambda"] == args.optimal_lambda]
        paired_sub = Subnetwork.load(Path(paired["path"].iloc[0])) if len(paired) else subnetwork
        full_s = token_surprisals(bridge, stats, eval_windows, show_progress=False)
        opt_s = token_surprisals(bridge, stats, eval_windows, optimal_sub, show_progress=False)
        optimal = {"lambda": float(args.optimal_lambda), "n_params": int(optimal_row["n_params"]),
                   "percent_params": float(optimal_row["percent_params"]), "steps": int(optimal_row["steps"]),
                   "stop_reason": str(optimal_row["stop_reason"]), "wall_time_s": float(optimal_row["wall_time_s"]),
                   "r_model": pearson_r(opt_s.model, full_s.model),
                   "r_bigram": float(metrics_from_surprisals(opt_s)["r_dropped"]),
                   "paired_bigram_lambda": float(args.optimal_lambda) if len(paired) else float(chosen_row["lambda"])}
        overlap = overlap_table({f"bigram vs optimal (lambda {args.optimal_lambda:g})": (paired_sub, optimal_sub)},
                                n_random=10_000, seed=0)
        timings["overlap_s"] = time.perf_counter() - t - timings["optimal_search_s"]

    # Fig 3 / Fig 4 on SmolLM2: full model, the chosen bigram subnetwork, a random same-shape one.
    t = time.perf_counter()
    runs = {"full": None, "bigram": subnetwork, "random": subnetwork.random_control(0)}
    lens = lens_report(bridge, tokenizer, eval_windows, runs, n_tokens=args.analysis_tokens)
    similarity = similarity_report(bridge, eval_windows, runs, n_tokens=args.analysis_tokens)
    timings["circuits_s"] = time.perf_counter() - t
    circuits = circuits_summary(lens, similarity)

    figure_paths = []
    args.figures.mkdir(parents=True, exist_ok=True)
    label = args.label
    figures = {
        "fig1_r_vs_params": fig1_r_vs_params(from_search_sweep(table, label), {label: full["r_dropped"]}),
        "fig3_rotation": fig3_rotation(lens),
        "fig4_similarity": fig4_similarity(similarity),
    }
    sweep_layers = []
    for row in table.to_dict("records"):  # where each lambda's subnetwork sits (sparser: more in layer 0?)
        lam, n_params, r = float(row["lambda"]), int(row["n_params"]), float(row["bigram_r"])
        swept = Subnetwork.load(Path(row["path"]))
        summary_row = layer_summary(swept)
        dist = swept.layer_distribution()
        mlp = dist[dist["block"] == "mlp"].set_index("layer")["fraction_kept"]
        sweep_layers.append({
            "lambda": lam, "n_params": n_params, "bigram_r": r,
            "layer0_share": float(summary_row["per_layer_kept_params"].get(0, 0) / max(n_params, 1)),
            "mlp0_share": summary_row["mlp_layer0_share"], "mlp_share": summary_row["mlp_share"],
            "mlp0_fraction_kept": float(mlp.get(0, float("nan"))), "mlp_mean_fraction_kept": float(mlp.mean()),
        })
        figures[f"layer_distribution_lambda_{lam:g}"] = fig_layer_distribution(
            dist, f"{label} bigram subnetwork, lambda {lam:g} (r {r:.3f})")
    for name, figure in figures.items():
        figure_paths += [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)
                         for p in save_figure(figure, args.figures / name, include_plotlyjs="directory")]

    result = {
        "model": args.model, "label": args.label, "model_id": model_id(bridge), "granularities": list(granularities),
        "command": "python benchmarks/smollm2_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "corpus": args.corpus, "vocab_size": vocab, "seq_len": args.seq_len,
        "n_train_windows": len(train_windows), "n_eval_windows": len(eval_windows),
        "config": config.to_dict(), "lambdas": args.lambdas,
        "full_model": {k: float(v) for k, v in full.items()},
        "sweep": json.loads(table.to_json(orient="records")),
        "converged": bool((table["stop_reason"] == "converged").all()),
        "chosen": {
            "lambda": float(chosen_row["lambda"]), "steps": int(chosen_row["steps"]),
            "stop_reason": str(chosen_row["stop_reason"]),
            "n_params": summary["n_params"], "n_params_total": summary["n_params_total"],
            "percent_params": summary["percent_params"], "n_kept": summary["n_kept"], "n_entries": summary["n_entries"],
            "r_dropped": float(by_condition.loc["bigram only", "r_dropped"]),
            "lm_loss_nats": float(by_condition.loc["bigram only", "lm_loss_nats"]),
            "layers": layers,
        },
        "ablation": json.loads(ablation.to_json(orient="records")),
        "loss_increase_ratio": float(ablation.attrs["loss_increase_ratio"]),
        "generations": json.loads(generations.to_json(orient="records")),
        "optimal": optimal, "overlap": json.loads(overlap.to_json(orient="records")) if overlap is not None else None,
        "sweep_layers": sweep_layers, "circuits": circuits, "analysis_tokens": args.analysis_tokens, "figures": figure_paths,
        "paper": {"rows": PAPER_ROWS, "note": PAPER_NOTE},
        "timings_s": timings, "wall_time_s": time.perf_counter() - started,
        "torch_threads": args.threads, "device": "cpu", "machine": platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.results.with_suffix(".json"), json.dumps(result, indent=2, default=str).encode("utf-8"))
    atomic_write_bytes(args.results.with_suffix(".md"), render_markdown(result, table, ablation).encode("utf-8"))
    print(json.dumps({k: result[k] for k in ("full_model", "chosen", "loss_increase_ratio", "wall_time_s")},
                     indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
