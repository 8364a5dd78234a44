"""The real-model study: a bigram subnetwork of one model (SmolLM2-135M by default) end to end.

:func:`run_study` loads the model and its tokenizer (``load_model``); tokenises the corpus's
train/eval splits; loads or counts the bigram statistics of the train split
(:meth:`RunDir.bigram_stats <bigram_circuits.rundir.RunDir.bigram_stats>`, cached in
``OUT/bigram_stats.npz``); measures the full model's bigram r on the eval windows; runs a short,
resumable lambda sweep (:func:`bigram_circuits.search.sweep`, one ``OUT/lambda_*`` sub-run per
lambda); then for the chosen subnetwork its r, size in the paper's unit (attention + MLP weight
entries, i.e. non-embedding weight matrices), layer distribution and an ablation comparison
(bigram subnetwork ablated vs a random subnetwork of the same shape ablated) with sample
generations; an optimal subnetwork (target: the full model's own distribution, in
``OUT/optimal``) at ``optimal_lambda`` and its overlap with the bigram subnetwork of the same
lambda (exact null); the linear-lens rotation (Fig 3) and covariance similarity (Fig 4) of full,
bigram and random; and the figures (under ``figures``). It returns the result as a
JSON-ready dict; :func:`render_markdown` turns that dict into the study's report.
``benchmarks/smollm2_study.py`` is its command line and writes both files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bigram_circuits.app.options import Option, arguments, nested_options, options_of
from bigram_circuits.app.stages import StageCache
from bigram_circuits.devices import input_device, resolve_device
from bigram_circuits.io import ensure_output_dir
from bigram_circuits.plots import fig1_r_vs_params, fig3_rotation, fig4_similarity, fig_layer_distribution, save_figure
from bigram_circuits.rundir import RunDir
from bigram_circuits.search import SearchConfig
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.tables import TABLE2_CONDITIONS, from_search_sweep, to_markdown

__all__ = [
    "PAPER_NOTE",
    "PAPER_ROWS",
    "StudyConfig",
    "circuits_summary",
    "layer_summary",
    "render_markdown",
    "run_control",
    "run_study",
    "study_options",
]

# Chang & Bergen (2025), /work/shared/paper.md: bigram r of the chosen subnetwork vs the full model.
PAPER_ROWS = [
    {"model": "Pythia 160M (paper)", "full_model_r": 0.69, "subnetwork_r": 0.964},
    {"model": "GPT-2 small (paper)", "full_model_r": 0.624, "subnetwork_r": 0.979},
]
PAPER_NOTE = (
    "paper: chosen subnetworks ~1M weights (<0.2% of non-embedding parameters), "
    "concentrated in the first MLP layer (layer 0)"
)


# The study's sizes, on top of the named schedule its searches start from.
_STUDY_SEARCH = {
    "max_steps": 350,
    "lr": None,
    "max_attempts": 1,
    "batch_size": 8,
    "seq_len": 128,
    "time_budget_s": 1500.0,
    "checkpoint_every": 10,
    "eval_batches": 2,
}
# The search settings that are options of the study script, in their order.
_SEARCH_OPTIONS = (*_STUDY_SEARCH, "temperature_growth", "init")


@dataclass(frozen=True)
class StudyConfig:
    """Settings of :func:`run_study`, sized for SmolLM2-135M at weight masks on CPU.

    The search is far shorter than the paper's (up to 15k steps): the result says whether it
    converged. Running again with the same ``out`` resumes the sweep from its checkpoints.
    Relative paths are relative to the working directory.
    """

    model: str = "smollm2"  # any load_model name (e.g. default for a quick check)
    label: str = "SmolLM2-135M"  # the model's name in tables and figures
    corpus: str = "default"  # any load_token_dataset name or text file
    granularity: str = "weight"  # mask unit(s), comma-separated: weight (the paper's) or neuron,head
    lambdas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)  # sparsity weights of the bigram sweep
    # named search schedule (search.SCHEDULES: default, fast, paper, settle, warm_settle, slow): the search settings
    # the study does not size (temperature_growth, init, ...) are its
    schedule: str = "default"
    seeds: tuple[int, ...] = (1, 2)  # more seeds of the chosen lambda (the sweep is seed 0); empty: none
    optimal_lambda: float | None = None  # lambda of the optimal subnetwork (default: the chosen one; negative: skip)
    random_controls: int = 3  # random same-shape subnetworks in the ablation (one per seed)
    # searches at the chosen lambda beside the real one (OUT/controls/NAME): random_init,
    # random_init_trained_embeddings, permuted_contexts, permuted_vocab; "none" for none
    controls: tuple[str, ...] = ("random_init", "random_init_trained_embeddings", "permuted_contexts")
    linear_map_steps: int = 300  # steps of Table 2's embeddings + linear map baseline
    partial_seeds: tuple[int, ...] = (0, 1)  # draws per fraction of the partial ablation
    # Every search of the study; None: the named ``schedule`` with the study's sizes on top (the config
    # `bigram-circuits find --schedule` makes from the same options, so runs made by find in ``out`` are
    # reused). Its batch_size and seq_len also size the evaluation's batches and windows.
    search: SearchConfig | None = field(default=None, metadata=nested_options(_SEARCH_OPTIONS), hash=False)
    prompts: tuple[str, ...] = ("The President of the United States", "The city is located in")  # generation prompts
    generation_tokens: int = 20  # tokens per sample generation
    train_windows: int = 1024  # training windows of the search
    eval_windows: int = 32  # held-out windows for r, the ablation and the circuits
    analysis_tokens: int = 8192  # held-out tokens for the linear lens (Fig 3) and layer similarity (Fig 4)
    threads: int = 2  # torch CPU threads
    device: str = "cpu"  # cpu, cuda, cuda:N or auto, resolved once before any work (devices.resolve_device)
    out: Path = Path("runs/smollm2")  # run directory of the sweep (resumable) and the optimal search
    results: Path = Path("benchmarks/results/smollm2_study")  # report path without suffix (.json and .md)
    figures: Path = Path("figures/smollm2")  # folder for the figures (PNG when Chromium is available, HTML always)

    def __post_init__(self) -> None:
        if self.search is None:
            object.__setattr__(self, "search", SearchConfig.named(self.schedule, **_STUDY_SEARCH))


def study_options() -> list[Option]:
    """The command-line options of :class:`StudyConfig` (``benchmarks/smollm2_study.py``): its
    fields and its search settings, flattened; a search setting the study does not size defaults
    to the schedule's."""
    scheduled = {f"search.{name}" for name in _SEARCH_OPTIONS if name not in _STUDY_SEARCH}
    return [
        dataclasses.replace(option, help=f"{option.help} (default: the schedule's)")
        if option.dest in scheduled
        else option
        for option in options_of(StudyConfig)
    ]


