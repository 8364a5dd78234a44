"""The paper pipeline: compute every result behind the paper's figures and tables for one
model, cache each on disk, draw the figures (:mod:`bigram_circuits.plots`) and write the tables
(:mod:`bigram_circuits.tables`). ``bigram-circuits figures`` runs :func:`figures_command`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from bigram_circuits.app.options import nested_options
from bigram_circuits.app.stages import StageCache
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import ConfigError
from bigram_circuits.io import atomic_write_bytes, ensure_output_dir
from bigram_circuits.masks import DEFAULT_GRANULARITIES
from bigram_circuits.plots import (
    fig1_r_vs_params,
    fig2_training_dynamics,
    fig3_rotation,
    fig4_similarity,
    fig5_optimal,
    fig_controls,
    fig_layer_distribution,
    human_count,
    save_figure,
)
from bigram_circuits.rundir import RunDir
from bigram_circuits.search import SearchConfig
from bigram_circuits.tables import (
    PAPER_FIG1,
    TABLE2_CONDITIONS,
    from_search_sweep,
    interpolate_r,
    table1_chosen,
    table2_bigram_r,
    table3_overlap,
    table4_generations,
    table_controls,
    table_controls_partial,
    table_fig1,
    table_headline,
    write_tables,
)

__all__ = ["FiguresConfig", "figures_command"]

_log = logging.getLogger(__name__)


# The search settings that are options of `bigram-circuits figures` (the others are SearchConfig's defaults).
_SEARCH_OPTIONS = ("seq_len", "batch_size", "max_steps", "temperature_growth", "lr")


@dataclass(frozen=True)
class FiguresConfig:
    """Settings of :func:`figures_command`, sized for the default model on 2 CPU cores.

    The paper's searches are weight masks over 10k steps of 32 x 128 tokens with the
    temperature growing 0.1% per step. Here masks are also single weights (``granularities``;
    ``("neuron", "head")`` draws the coarser masks), but batches are 8 x 64 tokens (a bigram
    target needs no long context) and the temperature grows 4% per step, so a mask is decided
    in about 150-250 steps (at most ``max_steps``). The chosen lambda's bigram subnetwork is
    searched again with every seed of ``headline_seeds``, and the headline numbers (size, r,
    ablation ratio, overlap with the optimal subnetwork) are reported as mean and sample std
    over those seeds. Fig 2 uses at most ``max_checkpoints`` training checkpoints (evenly
    spaced, first and last included) plus the final model, and estimates r at
    ``target_fractions`` of the maskable parameters. Table 2's "embeddings + linear map"
    baseline trains its map for ``linear_map_steps`` steps.
    """

    corpus: str = "default"
    granularities: tuple[str, ...] = DEFAULT_GRANULARITIES
    # every search's settings (its lam is each run's, its seed is ``seed``)
    search: SearchConfig = field(
        default_factory=lambda: SearchConfig(
            max_steps=300, batch_size=8, seq_len=64, temperature_growth=1.04, checkpoint_every=25, eval_batches=2
        ),
        metadata=nested_options(_SEARCH_OPTIONS),
        hash=False,  # SearchConfig is mutable; the other fields hash a frozen config
    )
    headline_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the chosen lambda's searches behind the headline numbers
    bigram_lambdas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)  # lambdas of the bigram sweep (Fig 1, Table 1)
    optimal_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0)  # lambdas of the optimal-subnetwork sweep (Fig 5)
    checkpoint_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0)  # lambdas of the other sweeps (Fig 2, controls)
    max_checkpoints: int = 3  # training checkpoints of Fig 2 (evenly spaced, first and last included)
    target_fractions: tuple[float, ...] = (0.02, 0.05, 0.2)  # shares of the maskable parameters where Fig 2 reads r
    train_windows: int = 2048  # training windows of the searches
    eval_windows: int = 256  # held-out windows for r
    analysis_seq_len: int = 128  # tokens per window of the analyses and the bigram statistics
    analysis_tokens: int = 32768  # held-out tokens for the linear lens (Fig 3) and similarity (Fig 4)
    ablation_windows: int = 64  # held-out windows (of analysis_seq_len tokens) of the ablations
    random_seeds: tuple[int, ...] = (0, 1, 2)  # random same-shape subnetworks of the ablations (one per seed)
    overlap_samples: int = 10_000  # random pairs for the overlap null
    prompts: tuple[str, ...] = ("The President of the United States", "The city is located in")
    generation_tokens: int = 20  # tokens per generation (Table 4)
    generation_temperature: float = 1.0  # sampling temperature of the generations
    linear_map_steps: int = 300  # steps of Table 2's embeddings + linear map baseline
    seed: int = 0  # seed of the searches, random controls, overlap nulls and generations

    def search_config(self) -> SearchConfig:
        """The :class:`~bigram_circuits.search.SearchConfig` of every search (lambda set per run)."""
        return replace(self.search, seed=self.seed)

    def key(self) -> str:
        """A short hash of every setting (results of other settings live in other cache folders).
        The search settings that were this config's own fields before it nested ``search`` are
        hashed flat, as then, so the caches made then are still found."""
        settings = asdict(self)
        search, default = settings.pop("search"), asdict(type(self)().search)
        settings.update({name: search[name] for name in _SEARCH_OPTIONS})
        changed = {
            name: value
            for name, value in search.items()
            if name not in (*_SEARCH_OPTIONS, "lam", "seed") and value != default[name]
        }
        if changed:
            settings["search"] = changed
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _model_fingerprint(model: str) -> str:
    """A short hash of the model's files (weights and checkpoints), or of its name for hub models."""
    from bigram_circuits.models import resolve_source

    source = resolve_source(model)
    digest = hashlib.sha256(f"{source.kind}|{source.label}".encode())
    location = Path(source.location)
    files = (
        [location]
        if location.is_file()
        else sorted(
            p for p in location.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".gguf")
        )
    )
    for path in files:
        # Name, size and modification time: a retrained model gets a new cache without hashing GBs.
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.strip("/\\").split("/")[-1])[:40] or "model"


