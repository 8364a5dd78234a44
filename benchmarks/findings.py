"""The paper's findings, one row each, against this project's measured results.

    python benchmarks/findings.py            # prints the table and writes benchmarks/results/findings.{md,json}

Reads only committed results (nothing is recomputed):

- ``figures/data/*.csv``              default model, weight masks (``make figures``)
- ``figures/neuron_head/data/*.csv``  default model, neuron + head masks
  (``bigram-circuits figures --granularity neuron,head --out figures/neuron_head``)
- ``benchmarks/results/smollm2_study.json``  SmolLM2-135M, weight masks (``benchmarks/smollm2_study.py``)

Each cell is a measured number (mean ± sd over the seeds of ``FiguresConfig.headline_seeds``
where the results have several); a verdict says whether the paper's finding holds, with the
number that decides it. A missing result is shown as "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.tables import TABLE2_CONDITIONS, TABLE2_SHORT, interpolate_r, to_markdown

MISSING = "not measured"


class Source:
    """The result tables of one figures folder (``data/*.csv``); ``None`` where absent."""

    def __init__(self, folder: Path):
        self.folder = folder / "data"

    def table(self, name: str, **kwargs) -> pd.DataFrame | None:
        path = self.folder / f"{name}.csv"
        return pd.read_csv(path, **kwargs) if path.is_file() else None


def mean_sd(values, fmt: str = ".3f", scale: float = 1.0) -> str:
    array = np.asarray(values, dtype=float) * scale
    if len(array) == 0 or np.isnan(array).all():
        return MISSING
    if len(array) == 1:
        return f"{array[0]:{fmt}}"
    return f"{array.mean():{fmt}} ± {array.std(ddof=1):{fmt}}"


def _chosen_summary(src: Source) -> dict | None:
    head = src.table("headline_seeds")
    if head is None:
        return None
    return {
        "r": head["r"],
        "percent": head["active_percent"],
        "params": head["active_params"],
        "mlp0": head["mlp0_share"],
        "ratio": head["ablation_ratio"],
        "ablated": head["ablated_loss_increase"],
        "random_ablated": head["random_ablated_loss_increase"],
        "overlap": head["overlap_ratio"],
        "p": head["overlap_p_value"],
        "lambda": float(head["lambda"].iloc[0]),
        "n": len(head),
    }


def _rotation(lens: pd.DataFrame | None, run: str, layer: int) -> float:
    if lens is None:
        return float("nan")
    row = lens[(lens["run"] == run) & (lens["target"] == "input") & (lens["layer"] == layer)]
    return float(row["rotation_deg"].iloc[0]) if len(row) else float("nan")


def _similarity_later(matrix: pd.DataFrame | None) -> float:
    """Mean cosine among layers >= 1 (the paper: near 1 for a random subnetwork)."""
    if matrix is None:
        return float("nan")
    values = matrix.to_numpy(dtype=float)
    later = values[1:, 1:][np.triu_indices(values.shape[0] - 1, k=1)]
    return float(later.mean())


def _p_text(p_values, n_random: int = 10_000) -> str:
    worst = float(np.max(np.asarray(p_values, dtype=float)))
    return f"p < {1 / n_random:.0e}" if worst == 0 else f"p ≤ {worst:.2g}"


# Baselines of Table 2 the subnetwork is held against (every row but the full model and itself).
TABLE2_BASELINES = tuple(
    TABLE2_CONDITIONS[key] for key in ("random_init", "random_init_trained_embeddings", "empty", "linear_map")
)
# A margin below this over the best baseline is "narrow": within the spread of r between seeds
# and evaluation samples seen in this project (about 0.01).
NARROW_MARGIN = 0.02
# The paper's size below which bigram r falls (Fig 1), in weights.
FALL_BELOW_PARAMS = 1_000_000


def table2_verdict(r: pd.Series) -> str:
    """Table 2: the subnetwork against every baseline row present, by the margin over the best."""
    baselines = {name: float(r[name]) for name in TABLE2_BASELINES if name in r.index and not np.isnan(r[name])}
    subnetwork = float(r[TABLE2_CONDITIONS["subnetwork"]])
    if not baselines:
        return f"not measured: no baseline rows (subnetwork {subnetwork:.3f})"
    best = max(baselines, key=baselines.get)
    margin = subnetwork - baselines[best]
    word = "differs" if margin <= 0 else ("narrowly" if margin < NARROW_MARGIN else "holds")
    return f"{word}: subnetwork {subnetwork:.3f} vs best baseline ({best}) {baselines[best]:.3f}, {margin:+.3f}"


def plateau_verdict(sweep: pd.DataFrame, tolerance: float = 0.04) -> str:
    """Fig 1, both halves: r stays within ``tolerance`` of lambda 0's as the subnetwork shrinks
    (the plateau), and falls by more than that below about 1M weights (the fall)."""
    if not (sweep["lambda"] == 0).any():
        return "not measured: no lambda 0 run"
    zero = float(sweep.loc[sweep["lambda"] == 0, "r"].iloc[0])
    total = float(sweep["mask_size"].iloc[0])
    within = sweep[sweep["r"] >= zero - tolerance]
    below = sweep[sweep["r"] < zero - tolerance]
    smallest_within = within["active_params"].min()
    plateau = (
        f"r within {tolerance:g} of lambda 0 down to {100 * smallest_within / total:.2g}% "
        f"({smallest_within:,.0f} weights)"
    )
    small = sweep[sweep["active_params"] < FALL_BELOW_PARAMS]
    if small.empty or below.empty:
        reason = "no run below 1M weights" if small.empty else f"r >= {small['r'].min():.3f} at every size below 1M"
        return f"partly: {plateau}; no fall ({reason})"
    largest_fall = float(below["active_params"].max())
    fallen_r = float(below.loc[below["active_params"].idxmax(), "r"])
    fall = f"falls by more than {tolerance:g} only at {largest_fall:,.0f} weights (r {fallen_r:.3f})"
    # The fall is the paper's if it comes within an order of magnitude of ~1M weights.
    word = "holds" if FALL_BELOW_PARAMS / 10 <= largest_fall <= FALL_BELOW_PARAMS * 3 else "partly"
    return f"{word}: {plateau}; {fall}"


def findings(weight: Source, neuron_head: Source, smol: dict | None) -> pd.DataFrame:
    W, N = _chosen_summary(weight), _chosen_summary(neuron_head)
    S = smol["chosen"] if smol else None
    rows: list[dict] = []

    def add(finding: str, paper: str, cells: list[str], verdict: str) -> None:
        rows.append(
            {
                "finding": finding,
                "paper": paper,
                "default, weight masks": cells[0],
                "default, neuron + head": cells[1],
                "SmolLM2-135M, weight masks": cells[2],
                "verdict (default, weight)": verdict,
            }
        )

    def cell(summary: dict | None, make: Callable[[dict], str]) -> str:
        try:
            return make(summary) if summary is not None else MISSING
        except (KeyError, TypeError, ValueError, IndexError):
            return MISSING

    # 1. size and r of the chosen subnetwork
    def size_r(s: dict) -> str:
        return f"r {mean_sd(s['r'])} at {mean_sd(s['percent'], '.2f')}% (lambda {s['lambda']:g})"

    smol_size = cell(S, lambda c: f"r {c['r_dropped']:.3f} at {c['percent_params']:.2f}% (lambda {c['lambda']:g})")
    seeds = (smol or {}).get("seeds_summary") or {}
    if S is not None and seeds.get("n_seeds", 0) > 1:
        smol_size = (
            f"r {seeds['bigram_r_mean']:.3f} ± {seeds['bigram_r_sd']:.3f} at {seeds['percent_params_mean']:.2f} ± "
            f"{seeds['percent_params_sd']:.2f}% (lambda {S['lambda']:g}, {seeds['n_seeds']} seeds)"
        )
    verdict = MISSING
    if W is not None:
        r, pct = float(np.mean(W["r"])), float(np.mean(W["percent"]))
        if r > 0.95 and pct < 1:
            verdict = f"holds: r {r:.3f} at {pct:.2f}%"
        elif r > 0.95:
            verdict = f"partly: r {r:.3f} holds, but at {pct:.2f}% of the weights (> 1%)"
        else:
            verdict = f"differs: r {r:.3f} at {pct:.2f}%"
    add(
        "r > 0.95 with about 1% or less of the non-embedding weights",
        "Pythia 1B r .959 at 0.17%; GPT-2 small .952 at 1.1%; Pythia 160M .953 at 8.5%",
        [cell(W, size_r), cell(N, size_r), smol_size],
        verdict,
    )

    # 2. first MLP
    smol_mlp0 = cell(
        S,
        lambda c: (
            f"{100 * c['layers']['mlp_layer0_share']:.1f}% in MLP 0 (plurality layer "
            f"{c['layers']['plurality_layer']}, attention {100 * c['layers']['attn_share']:.1f}%)"
        ),
    )
    verdict = MISSING
    if W is not None:
        dist = weight.table("layer_distribution")
        share = float(np.mean(W["mlp0"]))
        plurality = None
        if dist is not None:
            by_block = dist.set_index(["layer", "block"])["kept_params"]
            plurality = by_block.idxmax()
        verdict = ("holds" if plurality == (0, "mlp") else "differs") + f": MLP 0 holds {100 * share:.1f}%"
    add(
        "plurality of the subnetwork in the first MLP",
        "first MLP layer; Pythia 1B 82% MLP / 18% attention",
        [
            cell(W, lambda s: f"{mean_sd(s['mlp0'], '.1f', 100)}% in MLP 0"),
            cell(N, lambda s: f"{mean_sd(s['mlp0'], '.1f', 100)}% in MLP 0"),
            smol_mlp0,
        ],
        verdict,
    )

    # 3. ablation
    def ablation(s: dict) -> str:
        return (
            f"+{mean_sd(s['ablated'], '.3f')} vs +{mean_sd(s['random_ablated'], '.4f')} nats "
            f"({mean_sd(s['ratio'], '.1f')}x)"
        )

    smol_ablation = MISSING
    if smol:
        table = pd.DataFrame(smol["ablation"]).set_index("condition")
        smol_ablation = (
            f"+{table.loc['bigram ablated', 'loss_increase']:.2f} vs "
            f"+{table.loc['random ablated', 'loss_increase']:.2f} nats ({smol['loss_increase_ratio']:.2f}x)"
        )
    verdict = MISSING
    if W is not None:
        ratio = float(np.mean(W["ratio"]))
        verdict = ("holds" if ratio > 3 else "differs") + f": {ratio:.1f}x a random same-shape removal"
    add(
        "removing it hurts far more than removing a random same-shape subnetwork (held-out loss increase)",
        "removal wrecks the model, random removal does not",
        [cell(W, ablation), cell(N, ablation), smol_ablation],
        verdict,
    )

    # 3b. generations
    def generation(src: Source) -> str:
        table = src.table("generations")
        if table is None:
            return MISSING
        first = table[table["prompt"] == table["prompt"].iloc[0]].set_index("condition")["generation"]
        return " / ".join(f"{c}: {str(first.get(c, ''))[:40]!r}" for c in ("bigram ablated", "random ablated"))

    smol_gen = MISSING
    if smol and smol.get("generations"):
        table = pd.DataFrame(smol["generations"])
        first = table[table["prompt"] == table["prompt"].iloc[0]].set_index("condition")["generation"]
        smol_gen = " / ".join(f"{c}: {str(first.get(c, ''))[:40]!r}" for c in ("bigram ablated", "random ablated"))
    add(
        "generations after removal (bigram ablated / random ablated)",
        "bigram ablated collapses to one repeated token; random ablated stays fluent",
        [generation(weight), generation(neuron_head), smol_gen],
        "read the generations",
    )

    # 4. overlap
    def overlap(s: dict) -> str:
        return f"{mean_sd(s['overlap'], '.2f')}x chance, {_p_text(s['p'])}"

    smol_overlap = MISSING
    if smol and smol.get("overlap"):
        row = smol["overlap"][0]
        smol_overlap = f"{row['ratio']:.2f}x chance, p {row['p_value_text']}"
    verdict = MISSING
    if W is not None:
        ratio = float(np.mean(W["overlap"]))
        verdict = ("holds" if ratio >= 4 and float(np.max(W["p"])) < 1e-3 else "differs") + f": {ratio:.2f}x chance"
    add(
        "overlap with the optimal subnetwork above chance",
        "4x-15x chance, p < 1e-4 (10k random pairs)",
        [cell(W, overlap), cell(N, overlap), smol_overlap],
        verdict,
    )

    # 5. rotation
    def rotation(src: Source) -> str:
        lens = src.table("lens")
        if lens is None:
            return MISSING
        return "; ".join(
            f"{run} {_rotation(lens, run, 0):.0f}->{_rotation(lens, run, 1):.0f}°"
            for run in ("full", "bigram", "random")
        )

    smol_rot = MISSING
    if smol and smol.get("circuits"):

        def deg(c: dict, layer: int) -> float:  # JSON turns the layer keys into strings
            values = c["rotation_to_input_deg"]
            return float(values.get(str(layer), values.get(layer, float("nan"))))

        smol_rot = "; ".join(f"{run} {deg(c, 0):.0f}->{deg(c, 1):.0f}°" for run, c in smol["circuits"].items())
    verdict = MISSING
    lens = weight.table("lens")
    if lens is not None:
        jumps = {run: _rotation(lens, run, 1) - _rotation(lens, run, 0) for run in ("full", "bigram", "random")}
        holds = jumps["full"] > 30 and jumps["bigram"] > 30 and jumps["random"] < 0.5 * jumps["bigram"]
        verdict = ("holds" if holds else "differs") + ": jump " + ", ".join(f"{k} {v:.0f}°" for k, v in jumps.items())
    add(
        "layer-0 rotation away from the input (layer 0 -> 1, to input) in full and bigram, not random",
        "GPT-2 large full 0 -> 56°; Pythia 160M bigram 0 -> 47°; random: no jump",
        [rotation(weight), rotation(neuron_head), smol_rot],
        verdict,
    )

    # 6. covariance similarity
    def similarity(src: Source) -> str:
        values = {
            run: _similarity_later(src.table(f"similarity_{run}", index_col=0)) for run in ("full", "bigram", "random")
        }
        if all(np.isnan(v) for v in values.values()):
            return MISSING
        return ", ".join(f"{run} {v:.2f}" for run, v in values.items())

    smol_sim = MISSING
    if smol and smol.get("circuits"):
        smol_sim = ", ".join(f"{run} {c['similarity_among_later_layers']:.2f}" for run, c in smol["circuits"].items())
    verdict = MISSING
    random_sim = _similarity_later(weight.table("similarity_random", index_col=0))
    if not np.isnan(random_sim):
        verdict = ("holds" if random_sim > 0.9 else "differs") + f": random {random_sim:.2f}"
    add(
        "layer covariance similarity among layers >= 1 (mean cosine): random near 1",
        "bigram keeps the full model's layer-0 break and blocks; random all near 1",
        [similarity(weight), similarity(neuron_head), smol_sim],
        verdict,
    )

    # 7. Table 2
    def table2(src: Source | pd.DataFrame | None) -> str:
        rows2 = src if isinstance(src, pd.DataFrame) or src is None else src.table("bigram_r_rows")
        if rows2 is None:
            return MISSING
        short = {TABLE2_CONDITIONS[key]: name for key, name in TABLE2_SHORT.items()}
        return "; ".join(f"{short.get(r.condition, r.condition)} {r.r:.3f}" for r in rows2.itertuples())

    verdict = MISSING
    rows2 = weight.table("bigram_r_rows")
    if rows2 is not None:
        verdict = table2_verdict(rows2.set_index("condition")["r"])
    add(
        "Table 2: the trained subnetwork beats random-init and embedding-only baselines",
        "no numbers in our summary of the paper",
        [
            table2(weight),
            table2(neuron_head),
            table2(pd.DataFrame(smol["table2"]) if smol and smol.get("table2") else None),
        ],
        verdict,
    )

    # 8. r vs size plateau
    def plateau(src: Source) -> str:
        sweep = src.table("bigram_sweep")
        if sweep is None:
            return MISSING
        return "; ".join(
            f"{100 * r.active_params / r.mask_size:.2g}%: {r.r:.3f}"
            for r in sweep.sort_values("active_params", ascending=False).itertuples()
        )

    smol_plateau = MISSING
    if smol:
        smol_plateau = "; ".join(
            f"{r['percent_params']:.2g}%: {r['bigram_r']:.3f}"
            for r in sorted(smol["sweep"], key=lambda r: -r["n_params"])
        )
    verdict = MISSING
    sweep = weight.table("bigram_sweep")
    if sweep is not None:
        verdict = plateau_verdict(sweep)
    add(
        "bigram r plateaus as the subnetwork shrinks (Fig 1)",
        "plateau near 10M params; falls below ~1M",
        [plateau(weight), plateau(neuron_head), smol_plateau],
        verdict,
    )

    # 9. checkpoints
    def checkpoints(src: Source) -> str:
        ckpt = src.table("checkpoint_r")
        if ckpt is None or ckpt.empty:
            return MISSING
        smallest = ckpt["target_params"].min()
        part = ckpt[ckpt["target_params"] == smallest].sort_values("step")
        return "; ".join(
            f"step {int(r.step)}: r {r.r_estimated:.2f} (full {r.full_model_r:.2f})" for r in part.itertuples()
        )

    add(
        "training checkpoints: estimated r at a fixed small size, and the full model's r (Fig 2)",
        "Pythia 1B steps 0..143k: estimated r at 500k/1M/10M params vs full-model r",
        [checkpoints(weight), checkpoints(neuron_head), MISSING],
        "see Fig 2",
    )

    # 10. faithfulness controls (issue 23)
    def control_r(src: Source) -> dict | None:
        sweeps = src.table("controls_sweeps")
        if sweeps is None:
            return None
        real = sweeps[sweeps["control"] == "real bigram target"]
        chosen = real[real["chosen"]].iloc[0] if real["chosen"].any() else real.loc[real["r"].idxmax()]
        out = {"real": (float(chosen["r"]), float(chosen["active_percent"]))}
        for name, group in sweeps[sweeps["control"] != "real bigram target"].groupby("control", sort=False):
            if len(group) == 1:  # one search (the chosen lambda): its r at its own size
                out[name] = (float(group["r"].iloc[0]), float(group["active_percent"].iloc[0]))
            else:  # a sweep: r read off its curve at the real subnetwork's size
                out[name] = (float(interpolate_r(group, [float(chosen["active_params"])])["r_estimated"].iloc[0]), None)
        return out

    def controls(src: Source) -> str:
        found, partial = control_r(src), src.table("controls_partial_ablation")
        if found is None:
            return MISSING
        r, percent = found.pop("real")
        parts = [
            f"at {percent:.2f}% (real r {r:.3f}): "
            + "; ".join(f"{k} r {v:.3f}" + ("" if at is None else f" (at {at:.2f}%)") for k, (v, at) in found.items())
        ]
        if partial is not None:
            zero = partial[(partial["ablation"] == "zero") & (partial["granularity"] == partial["granularity"].iloc[0])]
            for fraction, label in ((0.5, "half"), (1.0, "all")):
                by = zero[zero["fraction"] == fraction].groupby("condition")["loss_increase"]
                bigram, random = mean_sd(by.get_group("bigram")), mean_sd(by.get_group("random"))
                parts.append(f"{label} removed +{bigram} vs random +{random} nats")
        seeds = src.table("controls_seed_overlap")
        if seeds is not None:
            for kind, group in seeds.groupby("kind", sort=False):
                parts.append(f"{kind} overlap {mean_sd(group['ratio'], '.1f')}x chance")
        return "; ".join(parts)

    def smol_controls() -> str:
        controls_ = (smol or {}).get("controls")
        if not controls_ or S is None:
            return MISSING
        searches = "; ".join(
            f"{row['control'].replace('_', ' ')} r {row['bigram_r']:.3f} (at {row['percent_params']:.2f}%)"
            for row in controls_["searches"]
        )
        parts = [f"at {S['percent_params']:.2f}% (real r {S['r_dropped']:.3f})" + (f": {searches}" if searches else "")]
        partial = pd.DataFrame(controls_["partial_ablation"])
        if len(partial):
            zero = partial[partial["ablation"] == "zero"]
            for fraction, label in ((0.5, "half"), (1.0, "all")):
                by = zero[zero["fraction"] == fraction].groupby("condition")["loss_increase"]
                bigram, random = mean_sd(by.get_group("bigram")), mean_sd(by.get_group("random"))
                parts.append(f"{label} removed +{bigram} vs random +{random} nats")
        if controls_["seed_overlap"]:
            parts.append(
                f"seed vs seed overlap {mean_sd(pd.DataFrame(controls_['seed_overlap'])['ratio'], '.1f')}x chance"
            )
        return "; ".join(parts)

    verdict = MISSING
    found = control_r(weight)
    if found is not None:
        r = found.pop("real")[0]
        nonsense = {k: v for k, (v, _) in found.items() if "trained embeddings" not in k}
        worst = max(nonsense, key=nonsense.get)
        verdict = (
            f"holds: nonsense targets and a random model reach at most r {nonsense[worst]:.3f} ({worst})"
            if nonsense[worst] < r - 0.1
            else f"differs: {worst} reaches r {nonsense[worst]:.3f}"
        )
    add(
        "controls: permuted targets and random-init models fit at the same size; partial removal; seed agreement",
        "not in the paper (random same-shape ablation and random-init search only)",
        [controls(weight), controls(neuron_head), smol_controls()],
        verdict,
    )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight", type=Path, default=REPO / "figures")
    parser.add_argument("--neuron-head", type=Path, default=REPO / "figures" / "neuron_head")
    parser.add_argument("--smollm2", type=Path, default=REPO / "benchmarks" / "results" / "smollm2_study.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "findings")
    args = parser.parse_args(argv)
    smol = json.loads(args.smollm2.read_text()) if args.smollm2.is_file() else None
    if smol is not None and smol.get("granularities") != ["weight"]:
        smol = None  # the SmolLM2 column is for weight masks only
    table = findings(Source(args.weight), Source(args.neuron_head), smol)
    markdown = to_markdown(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out.with_suffix(".md"), (markdown + "\n").encode("utf-8"))
    atomic_write_bytes(args.out.with_suffix(".json"), table.to_json(orient="records", indent=2).encode("utf-8"))
    print(markdown)
    return table


if __name__ == "__main__":
    main()