# Settings that do not change any analysis of the study (where it writes, how fast, which controls),
# or only by float rounding (the device: OUT's searches are reused whatever device made them).
_NOT_IN_STAGE_KEY = {"controls", "threads", "device", "out", "results", "figures"}
_NOT_IN_STAGE_KEY_SEARCH = {"lam", "time_budget_s", "checkpoint_every", "log_every", "recompute_masked_weights"}


def _stage_key(config: StudyConfig, model_identity: str) -> dict:
    """What every cached stage of the study depends on besides the runs it names."""
    settings = {f.name: getattr(config, f.name) for f in fields(StudyConfig) if f.name not in _NOT_IN_STAGE_KEY}
    search = settings.pop("search").to_dict()
    settings["search"] = {name: value for name, value in search.items() if name not in _NOT_IN_STAGE_KEY_SEARCH}
    return {"model_id": model_identity, "study": settings}


def _run_identity(row) -> dict:
    """A finished search as its sweep row identifies it (a rerun search differs in one of these)."""
    keys = ("lambda", "n_params", "bigram_r", "target_loss", "steps", "path")
    return {key: (row[key].item() if isinstance(row[key], np.generic) else row[key]) for key in keys if key in row}


def _tag(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:10]


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records"))


def _command_line(config: StudyConfig) -> str:
    """The script invocation of ``config``: its options that differ from the defaults (a search
    setting: from its schedule's)."""
    base = dataclasses.replace(StudyConfig(schedule=config.schedule), schedule=StudyConfig.schedule)
    return " ".join(["python benchmarks/smollm2_study.py", *arguments(config, base, study_options(), lists="spaces")])


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
        "top_blocks": [
            {
                "layer": int(r.layer),
                "block": r.block,
                "kept_params": int(r.kept_params),
                "share_of_subnetwork": float(r.share_of_subnetwork),
                "fraction_kept": float(r.fraction_kept),
            }
            for r in top.itertuples()
        ],
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
            "rotation_to_input_deg": {
                int(layer): float(part.get(("input", layer), float("nan"))) for layer in (0, 1, 2)
            },
            "rotation_to_output_layer1_deg": float(part.get(("output", 1), float("nan"))),
            "similarity_layer0_vs_later": float(values[0, 1:].mean()),
            "similarity_among_later_layers": float(later.mean()),
        }
    return summary