def _evenly_spaced(values: Sequence[int], count: int) -> list[int]:
    if len(values) <= count:
        return list(values)
    picks = np.unique(np.linspace(0, len(values) - 1, count).round().astype(int))
    return [values[i] for i in picks]


class _FigureRun:
    """Results of one model under one FiguresConfig, computed on first use and cached on disk.

    Every result is a CSV/JSON file under ``root``; searches keep their own resumable folders
    there. The model, data and bigram statistics are loaded only when something is missing,
    so a fully cached run only redraws.
    """

    def __init__(self, model: str, config: FiguresConfig, root: Path, device: torch.device, show_progress: bool):
        self.model, self.config, self.root = model, config, root
        self.device, self.show_progress = device, show_progress
        self._loaded: dict | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(root)
        settings = {"model": model, "config": asdict(config)}
        atomic_write_bytes(root / "settings.json", json.dumps(settings, indent=2).encode("utf-8"))

    # -- cache helpers

    def _frame(self, name: str, compute, *, index: bool = False) -> pd.DataFrame:
        return self.cache.frame(name, compute, index=index)

    # -- model and data (loaded lazily, once)

    @property
    def loaded(self) -> dict:
        if self._loaded is None:
            from bigram_circuits.data import load_token_dataset
            from bigram_circuits.models import load_model, model_vocab_size

            cfg = self.config
            bridge, tokenizer = load_model(self.model, device=self.device)
            vocab = model_vocab_size(bridge, tokenizer)
            train = load_token_dataset(cfg.corpus, tokenizer, split="train", show_progress=self.show_progress)
            held_out = load_token_dataset(cfg.corpus, tokenizer, split="eval", show_progress=self.show_progress)
            # Counted once in windows of analysis_seq_len tokens, then read back (ROOT/bigram_stats.npz).
            stats = RunDir(self.root).bigram_stats(
                tokenizer, cfg.corpus, cfg.analysis_seq_len, vocab, train=train, show_progress=False
            )
            n_analysis = math.ceil(cfg.analysis_tokens / cfg.analysis_seq_len)
            self._loaded = {
                "bridge": bridge,
                "tokenizer": tokenizer,
                "vocab": vocab,
                "stats": stats,
                "train": train.windows(cfg.search.seq_len, cfg.train_windows),
                "eval": held_out.windows(cfg.search.seq_len, cfg.eval_windows),
                "analysis": held_out.windows(cfg.analysis_seq_len, n_analysis),
                "ablation": held_out.windows(cfg.analysis_seq_len, cfg.ablation_windows),
            }
        return self._loaded

    def _sweep(
        self, bridge, target_name: str, lambdas, folder: str, seed: int | None = None, granularities=None
    ) -> pd.DataFrame:
        from bigram_circuits.search import Target, sweep

        data = self.loaded
        # Any registered target (bigram_circuits.targets): "bigram", "full_model", a control such as
        # "permuted_contexts". The stats are loaded whatever the target: every figure's r needs them.
        target = Target.from_name(target_name, stats=data["stats"], vocab_size=data["vocab"])
        config = self.config.search_config()
        if seed is not None:
            config = replace(config, seed=seed)
        table = sweep(
            bridge,
            data["train"],
            target,
            [float(x) for x in lambdas],
            granularities or self.config.granularities,
            config,
            self.root / folder,
            eval_windows=data["eval"],
            show_progress=self.show_progress,
            metadata={"figures": folder},
        )
        table["path"] = [str(Path(p).relative_to(self.root)) for p in table["path"]]
        return table

    def subnetwork(self, relative_path: str):
        from bigram_circuits.subnetwork import Subnetwork

        return Subnetwork.load(self.root / relative_path)

    # -- Fig 1, Table 1

    def bigram_sweep(self) -> pd.DataFrame:
        """The lambda sweep of bigram subnetworks of the final model, with full-model r and |M|."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.search import bigram_correlation
            from bigram_circuits.subnetwork import Subnetwork

            data = self.loaded
            table = self._sweep(data["bridge"], "bigram", self.config.bigram_lambdas, "final/bigram")
            mask_size = Subnetwork.full(data["bridge"], self.config.granularities).n_params_total()
            rows = from_search_sweep(table, self.model, mask_size=mask_size)
            rows["full_model_r"] = bigram_correlation(data["bridge"], data["stats"], data["eval"])
            rows["chosen"] = table["chosen"].to_numpy()
            rows["path"] = table["path"].to_numpy()
            return rows

        return self._frame("bigram_sweep", compute)

    def chosen_bigram(self):
        return self.subnetwork(self._chosen_row()["path"])

    def _chosen_path(self, folder: str) -> str:
        """The chosen subnetwork of the sweep in ``folder``, relative to the root: RunDir's choice,
        the lambda its ``sweep.csv`` marks (the paper's rule, :func:`~bigram_circuits.search.choose_subnetwork`)."""
        return str(RunDir(self.root / folder).subnetwork_dir().relative_to(self.root))

    def _chosen_row(self) -> pd.Series:
        """The Fig 1 sweep's row of the chosen bigram subnetwork."""
        rows = self.bigram_sweep()
        return rows[rows["path"] == self._chosen_path("final/bigram")].iloc[0]

    # -- Fig 5 left, and the optimal subnetwork paired with the chosen bigram one

    def optimal_sweep(self) -> pd.DataFrame:
        """Optimal subnetworks (target: the full model's distribution): r with model and bigrams."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import (
                metrics_from_surprisals,
                pearson_r,
                token_surprisals,
            )

            data = self.loaded
            table = self._sweep(data["bridge"], "full_model", self.config.optimal_lambdas, "final/optimal")
            full = token_surprisals(data["bridge"], data["stats"], data["eval"], show_progress=False)
            rows = []
            for _, run in table.iterrows():
                sub = token_surprisals(
                    data["bridge"], data["stats"], data["eval"], self.subnetwork(run["path"]), show_progress=False
                )
                rows.append(
                    {
                        "model": self.model,
                        "lambda": run["lambda"],
                        "active_params": run["n_params"],
                        "r_model": pearson_r(sub.model, full.model),
                        "r_bigram": metrics_from_surprisals(sub)["r_dropped"],
                        "path": run["path"],
                    }
                )
            return pd.DataFrame(rows)

        return self._frame("optimal_sweep", compute)

    def paired_optimal(self):
        """The optimal subnetwork closest in size (log scale) to the chosen bigram subnetwork."""
        table = self.optimal_sweep()
        size = max(self.chosen_bigram().n_params(), 1)
        distance = (np.log(table["active_params"].clip(lower=1)) - math.log(size)).abs()
        return self.subnetwork(table.loc[distance.idxmin(), "path"])

    # -- headline numbers over seeds

    def headline(self) -> pd.DataFrame:
        """The chosen lambda's bigram subnetwork searched once per ``headline_seeds`` seed: its
        size, r, where it sits, the ablation ratio against a random same-shape subnetwork (drawn
        with the same seed) and its overlap with the paired optimal subnetwork."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.overlap import overlap
            from bigram_circuits.evaluate import ablation_table

            data = self.loaded
            lam = float(self._chosen_row()["lambda"])
            optimal = self.paired_optimal()
            rows = []
            for seed in self.config.headline_seeds:
                path = self._seed_path(seed)
                sub = self.subnetwork(path)
                metrics = sub.metadata.get("metrics", {})
                ablation = ablation_table(
                    data["bridge"], data["stats"], data["ablation"], sub, seeds=(seed,), show_progress=False
                ).set_index("condition")
                shares = sub.layer_distribution()
                kept = max(float(shares["kept_params"].sum()), 1.0)
                result = overlap(sub, optimal, n_random=self.config.overlap_samples, seed=self.config.seed)
                rows.append(
                    {
                        "seed": seed,
                        "lambda": lam,
                        "active_params": int(sub.n_params()),
                        "active_percent": 100.0 * sub.n_params() / max(sub.n_params_total(), 1),
                        "r": float(metrics.get("bigram_r", float("nan"))),
                        "steps": int(metrics.get("steps", 0)),
                        "converged": bool(metrics.get("converged", False)),
                        "mlp0_share": float(shares.query("layer == 0 and block == 'mlp'")["kept_params"].sum() / kept),
                        "ablated_loss_increase": float(ablation.loc["bigram ablated", "loss_increase"]),
                        "random_ablated_loss_increase": float(ablation.loc["random ablated", "loss_increase"]),
                        "ablation_ratio": float(ablation.attrs["loss_increase_ratio"]),
                        "bigram_only_loss": float(ablation.loc["bigram only", "lm_loss_nats"]),
                        "random_only_loss": float(ablation.loc["random only", "lm_loss_nats"]),
                        "overlap_ratio": result.ratio,
                        "overlap_p_value": result.p_value,
                        "overlap_frac_in_optimal": result.frac_a_in_b,
                        "path": path,
                    }
                )
            return pd.DataFrame(rows)

        return self._frame("headline_seeds", compute)

    # -- Fig 2

    def checkpoint_results(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Estimated r at fixed sizes and layer shares of the chosen subnetwork, per checkpoint."""
        from bigram_circuits.models import available_checkpoints

        steps = _evenly_spaced(available_checkpoints(self.model), self.config.max_checkpoints)
        if not steps:
            return pd.DataFrame(), pd.DataFrame()

        def compute_step(step: int | None) -> pd.DataFrame:
            from bigram_circuits.models import load_model
            from bigram_circuits.search import bigram_correlation

            data = self.loaded
            if step is None:  # the final model: reuse the Fig 1 sweep
                rows = self.bigram_sweep()
                full_r = float(rows["full_model_r"].iloc[0])
                chosen_path = self._chosen_row()["path"]
            else:
                bridge, _ = load_model(self.model, device=self.device, checkpoint=step)
                table = self._sweep(bridge, "bigram", self.config.checkpoint_lambdas, f"step_{step}/bigram")
                rows = from_search_sweep(table, self.model)
                full_r = bigram_correlation(bridge, data["stats"], data["eval"])
                chosen_path = self._chosen_path(f"step_{step}/bigram")
                del bridge
            chosen = self.subnetwork(chosen_path)
            targets = [f * chosen.n_params_total() for f in self.config.target_fractions]
            estimate = interpolate_r(rows, targets)
            estimate["full_model_r"] = full_r
            shares = chosen.layer_distribution().rename(columns={"block": "component", "share_of_subnetwork": "share"})
            shares = shares[["layer", "component", "share"]].assign(kind="share")
            return pd.concat([estimate.assign(kind="r"), shares], ignore_index=True)

        final_step = self._final_step()
        parts = []
        for step in steps + ([None] if final_step is not None else []):
            label = final_step if step is None else step
            part = self._frame(f"checkpoint_{label}", lambda s=step: compute_step(s))
            parts.append(part.assign(step=label))
        combined = pd.concat(parts, ignore_index=True)
        ckpt = combined[combined["kind"] == "r"][
            ["step", "target_params", "r_estimated", "full_model_r", "extrapolated"]
        ]
        share = combined[combined["kind"] == "share"][["step", "component", "layer", "share"]]
        return ckpt.reset_index(drop=True), share.astype({"layer": int}).reset_index(drop=True)

    def _final_step(self) -> int | None:
        """The final model's training step, from the model folder's metrics.json when it has one."""
        from bigram_circuits.models import resolve_source

        metrics = Path(resolve_source(self.model).location) / "metrics.json"
        if not metrics.is_file():
            return None
        try:
            return int(json.loads(metrics.read_text())["config"]["max_steps"])
        except (KeyError, TypeError, ValueError):
            return None

    # -- Fig 3, Fig 4

    def _runs(self) -> dict:
        bigram = self.chosen_bigram()
        return {"full": None, "bigram": bigram, "random": bigram.random_control(self.config.seed)}

    def lens(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.lens import lens_report

            data = self.loaded
            return lens_report(
                data["bridge"],
                data["tokenizer"],
                data["analysis"],
                self._runs(),
                n_tokens=self.config.analysis_tokens,
                progress=self.show_progress,
            )

        return self._frame("lens", compute)

    def similarity(self) -> dict[str, pd.DataFrame]:
        """Layer x layer covariance similarity of the full model, the chosen bigram subnetwork and
        a random same-shape one (one stage each; one report computes the three)."""
        from bigram_circuits.circuits.similarity import similarity_report

        def compute() -> dict[str, pd.DataFrame]:
            data = self.loaded
            return similarity_report(
                data["bridge"],
                data["analysis"],
                self._runs(),
                n_tokens=self.config.analysis_tokens,
                progress=self.show_progress,
            )

        return self.cache.frames("similarity", ("full", "bigram", "random"), compute)

    # -- Fig 5 right, Tables 2-4

    def ablation(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import ablation_table

            data = self.loaded
            return ablation_table(
                data["bridge"],
                data["stats"],
                data["ablation"],
                self.chosen_bigram(),
                optimal=self.paired_optimal(),
                seeds=self.config.random_seeds,
                show_progress=self.show_progress,
            )

        return self._frame("ablation", compute)

    def overlap(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.overlap import overlap_table

            return overlap_table(
                {"bigram vs optimal": (self.chosen_bigram(), self.paired_optimal())},
                n_random=self.config.overlap_samples,
                seed=self.config.seed,
            )

        return self._frame("overlap", compute)

    def generations(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import generate_table, generation_conditions

            data = self.loaded
            conditions = generation_conditions(self.chosen_bigram(), random_seed=self.config.seed)
            return pd.concat(
                [
                    generate_table(
                        data["bridge"],
                        data["tokenizer"],
                        prompt,
                        conditions,
                        temperature=self.config.generation_temperature,
                        max_new_tokens=self.config.generation_tokens,
                        seed=self.config.seed,
                    )
                    for prompt in self.config.prompts
                ],
                ignore_index=True,
            )

        return self._frame("generations", compute)

    def bigram_r_rows(self) -> pd.DataFrame:
        """Table 2 rows: full model, bigram subnetwork, empty subnetwork (embeddings, layernorms
        and biases only), "embeddings + linear map" and, with a step-0 checkpoint, the subnetworks
        found at random initialisation with its own and with the trained embeddings."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.baselines import (
                LinearMapConfig,
                fit_linear_map,
                transplant_embeddings,
            )
            from bigram_circuits.models import available_checkpoints, load_model
            from bigram_circuits.search import SWEEP_FILE, bigram_correlation, choose_subnetwork
            from bigram_circuits.subnetwork import Subnetwork

            data = self.loaded
            sweep_rows = self.bigram_sweep()
            chosen = table1_chosen(sweep_rows).iloc[0]
            empty = Subnetwork.empty(data["bridge"], self.config.granularities)
            rows = [
                {"condition": TABLE2_CONDITIONS["full_model"], "r": float(sweep_rows["full_model_r"].iloc[0])},
                {"condition": TABLE2_CONDITIONS["subnetwork"], "r": float(chosen["r"])},
            ]
            if 0 in available_checkpoints(self.model):
                self.checkpoint_results()  # makes sure the step-0 sweep exists
                init_sweep = self.root / "step_0" / "bigram" / SWEEP_FILE
                rows.append(
                    {
                        "condition": TABLE2_CONDITIONS["random_init"],
                        "r": float(choose_subnetwork(pd.read_csv(init_sweep))["bigram_r"]),
                    }
                )
                init_bridge, _ = load_model(self.model, device=self.device, checkpoint=0)
                transplant_embeddings(init_bridge, data["bridge"])
                table = self._sweep(
                    init_bridge, "bigram", self.config.checkpoint_lambdas, "step_0_trained_embeddings/bigram"
                )
                rows.append(
                    {
                        "condition": TABLE2_CONDITIONS["random_init_trained_embeddings"],
                        "r": float(choose_subnetwork(table)["bigram_r"]),
                    }
                )
                del init_bridge
            rows.append(
                {
                    "condition": TABLE2_CONDITIONS["empty"],
                    "r": bigram_correlation(data["bridge"], data["stats"], data["eval"], empty),
                }
            )
            linear_map = fit_linear_map(
                data["bridge"],
                data["stats"],
                data["train"],
                LinearMapConfig(
                    steps=self.config.linear_map_steps, batch_size=self.config.search.batch_size, seed=self.config.seed
                ),
                show_progress=self.show_progress,
            )
            rows.append(
                {
                    "condition": TABLE2_CONDITIONS["linear_map"],
                    "r": linear_map.evaluate(data["bridge"], data["stats"], data["eval"])["r_dropped"],
                }
            )
            return pd.DataFrame(rows)

        # "table2_bigram_r": a cache written before the linear-map and transplant rows existed
        # ("table2_rows") is not reused.
        return self._frame("table2_bigram_r", compute)

    # -- faithfulness controls (issue 23)

    def _seed_path(self, seed: int) -> str:
        """The folder of the chosen lambda's bigram subnetwork searched with ``seed``: the Fig 1
        sweep's run for the pipeline's own seed, else ``final/bigram_seed_{seed}`` (searched
        once, shared by the headline and the controls)."""
        chosen = self._chosen_row()
        if seed == self.config.seed:
            return str(chosen["path"])
        lam = float(chosen["lambda"])
        runs = self._sweep(self.loaded["bridge"], "bigram", [lam], f"final/bigram_seed_{seed}", seed=seed)
        return str(runs["path"].iloc[0])

    def control_sweeps(self) -> pd.DataFrame:
        """Lambda sweeps of the controls beside the real one: the bigram target permuted across
        contexts and within rows (r against the permuted table; ``checkpoint_lambdas``, the
        lambdas of every sweep besides Fig 1's), and the real target searched at the chosen lambda
        in the step-0 (random-init) model with its own and with the trained embeddings (Table 2's
        searches at that lambda, shared through their cache folders)."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.baselines import transplant_embeddings
            from bigram_circuits.models import available_checkpoints, load_model

            data = self.loaded
            real = self.bigram_sweep()
            from bigram_circuits.search import SWEEP_FILE

            stops = pd.read_csv(self.root / "final" / "bigram" / SWEEP_FILE)[["lambda", "steps", "stop_reason"]]
            parts = [real.merge(stops, on="lambda", how="left").assign(control="real bigram target", target="bigram")]
            suffix = "" if self.config.seed == 0 else f":{self.config.seed}"
            for variant in ("contexts", "vocab"):
                name = f"permuted_{variant}{suffix}"
                table = self._sweep(
                    data["bridge"], name, self.config.checkpoint_lambdas, f"controls/permuted_{variant}"
                )
                parts.append(
                    from_search_sweep(table, self.model).assign(
                        control=f"permuted {variant}",
                        target=name,
                        path=table["path"].to_numpy(),
                        steps=table["steps"].to_numpy(),
                        stop_reason=table["stop_reason"].to_numpy(),
                    )
                )
            if 0 in available_checkpoints(self.model):
                for label, folder, transplant in (
                    ("random init", "step_0/bigram", False),
                    ("random init + trained embeddings", "step_0_trained_embeddings/bigram", True),
                ):
                    init_bridge, _ = load_model(self.model, device=self.device, checkpoint=0)
                    if transplant:
                        transplant_embeddings(init_bridge, data["bridge"])
                    # Table 2's / Fig 2's sweep in its folder (shared, not redone, and its sweep.csv
                    # kept whole), of which the chosen lambda's row is the control.
                    lam = float(self._chosen_row()["lambda"])
                    lambdas = sorted({*map(float, self.config.checkpoint_lambdas), lam})
                    table = self._sweep(init_bridge, "bigram", lambdas, folder)
                    table = table[table["lambda"] == lam].reset_index(drop=True)
                    parts.append(
                        from_search_sweep(table, self.model).assign(
                            control=label,
                            target="bigram",
                            path=table["path"].to_numpy(),
                            steps=table["steps"].to_numpy(),
                            stop_reason=table["stop_reason"].to_numpy(),
                        )
                    )
                    del init_bridge
            total = float(real["mask_size"].iloc[0]) if "mask_size" in real else float("nan")
            table = pd.concat(parts, ignore_index=True)
            table["active_percent"] = 100.0 * table["active_params"] / total
            table["chosen"] = table["chosen"].astype("boolean").fillna(False).astype(bool)
            columns = ["control", "target", "lambda", "active_params", "active_percent", "r", "chosen"]
            return table[[*columns, "steps", "stop_reason", "path"]]

        return self._frame("controls_sweeps", compute)

    def control_partial_ablation(self) -> pd.DataFrame:
        """Random fractions of the chosen bigram subnetwork and of random same-shape ones removed
        (zero ablation; for neuron/head masks also mean ablation), one draw per ``random_seeds``
        seed. With weight masks, a neuron/head bigram subnetwork at the chosen lambda is searched
        too (``controls/neuron_head``) for the mean- vs zero-ablation comparison."""

        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.ablation import partial_ablation_table

            data = self.loaded
            seeds = self.config.random_seeds
            chosen = self.chosen_bigram()
            units = ("neuron", "head")
            parts = []
            is_units = set(self.config.granularities) <= set(units)
            parts.append(
                partial_ablation_table(
                    data["bridge"], data["stats"], data["ablation"], chosen, seeds=seeds, show_progress=False
                ).assign(granularity="+".join(self.config.granularities))
            )
            if not is_units:
                lam = float(self._chosen_row()["lambda"])
                table = self._sweep(data["bridge"], "bigram", [lam], "controls/neuron_head", granularities=units)
                unit_sub = self.subnetwork(table["path"].iloc[0])
                parts.append(
                    partial_ablation_table(
                        data["bridge"], data["stats"], data["ablation"], unit_sub, seeds=seeds, show_progress=False
                    ).assign(granularity="neuron+head")
                )
            return pd.concat(parts, ignore_index=True)

        return self._frame("controls_partial_ablation", compute)

    def control_seed_runs(self) -> pd.DataFrame:
        """The chosen lambda's bigram subnetwork searched with every ``headline_seeds`` seed (the
        headline's searches, shared through their folders): seed, lambda, size, r, path."""

        def compute() -> pd.DataFrame:
            chosen = self._chosen_row()
            lam, total = float(chosen["lambda"]), float(chosen["mask_size"])
            rows = []
            for seed in self.config.headline_seeds:
                path = self._seed_path(seed)
                sub = self.subnetwork(path)
                rows.append(
                    {
                        "seed": seed,
                        "lambda": lam,
                        "active_params": int(sub.n_params()),
                        "active_percent": 100.0 * sub.n_params() / total,
                        "r": float(sub.metadata.get("metrics", {}).get("bigram_r", float("nan"))),
                        "path": path,
                    }
                )
            return pd.DataFrame(rows)

        return self._frame("controls_seed_runs", compute)

    def control_seed_overlap(self) -> pd.DataFrame:
        """Overlap of the chosen lambda's subnetworks of every pair of ``headline_seeds`` seeds
        against the null of random same-shape pairs (:func:`~bigram_circuits.circuits.overlap.overlap`)."""

        def compute() -> pd.DataFrame:
            from itertools import combinations

            from bigram_circuits.circuits.overlap import overlap_table

            runs = self.control_seed_runs()
            subs = {int(row.seed): self.subnetwork(row.path) for row in runs.itertuples()}
            pairs = {f"seed {a} vs seed {b}": (subs[a], subs[b]) for a, b in combinations(sorted(subs), 2)}
            table = overlap_table(pairs, n_random=self.config.overlap_samples, seed=self.config.seed)
            table.insert(1, "kind", "seed vs seed")
            return table

        return self._frame("controls_seed_overlap", compute)

    def cached_headline(self) -> pd.DataFrame | None:
        """The headline stage's table if it is cached (its bigram-vs-optimal overlap goes beside
        the seed-to-seed overlap), else None."""
        return self.cache.cached_frame("headline_seeds")

    def controls(self) -> dict[str, pd.DataFrame]:
        """Every control table (each cached on its own)."""
        return {
            "sweeps": self.control_sweeps(),
            "partial": self.control_partial_ablation(),
            "seed_overlap": self.control_seed_overlap(),
            "seeds": self.control_seed_runs(),
        }


def figures_command(
    model: str = "default",
    out_dir: str | os.PathLike = "figures",
    cache_dir: str | os.PathLike = "runs/figures_cache",  # cache of intermediate results (resumable)
    *,
    config: FiguresConfig | None = None,
    device: str | torch.device = "cpu",
    png: bool = True,
    show_progress: bool = True,
    # all (every stage) or controls (the faithfulness-controls stage alone; earlier stages from the cache)
    only: str = "all",
) -> list[Path]:
    """``bigram-circuits figures``: compute every result of the paper's figures and tables for
    ``model`` and write them to ``out_dir``; returns the paths written.

    Intermediate results (searches, evaluations, lens, similarity, ablations, generations) are
    cached under ``cache_dir/<model>-<hash of model files and settings>/``, so an interrupted
    run resumes where it stopped and a finished one only redraws. Writes ``fig1..fig5`` as
    HTML (+ PNG when Chromium is available; one shared ``plotly.min.js``), every table as CSV,
    ``tables.md`` with all tables in Markdown, and the figures' input DataFrames under
    ``out_dir/data/`` (so they can be redrawn without the cache). ``png=False`` skips the PNG
    export.

    ``only="controls"`` runs the faithfulness-controls stage alone (its inputs, the bigram and
    optimal sweeps and the headline seeds, come from the cache or are computed): it writes
    ``fig_controls``, ``table_controls*.csv``, ``data/controls_*.csv`` and replaces the
    controls sections at the end of an existing ``tables.md``.
    """

    if only not in ("all", "controls"):
        raise ConfigError(f"only must be 'all' or 'controls', got {only!r}")
    config = config or FiguresConfig()
    device = resolve_device(device)  # once, before any work
    # Unwritable destinations fail now, not after the searches.
    out = ensure_output_dir(out_dir)
    ensure_output_dir(cache_dir)
    root = Path(cache_dir) / f"{_slug(str(model))}-{_model_fingerprint(str(model))}-{config.key()}"
    run = _FigureRun(str(model), config, root, device, show_progress)
    if only == "controls":
        # The headline stage's bigram-vs-optimal overlap, from the cache or the last full run's data.
        headline = run.cached_headline()
        if headline is None and (out / "data" / "headline_seeds.csv").exists():
            headline = pd.read_csv(out / "data" / "headline_seeds.csv")
        return _write_controls(run.controls(), out, png, headline)

    stages = [
        ("bigram sweep", run.bigram_sweep),
        ("optimal sweep", run.optimal_sweep),
        ("checkpoints", run.checkpoint_results),
        ("linear lens", run.lens),
        ("similarity", run.similarity),
        ("ablation", run.ablation),
        ("overlap", run.overlap),
        ("generations", run.generations),
        ("bigram r table", run.bigram_r_rows),
        ("headline over seeds", run.headline),
        ("controls", run.controls),
    ]
    results = {}
    with tqdm(total=len(stages), desc="figures", unit="stage", disable=not show_progress) as bar:
        for name, compute in stages:
            bar.set_postfix_str(name)
            results[name] = compute()
            bar.update(1)

    written: list[Path] = []

    def save(fig: go.Figure, name: str) -> None:
        written.extend(save_figure(fig, out / name, png=png, include_plotlyjs="directory"))

    sweep_rows = results["bigram sweep"]
    save(fig1_r_vs_params(sweep_rows), "fig1_r_vs_params")
    ckpt, share = results["checkpoints"]
    if len(ckpt):
        save(fig2_training_dynamics(ckpt, share), "fig2_training_dynamics")
    else:
        _log.warning("Fig 2 skipped: %s has no training checkpoints (checkpoints/step_N.safetensors)", model)
    save(fig3_rotation(results["linear lens"]), "fig3_rotation")
    save(fig4_similarity(results["similarity"]), "fig4_similarity")
    ablation = results["ablation"].rename(columns={"lm_loss_nats": "loss", "lm_loss_nats_std": "loss_std"})
    ablation = ablation[
        ablation["condition"].isin(["full model", "random ablated", "bigram ablated", "optimal ablated"])
    ]
    save(fig5_optimal(results["optimal sweep"], ablation), "fig5_optimal")
    chosen = table1_chosen(sweep_rows).iloc[0]
    distribution = run.chosen_bigram().layer_distribution()
    save(
        fig_layer_distribution(
            distribution,
            f"Where the chosen bigram subnetwork sits (lambda {chosen['lambda']:g}, "
            f"{human_count(chosen['active_params'])} weights, r {chosen['r']:.3f})",
        ),
        "fig_layer_distribution",
    )

    tables = {
        "table_fig1": table_fig1(sweep_rows),
        "table_fig1_paper": PAPER_FIG1,
        "table1_chosen": table1_chosen(sweep_rows),
        "table2_bigram_r": table2_bigram_r(results["bigram r table"]),
        "table3_overlap": table3_overlap(results["overlap"]),
        "table4_generations": table4_generations(results["generations"]),
        "table_headline_seeds": table_headline(results["headline over seeds"]),
        "table_ablation": results["ablation"][
            ["condition", "lm_loss_nats", "lm_loss_nats_std", "loss_increase", "r_dropped", "active_params"]
        ],
    }
    titles = {
        "table_fig1": "Figure 1: best bigram subnetwork r vs full model r",
        "table_fig1_paper": "Figure 1 (paper): Pythia and GPT-2",
        "table1_chosen": "Table 1: chosen bigram subnetwork",
        "table2_bigram_r": "Table 2: bigram r of the full model, the subnetwork and baselines",
        "table3_overlap": "Table 3: overlap of the bigram and optimal subnetworks",
        "table4_generations": "Table 4: sample generations",
        "table_headline_seeds": "Headline over seeds: the chosen lambda searched with each seed (mean ± sd last)",
        "table_ablation": "Ablation: held-out LM loss (nats) with subnetworks kept or removed",
    }
    # The inputs of every figure, so a notebook (or anyone) can redraw them without the cache.
    inputs = {
        "bigram_sweep": sweep_rows,
        "optimal_sweep": results["optimal sweep"],
        "checkpoint_r": ckpt,
        "checkpoint_layer_share": share,
        "lens": results["linear lens"],
        "ablation": results["ablation"],
        "overlap": results["overlap"],
        "generations": results["generations"],
        "bigram_r_rows": results["bigram r table"],
        "headline_seeds": results["headline over seeds"],
        "layer_distribution": distribution,
    }
    similarity = {f"similarity_{name}": matrix for name, matrix in results["similarity"].items()}
    data_dir = ensure_output_dir(out / "data")
    written += write_tables(inputs, data_dir, markdown=False)
    written += write_tables(similarity, data_dir, markdown=False, index=True)
    # Cached stages keep no attrs, so tables.md lists none (a rerun writes the same file).
    header = f"# Tables for model {model!r}\n"
    written += write_tables(tables, out, ".3g", markdown="tables.md", titles=titles, header=header)
    written.extend(_write_controls(results["controls"], out, png, results["headline over seeds"]))
    return written


_CONTROLS_HEADING = "## Controls"


def _write_controls(
    controls: dict[str, pd.DataFrame], out: Path, png: bool, headline: pd.DataFrame | None = None
) -> list[Path]:
    """The controls' figure, tables and input data; their sections replace the controls
    sections at the end of ``out/tables.md`` (appended when it has none). ``headline`` (the
    headline stage's rows) adds the bigram-vs-optimal overlap beside the seed-to-seed one."""
    written = save_figure(
        fig_controls(controls["sweeps"], controls["partial"]),
        out / "fig_controls",
        png=png,
        include_plotlyjs="directory",
    )
    tables = {
        "table_controls": table_controls(
            controls["sweeps"], controls["partial"], controls["seed_overlap"], controls["seeds"], headline
        ),
        "table_controls_partial": table_controls_partial(controls["partial"]),
    }
    titles = {  # each starts with the controls heading, which marks where the controls sections begin
        "table_controls": "Controls: can a mask fit a nonsense target, a random model, or survive partial removal "
        "as well?",
        "table_controls_partial": "Controls: partial ablation curves (held-out loss increase and bigram r, mean ± sd "
        "over draws)",
    }
    names = {"sweeps": "sweeps", "partial": "partial_ablation", "seed_overlap": "seed_overlap", "seeds": "seed_runs"}
    data = {f"controls_{names[name]}": controls[name] for name in ("sweeps", "partial", "seed_overlap", "seeds")}
    written += write_tables(data, ensure_output_dir(out / "data"), markdown=False)
    md_path = out / "tables.md"
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Tables\n"
    head = text.split(f"\n{_CONTROLS_HEADING}", 1)[0].rstrip("\n")
    written += write_tables(tables, out, ".3g", markdown="tables.md", titles=titles, header=head + "\n")
    return written