def render_markdown(result: dict, sweep_table: pd.DataFrame | None = None, ablation: pd.DataFrame | None = None) -> str:
    """The study's Markdown report from :func:`run_study`'s result; ``sweep_table`` and
    ``ablation`` default to the result's ``sweep`` and ``ablation`` records."""
    sweep_table = pd.DataFrame(result["sweep"]) if sweep_table is None else sweep_table
    ablation = pd.DataFrame(result["ablation"]) if ablation is None else ablation
    chosen = result["chosen"]
    comparison = pd.DataFrame(
        PAPER_ROWS
        + [
            {
                "model": f"{result['label']} (this run)",
                "full_model_r": result["full_model"]["r_dropped"],
                "subnetwork_r": chosen["r_dropped"],
            }
        ]
    )
    lines = [
        f"# {result['label']} bigram subnetwork ({' + '.join(result['granularities'])} masks, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        (
            f"Search wall time {sum(row['wall_time_s'] for row in result['sweep']):.0f} s in all (each lambda's "
            f"time, also over resumed runs); this invocation {result['wall_time_s']:.0f} s; "
            f"{result['torch_threads']} CPU threads; "
            f"{result['n_train_windows']} train / {result['n_eval_windows']} eval windows "
            f"of {result['seq_len']} tokens."
        ),
        "",
        "## Bigram r: paper vs this run",
        "",
        to_markdown(comparison, floatfmt=".3f"),
        "",
        PAPER_NOTE,
        "",
        "## Sweep",
        "",
        to_markdown(sweep_table.drop(columns=["path"], errors="ignore")),
        "",
        f"Converged: {result['converged']} (stop reasons: {', '.join(map(str, sweep_table['stop_reason']))}).",
        "",
        *(
            [
                (
                    f"Noise ceiling: r {result['noise_ceiling_r']:.3f} between the bigram surprisals of two tables "
                    f"counted on random halves of the training split ({result['noise_ceiling']['half_windows']:,} "
                    f"windows each), on the same held-out tokens; "
                    f"{100 * result['noise_ceiling']['unseen_share']:.1f}% of held-out tokens have no bigram in "
                    "the whole split. Full model r "
                    f"{result['full_model']['r_dropped']:.3f}."
                ),
                "",
            ]
            if "noise_ceiling_r" in result
            else []
        ),
        *(
            [
                f"## Chosen lambda over {result['seeds_summary']['n_seeds']} seeds",
                "",
                to_markdown(pd.DataFrame(result["seeds"]).drop(columns=["path"], errors="ignore")),
                "",
                (
                    f"r {result['seeds_summary']['bigram_r_mean']:.3f} ± {result['seeds_summary']['bigram_r_sd']:.3f}"
                    f" at {result['seeds_summary']['percent_params_mean']:.2f} ± "
                    f"{result['seeds_summary']['percent_params_sd']:.2f}% (mean ± sd); all stable: "
                    f"{result['seeds_summary']['all_stable']}."
                ),
                "",
            ]
            if result.get("seeds")
            else []
        ),
        "## Chosen subnetwork",
        "",
        (
            f"lambda {chosen['lambda']:g}: {chosen['n_params']:,} weights = {chosen['percent_params']:.3f}% of the "
            f"{chosen['n_params_total']:,} attention + MLP weights (non-embedding); bigram r {chosen['r_dropped']:.3f} "
            f"(full model {result['full_model']['r_dropped']:.3f}).  "
        ),
        (
            f"Plurality layer {chosen['layers']['plurality_layer']} "
            f"({100 * chosen['layers']['plurality_layer_share']:.1f}% of kept weights); MLP share "
            f"{100 * chosen['layers']['mlp_share']:.1f}%, attention {100 * chosen['layers']['attn_share']:.1f}%; "
            f"MLP layer 0 holds {100 * chosen['layers']['mlp_layer0_share']:.1f}%."
        ),
        "",
        "## Ablation",
        "",
        to_markdown(ablation[["condition", "active_params", "lm_loss_nats", "loss_increase", "r_dropped", "n_tokens"]]),
        "",
        f"Loss increase ratio (bigram ablated / random ablated): {result['loss_increase_ratio']:.3g}",
        "",
        "## Generations (temperature 1, same seed per condition)",
        "",
        to_markdown(pd.DataFrame(result["generations"])[["prompt", "condition", "generation"]]),
        "",
        *(
            [
                "## Overlap with the optimal subnetwork",
                "",
                (
                    f"Bigram and optimal subnetworks at lambda {result['optimal']['lambda']:g} (optimal: "
                    f"{result['optimal']['n_params']:,} weights, r with the full model's surprisal "
                    f"{result['optimal']['r_model']:.3f}, bigram r {result['optimal']['r_bigram']:.3f})."
                ),
                "",
                to_markdown(pd.DataFrame(result["overlap"]), floatfmt=".4g"),
                "",
            ]
            if result.get("optimal")
            else []
        ),
        *_controls_markdown(result),
        "## Where each lambda's subnetwork sits",
        "",
        to_markdown(
            pd.DataFrame(result["sweep_layers"]).rename(
                columns={
                    "layer0_share": "share in layer 0",
                    "mlp0_share": "share in MLP 0",
                    "mlp_share": "share in MLPs",
                    "mlp0_fraction_kept": "MLP 0 kept (fraction of its units)",
                    "mlp_mean_fraction_kept": "MLPs kept (mean over layers)",
                }
            ),
            floatfmt=".3g",
        ),
        "",
        f"## Circuits ({result['analysis_tokens']:,} held-out tokens)",
        "",
        to_markdown(
            pd.DataFrame(
                [
                    {
                        "run": run,
                        "to input, layer 1 (deg)": c["rotation_to_input_deg"][1],
                        "to input, layer 2 (deg)": c["rotation_to_input_deg"][2],
                        "to output, layer 1 (deg)": c["rotation_to_output_layer1_deg"],
                        "similarity layer 0 vs later": c["similarity_layer0_vs_later"],
                        "similarity among layers >= 1": c["similarity_among_later_layers"],
                    }
                    for run, c in result["circuits"].items()
                ]
            ),
            floatfmt=".3g",
        ),
        "",
        "Figures: " + ", ".join(f"`{p}`" for p in result["figures"] if p.endswith(".png")),
        "",
    ]
    return "\n".join(lines)


def _controls_markdown(result: dict) -> list[str]:
    """Table 2 and the controls sections of the report (empty for results made before them)."""
    if "table2" not in result:
        return []
    controls = result["controls"]
    lines = [
        "## Table 2: bigram r of the subnetwork and its baselines",
        "",
        to_markdown(pd.DataFrame(result["table2"]), floatfmt=".4g"),
        "",
        "## Faithfulness controls",
        "",
        "The chosen lambda searched with the same schedule under each control (r of a permuted target is",
        "against the permuted table):",
        "",
        to_markdown(pd.DataFrame(controls["searches"]).drop(columns=["path"], errors="ignore"), floatfmt=".4g"),
        "",
    ]
    partial = pd.DataFrame(controls["partial_ablation"])
    if len(partial):
        summary = (
            partial.groupby(["condition", "fraction"])[["loss_increase", "r_dropped"]]
            .agg(["mean", "std"])
            .reset_index()
        )
        summary.columns = [" ".join(c for c in col if c).replace(" mean", "") for col in summary.columns]
        lines += [
            "Partial ablation: a random fraction of the bigram subnetwork removed from the full model, beside",
            "the same fraction of a random same-shape subnetwork "
            f"(mean and sd over {partial['seed'].nunique()} draws):",
            "",
            to_markdown(summary, floatfmt=".4g"),
            "",
        ]
    if controls["seed_overlap"]:
        lines += [
            "Seed-to-seed overlap of the chosen lambda's subnetworks (exact null):",
            "",
            to_markdown(
                pd.DataFrame(controls["seed_overlap"])[["pair", "n_overlap", "expected", "ratio", "frac_a_in_b"]],
                floatfmt=".4g",
            ),
            "",
        ]
    return lines


def _sweep_row(row: pd.Series) -> dict:
    """The JSON-ready fields of one sweep row that a seed table reports."""
    keys = (
        "lambda",
        "n_params",
        "percent_params",
        "bigram_r",
        "steps",
        "stop_reason",
        "stable",
        "stability",
        "cpu_time_s",
        "path",
    )
    return json.loads(pd.Series({k: row[k] for k in keys if k in row.index}).to_json())


def _seeds_summary(rows: list[dict]) -> dict:
    """Mean and sample sd over seeds of the chosen lambda's r and size (sd NaN with one seed)."""
    frame = pd.DataFrame(rows)
    out: dict = {"n_seeds": len(frame), "all_stable": bool(frame["stable"].all())}
    for column in ("bigram_r", "percent_params", "n_params"):
        values = frame[column].astype(float)
        out[f"{column}_mean"] = float(values.mean())
        out[f"{column}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return out


CONTROL_SEARCHES = ("random_init", "random_init_trained_embeddings", "permuted_contexts", "permuted_vocab")
CONTROL_LABELS = {
    "random_init": TABLE2_CONDITIONS["random_init"],
    "random_init_trained_embeddings": TABLE2_CONDITIONS["random_init_trained_embeddings"],
    "permuted_contexts": "permuted contexts (r against the permuted table)",
    "permuted_vocab": "permuted vocabulary (r against the permuted table)",
}


def _control_names(config: StudyConfig) -> tuple[str, ...]:
    names = tuple(name for name in config.controls if name != "none")
    unknown = sorted(set(names) - set(CONTROL_SEARCHES))
    if unknown:
        from bigram_circuits.errors import ConfigError

        raise ConfigError(f"unknown control {unknown[0]!r}; use {', '.join(CONTROL_SEARCHES)} or none")
    return names


def control_searches(
    config: StudyConfig, bridge, stats, train_windows, eval_windows, lam: float, out: Path, show_progress: bool
) -> list[dict]:
    """The chosen lambda searched under each of ``config.controls`` (``OUT/controls/NAME``, the
    layout of ``bigram-circuits find --out OUT/controls/NAME``, so a run made there is reused):
    the real bigram target in the same architecture freshly initialised (``load_model(...,
    random_init=0)``), with the trained embeddings copied in, or the trained model with the
    bigram table permuted across contexts or within rows (r against the permuted table)."""
    from bigram_circuits.baselines import transplant_embeddings
    from bigram_circuits.masks import parse_granularities
    from bigram_circuits.models import load_model
    from bigram_circuits.search import Target, sweep

    rows = []
    for name in _control_names(config):
        model = bridge
        if name.startswith("random_init"):
            model, _ = load_model(config.model, random_init=0, device=input_device(bridge))
            if name == "random_init_trained_embeddings":
                transplant_embeddings(model, bridge)
        target = Target.from_name(name if name.startswith("permuted_") else "bigram", stats=stats)
        table = sweep(
            model,
            train_windows,
            target,
            [lam],
            parse_granularities(config.granularity.split(",")),
            config.search,
            out / "controls" / name,
            eval_windows=eval_windows,
            show_progress=show_progress,
            metadata={"model": config.model, "corpus": config.corpus, "control": name},
        )
        rows.append({"control": name, "condition": CONTROL_LABELS[name], **_sweep_row(table.iloc[0])})
        del model
    return rows


@dataclass
class _Inputs:
    bridge: object
    tokenizer: object
    vocab: int
    train: object
    stats: object
    run: RunDir
    train_windows: np.ndarray
    eval_windows: np.ndarray


def _study_inputs(config: StudyConfig, device: torch.device, show_progress: bool) -> _Inputs:
    """The model, its tokenizer, the bigram statistics (``OUT/bigram_stats.npz``, the file
    ``bigram-circuits find`` uses, so reruns reuse it) and the study's windows."""
    from bigram_circuits.data import load_token_dataset
    from bigram_circuits.models import load_model, model_vocab_size

    bridge, tokenizer = load_model(config.model, device=device)
    vocab = model_vocab_size(bridge, tokenizer)
    train = load_token_dataset(config.corpus, tokenizer, split="train", show_progress=show_progress)
    evaluation = load_token_dataset(config.corpus, tokenizer, split="eval", show_progress=show_progress)
    run = RunDir(ensure_output_dir(config.out))
    seq_len = config.search.seq_len
    stats = run.bigram_stats(tokenizer, config.corpus, seq_len, vocab, train=train, show_progress=show_progress)
    return _Inputs(
        bridge,
        tokenizer,
        vocab,
        train,
        stats,
        run,
        train.windows(seq_len, config.train_windows),
        evaluation.windows(seq_len, config.eval_windows),
    )


def run_control(config: StudyConfig, name: str, *, show_progress: bool = True) -> dict:
    """One control search of the study on its own (``OUT/controls/NAME``), at the lambda the
    finished sweep in ``OUT`` chose: for running the study's searches side by side, one process
    each; :func:`run_study` then reuses the result. Returns its row."""
    from bigram_circuits.errors import ConfigError
    from bigram_circuits.search import SWEEP_FILE

    _control_names(dataclasses.replace(config, controls=(name,)))
    device = resolve_device(config.device)  # once, before any work
    sweep_file = Path(config.out) / SWEEP_FILE
    if not sweep_file.exists():
        raise ConfigError(f"{sweep_file} does not exist; run the sweep first (bigram-circuits find --out {config.out})")
    table = pd.read_csv(sweep_file)
    if not table["chosen"].any():
        raise ConfigError(f"{sweep_file} has no chosen lambda; rerun the sweep with every lambda of the study")
    lam = float(table.loc[table["chosen"], "lambda"].iloc[0])
    torch.set_num_threads(config.threads)
    inputs = _study_inputs(config, device, show_progress)
    config = dataclasses.replace(config, controls=(name,))
    windows = (inputs.train_windows, inputs.eval_windows)
    rows = control_searches(config, inputs.bridge, inputs.stats, *windows, lam, inputs.run.path, show_progress)
    return rows[0]


def run_study(config: StudyConfig, *, show_progress: bool = True) -> dict:
    """Run the study of ``config`` (see the module docstring) and return its result, a
    JSON-ready dict: settings, full-model metrics, the sweep, the chosen subnetwork (size, r,
    layers), ablation, generations, the optimal subnetwork and its overlap (None when
    ``optimal_lambda`` < 0), per-lambda layer shares, circuits, figure paths, timings and the
    machine. Writes the run directory ``config.out`` and the figures, not the report:
    ``benchmarks/smollm2_study.py`` writes ``result`` as JSON and :func:`render_markdown` text.
    ``result["command"]`` is the script invocation of ``config`` (its non-default options).
    Sets torch's thread count (``config.threads``) and seeds torch with 0."""
    from bigram_circuits.circuits.lens import lens_report
    from bigram_circuits.circuits.overlap import overlap_table
    from bigram_circuits.circuits.similarity import similarity_report
    from bigram_circuits.evaluate import (
        ablation_table,
        evaluate_metrics,
        generate_table,
        generation_conditions,
        metrics_from_surprisals,
        noise_ceiling,
        pearson_r,
        token_surprisals,
    )
    from bigram_circuits.masks import parse_granularities
    from bigram_circuits.models import model_id
    from bigram_circuits.search import Target, sweep

    _control_names(config)  # a typo fails now, not after the sweep
    device = resolve_device(config.device)  # once, before any work
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    lambdas = [float(lam) for lam in config.lambdas]
    granularities = parse_granularities(config.granularity.split(","))
    search_config = config.search
    batch_size = search_config.batch_size  # of the evaluation too

    t = time.perf_counter()
    inputs = _study_inputs(config, device, show_progress)
    bridge, tokenizer, vocab, stats = inputs.bridge, inputs.tokenizer, inputs.vocab, inputs.stats
    train, run, train_windows, eval_windows = inputs.train, inputs.run, inputs.train_windows, inputs.eval_windows
    timings["load_s"] = time.perf_counter() - t

    # Every analysis below is a cached stage (OUT/study_stages/<digest of the study's inputs>):
    # a rerun, e.g. after one more control search, recomputes only what is missing or changed.
    cache = StageCache.keyed(run.path / "study_stages", _stage_key(config, model_id(bridge)))
    full = cache.json(
        "full_model",
        lambda: {
            k: float(v)
            for k, v in evaluate_metrics(
                bridge, stats, eval_windows, batch_size=batch_size, show_progress=show_progress
            ).items()
        },
    )
    # What r a bigram table from half the training text reaches against the other half's: the
    # ceiling each subnetwork's r is held against.
    ceiling = cache.json(
        "noise_ceiling", lambda: noise_ceiling(train.windows(search_config.seq_len), eval_windows, vocab, seed=0)
    )
    if show_progress:
        print(
            f"full model: r={full['r_dropped']:.4f} loss={full['lm_loss_nats']:.4f}; "
            f"noise ceiling r={ceiling['r_dropped']:.4f}",
            flush=True,
        )

    t = time.perf_counter()
    table = sweep(
        bridge,
        train_windows,
        Target.bigram(stats),
        lambdas,
        granularities,
        search_config,
        run.path,
        eval_windows=eval_windows,
        show_progress=show_progress,
        metadata={
            "model": config.model,
            "corpus": config.corpus,
            "n_train_windows": len(train_windows),
            "n_eval_windows": len(eval_windows),
        },
    )
    timings["sweep_s"] = time.perf_counter() - t
    if show_progress:
        print(table.to_string(), flush=True)

    chosen_row = table[table["chosen"]].iloc[0]
    chosen_lambda = float(chosen_row["lambda"])
    subnetwork = Subnetwork.load(run.subnetwork_dir())
    summary = subnetwork.summary()
    chosen_tag = _tag(_run_identity(chosen_row))  # stages of the chosen subnetwork are named by it

    # The chosen lambda again with other seeds (OUT/seed_N/lambda_*, as `find --seeds` lays them out).
    t = time.perf_counter()
    seed_rows = [{"seed": search_config.seed, **_sweep_row(chosen_row)}]
    for seed in config.seeds:
        seed_table = sweep(
            bridge,
            train_windows,
            Target.bigram(stats),
            [chosen_lambda],
            granularities,
            dataclasses.replace(search_config, seed=int(seed)),
            run.path / f"seed_{seed}",
            eval_windows=eval_windows,
            show_progress=show_progress,
            metadata={"model": config.model, "corpus": config.corpus, "seed": int(seed)},
        )
        seed_rows.append({"seed": int(seed), **_sweep_row(seed_table.iloc[0])})
    timings["seeds_s"] = time.perf_counter() - t

    layers = layer_summary(subnetwork)

    def compute_ablation() -> dict:
        table = ablation_table(
            bridge,
            stats,
            eval_windows,
            subnetwork,
            seeds=tuple(range(config.random_controls)),
            batch_size=batch_size,
            show_progress=show_progress,
        )
        return {"rows": _records(table), "loss_increase_ratio": float(table.attrs["loss_increase_ratio"])}

    ablation_stage = cache.json(f"ablation_{chosen_tag}", compute_ablation)
    ablation = pd.DataFrame(ablation_stage["rows"])
    by_condition = ablation.set_index("condition")

    def compute_generations() -> list[dict]:
        conditions = generation_conditions(subnetwork, random_seed=0)
        return _records(
            pd.concat(
                [
                    generate_table(
                        bridge,
                        tokenizer,
                        prompt,
                        conditions,
                        temperature=1.0,
                        max_new_tokens=config.generation_tokens,
                        seed=0,
                    )
                    for prompt in config.prompts
                ],
                ignore_index=True,
            )
        )

    generations = cache.json(f"generations_{chosen_tag}", compute_generations)

    # The optimal subnetwork (target: the full model) at one lambda, and its overlap with the
    # bigram subnetwork of the same lambda (the paper's Table 3).
    optimal, overlap = None, None
    if config.optimal_lambda is None or config.optimal_lambda >= 0:
        lam = chosen_lambda if config.optimal_lambda is None else float(config.optimal_lambda)
        optimal_run = RunDir(run).optimal_run()
        t = time.perf_counter()
        optimal_table = sweep(
            bridge,
            train_windows,
            Target.full_model(vocab),
            [lam],
            granularities,
            search_config,
            optimal_run.path,
            eval_windows=eval_windows,
            show_progress=show_progress,
            metadata={"model": config.model, "corpus": config.corpus, "target": "full_model"},
        )
        timings["optimal_search_s"] = time.perf_counter() - t
        optimal_row = optimal_table.iloc[0]
        paired = bool((table["lambda"] == lam).any())  # else the chosen bigram subnetwork
        paired_row = table[table["lambda"] == lam].iloc[0] if paired else chosen_row

        def compute_optimal() -> dict:
            optimal_sub = Subnetwork.load(optimal_run.optimal_subnetwork_dir(prefer_lambda=lam))
            paired_sub = Subnetwork.load(run.lambda_run(lam).path) if paired else subnetwork
            full_s = token_surprisals(bridge, stats, eval_windows, show_progress=False)
            opt_s = token_surprisals(bridge, stats, eval_windows, optimal_sub, show_progress=False)
            optimal = {
                "lambda": lam,
                "n_params": int(optimal_row["n_params"]),
                "percent_params": float(optimal_row["percent_params"]),
                "steps": int(optimal_row["steps"]),
                "stop_reason": str(optimal_row["stop_reason"]),
                "wall_time_s": float(optimal_row["wall_time_s"]),
                "r_model": pearson_r(opt_s.model, full_s.model),
                "r_bigram": float(metrics_from_surprisals(opt_s)["r_dropped"]),
                "paired_bigram_lambda": lam if paired else float(chosen_row["lambda"]),
            }
            overlap = overlap_table(
                {f"bigram vs optimal (lambda {lam:g})": (paired_sub, optimal_sub)}, n_random=10_000, seed=0
            )
            return {"optimal": optimal, "overlap": _records(overlap)}

        optimal_tag = _tag([_run_identity(optimal_row), _run_identity(paired_row)])
        optimal_stage = cache.json(f"optimal_overlap_{optimal_tag}", compute_optimal)
        optimal, overlap = optimal_stage["optimal"], optimal_stage["overlap"]

    # Table 2 and the faithfulness controls: can the same search fit a random model or a
    # nonsense target as well, and how much do the embeddings alone explain?
    from bigram_circuits.baselines import LinearMapConfig, fit_linear_map
    from bigram_circuits.circuits.ablation import partial_ablation_table
    from bigram_circuits.search import bigram_correlation

    t = time.perf_counter()
    controls = control_searches(
        config, bridge, stats, train_windows, eval_windows, chosen_lambda, run.path, show_progress
    )
    timings["control_searches_s"] = time.perf_counter() - t

    def compute_baselines() -> dict:
        empty = Subnetwork.empty(bridge, granularities)
        linear_map = fit_linear_map(
            bridge,
            stats,
            train_windows,
            LinearMapConfig(steps=config.linear_map_steps, batch_size=batch_size, seed=0),
            show_progress=show_progress,
        )
        return {
            "empty_r": bigram_correlation(bridge, stats, eval_windows, empty, batch_size=batch_size),
            "linear_map_r": float(linear_map.evaluate(bridge, stats, eval_windows)["r_dropped"]),
        }

    baselines = cache.json("table2_baselines", compute_baselines)
    table2 = [
        {"condition": TABLE2_CONDITIONS["full_model"], "r": float(full["r_dropped"]), "percent_params": 100.0},
        {
            "condition": TABLE2_CONDITIONS["subnetwork"],
            "r": float(chosen_row["bigram_r"]),
            "percent_params": summary["percent_params"],
        },
        *(
            {"condition": row["condition"], "r": row["bigram_r"], "percent_params": row["percent_params"]}
            for row in controls
            if row["control"].startswith("random_init")
        ),
        {"condition": TABLE2_CONDITIONS["empty"], "r": baselines["empty_r"], "percent_params": 0.0},
        {"condition": TABLE2_CONDITIONS["linear_map"], "r": baselines["linear_map_r"], "percent_params": 0.0},
    ]
    partial = cache.json(
        f"partial_ablation_{chosen_tag}",
        lambda: _records(
            partial_ablation_table(
                bridge,
                stats,
                eval_windows,
                subnetwork,
                seeds=config.partial_seeds,
                batch_size=batch_size,
                show_progress=show_progress,
            )
        ),
    )
    seed_subs = {int(row["seed"]): Subnetwork.load(row["path"]) for row in seed_rows if row.get("path")}
    seed_pairs = {
        f"seed {a} vs seed {b}": (seed_subs[a], seed_subs[b])
        for i, a in enumerate(sorted(seed_subs))
        for b in sorted(seed_subs)[i + 1 :]
    }
    seed_overlap = (
        cache.json(
            f"seed_overlap_{_tag([_run_identity(row) for row in seed_rows])}",
            lambda: _records(overlap_table(seed_pairs, n_random=10_000, seed=0)),
        )
        if seed_pairs
        else []
    )

    # Fig 3 / Fig 4: full model, the chosen bigram subnetwork, a random same-shape one.
    runs = {"full": None, "bigram": subnetwork, "random": subnetwork.random_control(0)}
    lens = cache.frame(
        f"lens_{chosen_tag}",
        lambda: lens_report(
            bridge, tokenizer, eval_windows, runs, n_tokens=config.analysis_tokens, progress=show_progress
        ),
    )
    similarity = cache.frames(
        f"similarity_{chosen_tag}",
        tuple(runs),
        lambda: similarity_report(bridge, eval_windows, runs, n_tokens=config.analysis_tokens, progress=show_progress),
    )
    circuits = circuits_summary(lens, similarity)

    figures_dir = ensure_output_dir(config.figures)
    label = config.label
    figures = {
        "fig1_r_vs_params": fig1_r_vs_params(from_search_sweep(table, label), {label: full["r_dropped"]}),
        "fig3_rotation": fig3_rotation(lens),
        "fig4_similarity": fig4_similarity(similarity),
    }
    sweep_layers = []
    for row in table.to_dict("records"):  # where each lambda's subnetwork sits (sparser: more in layer 0?)
        lam, n_params, r = float(row["lambda"]), int(row["n_params"]), float(row["bigram_r"])
        swept = Subnetwork.load(run.lambda_run(lam).path)
        summary_row = layer_summary(swept)
        dist = swept.layer_distribution()
        mlp = dist[dist["block"] == "mlp"].set_index("layer")["fraction_kept"]
        sweep_layers.append(
            {
                "lambda": lam,
                "n_params": n_params,
                "bigram_r": r,
                "layer0_share": float(summary_row["per_layer_kept_params"].get(0, 0) / max(n_params, 1)),
                "mlp0_share": summary_row["mlp_layer0_share"],
                "mlp_share": summary_row["mlp_share"],
                "mlp0_fraction_kept": float(mlp.get(0, float("nan"))),
                "mlp_mean_fraction_kept": float(mlp.mean()),
            }
        )
        figures[f"layer_distribution_lambda_{lam:g}"] = fig_layer_distribution(
            dist, f"{label} bigram subnetwork, lambda {lam:g} (r {r:.3f})"
        )
    figure_paths = [
        str(path)
        for name, figure in figures.items()
        for path in save_figure(figure, figures_dir / name, include_plotlyjs="directory")
    ]

    return {
        "model": config.model,
        "label": config.label,
        "model_id": model_id(bridge),
        "granularities": list(granularities),
        "command": _command_line(config),
        "corpus": config.corpus,
        "vocab_size": vocab,
        "seq_len": search_config.seq_len,
        "n_train_windows": len(train_windows),
        "n_eval_windows": len(eval_windows),
        "config": search_config.to_dict(),
        "lambdas": lambdas,
        "full_model": {k: float(v) for k, v in full.items()},
        "sweep": json.loads(table.to_json(orient="records")),
        "converged": bool((table["stop_reason"] == "converged").all()),
        "all_stable": bool(table["stable"].all()),
        "schedule": config.schedule,
        "noise_ceiling_r": float(ceiling["r_dropped"]),
        "noise_ceiling": ceiling,
        "seeds": seed_rows,
        "seeds_summary": _seeds_summary(seed_rows),
        "chosen": {
            "lambda": float(chosen_row["lambda"]),
            "steps": int(chosen_row["steps"]),
            "stop_reason": str(chosen_row["stop_reason"]),
            "n_params": summary["n_params"],
            "n_params_total": summary["n_params_total"],
            "percent_params": summary["percent_params"],
            "n_kept": summary["n_kept"],
            "n_entries": summary["n_entries"],
            "r_dropped": float(by_condition.loc["bigram only", "r_dropped"]),
            "lm_loss_nats": float(by_condition.loc["bigram only", "lm_loss_nats"]),
            "layers": layers,
        },
        "ablation": ablation_stage["rows"],
        "loss_increase_ratio": ablation_stage["loss_increase_ratio"],
        "generations": generations,
        "optimal": optimal,
        "overlap": overlap,
        "table2": table2,
        "controls": {
            "searches": controls,
            "partial_ablation": partial,
            "seed_overlap": seed_overlap,
        },
        "sweep_layers": sweep_layers,
        "circuits": circuits,
        "analysis_tokens": config.analysis_tokens,
        "figures": figure_paths,
        "paper": {"rows": PAPER_ROWS, "note": PAPER_NOTE},
        # Each cached stage's time when it was computed (this run, or the one that cached it).
        "timings_s": {**timings, **{f"{name}_s": seconds for name, seconds in cache.seconds.items()}},
        "wall_time_s": time.perf_counter() - started,
        "torch_threads": config.threads,
        "device": str(device),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
