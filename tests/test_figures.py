"""Figures (bigram_circuits.plots), tables (bigram_circuits.tables) and the paper pipeline
(bigram_circuits.app.figures), on small synthetic result tables."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from bigram_circuits import tables as T
from bigram_circuits.app import figures as A
from bigram_circuits.errors import FigureDataError
from bigram_circuits.plots import figures as P


def _sweep() -> pd.DataFrame:
    rows = []
    for model, full_r in (("tiny", 0.70), ("small", 0.65)):
        for lam, params, r in ((0, 2e6, 0.96), (1, 1e6, 0.95), (10, 2e5, 0.93), (100, 3e4, 0.85), (1000, 0, 0.1)):
            rows.append(
                {
                    "model": model,
                    "lambda": lam,
                    "active_params": params,
                    "r": r,
                    "full_model_r": full_r,
                    "mask_size": 3_000_000,
                }
            )
    return pd.DataFrame(rows)


def _ckpt_and_share() -> tuple[pd.DataFrame, pd.DataFrame]:
    ckpt, share = [], []
    for step in (0, 100, 1000):
        for target in (1e4, 1e5, 1e6):
            ckpt.append(
                {
                    "step": step,
                    "target_params": target,
                    "r_estimated": 0.5 + step / 4000,
                    "full_model_r": 0.8 - step / 10000,
                }
            )
        for layer in range(3):
            share.append({"step": step, "component": "mlp", "layer": layer, "share": 0.2 if layer else 0.5})
            share.append({"step": step, "component": "attn", "layer": layer, "share": 0.1 / 3})
    return pd.DataFrame(ckpt), pd.DataFrame(share)


def _lens() -> pd.DataFrame:
    rows = []
    for run in ("random", "full", "bigram"):
        for layer in range(4):
            rows.append({"run": run, "layer": layer, "target": "input", "rotation_deg": 10.0 * layer})
            rows.append({"run": run, "layer": layer, "target": "output", "rotation_deg": 70.0 - 10 * layer})
    return pd.DataFrame(rows)


def _matrices() -> dict[str, pd.DataFrame]:
    layers = range(4)
    base = np.array([[1.0 - 0.1 * abs(i - j) for j in layers] for i in layers])
    return {
        "full": pd.DataFrame(base, index=layers, columns=layers),
        "bigram": pd.DataFrame(base * 0.9, index=layers, columns=layers),
        "random": pd.DataFrame(np.full((4, 4), 0.99), index=layers, columns=layers),
    }


def _opt_and_ablation() -> tuple[pd.DataFrame, pd.DataFrame]:
    opt = pd.DataFrame({"active_params": [1e6, 1e5, 1e4], "r_model": [0.99, 0.9, 0.8], "r_bigram": [0.7, 0.75, 0.8]})
    ablation = pd.DataFrame(
        {
            "condition": ["bigram ablated", "full model", "random ablated", "optimal ablated"],
            "loss": [8.0, 3.5, 3.7, 9.0],
            "loss_std": [0.0, 0.0, 0.1, 0.0],
        }
    )
    return opt, ablation


# ----------------------------------------------------------------------------- figures


def test_fig1_one_line_and_one_reference_per_model_on_log_axis():
    fig = P.fig1_r_vs_params(_sweep())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 4  # 2 models x (sweep line + full-model reference)
    assert fig.layout.xaxis.type == "log"
    tiny = next(t for t in fig.data if t.name == "tiny")
    assert list(tiny.x) == sorted(tiny.x) and min(tiny.x) > 0  # sorted, empty mask dropped
    reference = next(t for t in fig.data if t.name == "tiny (full model)")
    assert set(reference.y) == {0.70}


def test_fig1_reference_from_argument_and_none_without_it():
    sweep = _sweep().drop(columns="full_model_r")
    assert len(P.fig1_r_vs_params(sweep).data) == 2
    fig = P.fig1_r_vs_params(sweep, full_model_r={"tiny": 0.5})
    assert len(fig.data) == 3


def test_table_fig1_best_r_per_model_and_paper_reference():
    table = T.table_fig1(_sweep())
    assert list(table["model"]) == ["tiny", "small"]
    assert table["best_subnetwork_r"].tolist() == [0.96, 0.96]
    assert table["full_model_r"].tolist() == [0.70, 0.65]
    paper = T.PAPER_FIG1.set_index("model")
    assert paper.loc["Pythia 1B", "best_subnetwork_r"] == 0.987
    assert paper.loc["GPT-2 large", "full_model_r"] == 0.583
    assert len(paper) == 7


def test_fig2_lines_and_two_heatmaps_with_shared_scale():
    ckpt, share = _ckpt_and_share()
    fig = P.fig2_training_dynamics(ckpt, share)
    kinds = [type(t).__name__ for t in fig.data]
    assert kinds.count("Scatter") == 4  # three target sizes + full model
    assert kinds.count("Heatmap") == 2
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert {h.coloraxis for h in heatmaps} == {"coloraxis"}
    mlp = np.asarray(heatmaps[0].z)
    assert mlp.shape == (3, 3) and mlp[0, 0] == pytest.approx(0.5)  # layer x step
    assert fig.layout.xaxis.type in (None, "linear", "-")  # training steps: linear axis
    assert fig.layout.xaxis2.type == "category"


def test_fig2_rejects_unknown_component():
    ckpt, share = _ckpt_and_share()
    share.loc[0, "component"] = "embed"
    with pytest.raises(FigureDataError, match="embed"):
        P.fig2_training_dynamics(ckpt, share)


def test_fig_layer_distribution_from_a_real_subnetwork(tiny_neox):
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    sub = Subnetwork.empty(bridge, ("neuron", "head")).random_control(0)
    full = Subnetwork.empty(bridge, ("neuron", "head")).complement()
    distribution = full.layer_distribution()
    fig = P.fig_layer_distribution(distribution)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == ["MLP", "attention"]
    total = sum(float(np.sum(b.y)) for b in bars)
    assert total == pytest.approx(1.0)  # shares of one subnetwork add up to 1
    assert len([t for t in fig.data if isinstance(t, go.Scatter)]) == 2  # fraction kept per block
    only_share = P.fig_layer_distribution(sub.layer_distribution().drop(columns=["fraction_kept"]))
    assert all(isinstance(t, go.Bar) for t in only_share.data)
    with pytest.raises(FigureDataError, match="share_of_subnetwork"):
        P.fig_layer_distribution(distribution.drop(columns=["share_of_subnetwork"]))
    with pytest.raises(FigureDataError, match="embed"):
        P.fig_layer_distribution(distribution.assign(block="embed"))


def test_fig3_two_panels_one_line_per_run_in_paper_order():
    fig = P.fig3_rotation(_lens())
    assert len(fig.data) == 6
    assert [t.name for t in fig.data[:3]] == ["full", "bigram", "random"]
    assert {t.xaxis for t in fig.data} == {"x", "x2"}
    assert fig.layout.xaxis.type == "linear"
    assert sum(bool(t.showlegend) for t in fig.data) == 3


def test_fig4_one_heatmap_per_run_on_one_scale():
    fig = P.fig4_similarity(_matrices())
    assert len(fig.data) == 3 and all(isinstance(t, go.Heatmap) for t in fig.data)
    assert fig.layout.coloraxis.cmax == pytest.approx(1.0)
    assert fig.layout.coloraxis.cmin == pytest.approx(0.9 * 0.7)
    assert fig.layout.yaxis.autorange == "reversed"


def test_fig4_rejects_non_square_matrix():
    matrices = _matrices()
    matrices["bigram"] = matrices["bigram"].iloc[:, :2]
    with pytest.raises(FigureDataError, match="square"):
        P.fig4_similarity(matrices)


def test_fig5_two_lines_and_one_bar_per_condition():
    opt, ablation = _opt_and_ablation()
    fig = P.fig5_optimal(opt, ablation)
    scatters = [t for t in fig.data if isinstance(t, go.Scatter)]
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(scatters) == 2 and len(bars) == 4
    assert [b.name for b in bars] == ["full model", "random ablated", "bigram ablated", "optimal ablated"]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "category"
    assert list(bars[1].error_y.array) == [0.1]


@pytest.mark.parametrize(
    ("call", "missing"),
    [
        (lambda: P.fig1_r_vs_params(_sweep().drop(columns=["r", "lambda"])), "'lambda', 'r'"),
        (lambda: T.table_fig1(_sweep().drop(columns=["model"])), "'model'"),
        (
            lambda: P.fig2_training_dynamics(_ckpt_and_share()[0].drop(columns="r_estimated"), _ckpt_and_share()[1]),
            "'r_estimated'",
        ),
        (lambda: P.fig2_training_dynamics(_ckpt_and_share()[0], _ckpt_and_share()[1].drop(columns="share")), "'share'"),
        (lambda: P.fig3_rotation(_lens().drop(columns="target")), "'target'"),
        (lambda: P.fig5_optimal(_opt_and_ablation()[0].drop(columns="r_bigram"), _opt_and_ablation()[1]), "'r_bigram'"),
        (lambda: P.fig5_optimal(_opt_and_ablation()[0], _opt_and_ablation()[1].drop(columns="loss")), "'loss'"),
        (lambda: T.table1_chosen(_sweep().drop(columns="active_params")), "'active_params'"),
        (lambda: T.table2_bigram_r(pd.DataFrame({"condition": ["x"]})), "'r'"),
        (lambda: T.table3_overlap(pd.DataFrame({"pair": ["x"]})), "'fraction_overlap'"),
        (lambda: T.table4_generations(pd.DataFrame({"condition": ["x"]})), "'text'"),
    ],
)
def test_missing_columns_raise_one_line_value_error_naming_them(call, missing):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, FigureDataError)
    assert missing in message and "\n" not in message


def test_empty_table_is_refused():
    with pytest.raises(FigureDataError, match="no rows"):
        P.fig3_rotation(_lens().iloc[:0])


# ----------------------------------------------------------------------------- tables


def test_interpolate_r_in_log_params_and_clamps_outside():
    sweep = pd.DataFrame({"active_params": [1e4, 1e6, 0], "r": [0.6, 0.9, 0.0]})
    table = T.interpolate_r(sweep, [1e5, 1e7, 1e3])
    assert table["r_estimated"].tolist() == pytest.approx([0.75, 0.9, 0.6])
    assert table["extrapolated"].tolist() == [False, True, True]
    empty = T.interpolate_r(pd.DataFrame({"active_params": [0, 0], "r": [0.1, 0.2]}), [1e5])
    assert empty["r_estimated"].isna().all()


def test_table1_picks_sparsest_within_tolerance_of_lambda_zero():
    table = T.table1_chosen(_sweep())
    tiny = table.set_index("model").loc["tiny"]
    assert tiny["lambda"] == 10 and tiny["active_params"] == 200_000 and tiny["r"] == 0.93
    assert tiny["mask_size"] == 3_000_000
    assert tiny["active_percent"] == pytest.approx(6.67)
    strict = T.table1_chosen(_sweep(), tolerance=0.015)
    assert strict.set_index("model").loc["tiny", "lambda"] == 1


def test_table1_agrees_with_search_choose_subnetwork():
    search = pytest.importorskip("bigram_circuits.search")
    sweep = _sweep()
    for lambdas in ([0, 1, 10, 100, 1000], [1, 10, 100]):  # with and without a lambda = 0 run
        part = sweep[(sweep["model"] == "tiny") & sweep["lambda"].isin(lambdas)]
        native = part.rename(columns={"active_params": "n_params", "r": "bigram_r"})
        expected = search.choose_subnetwork(native.reset_index(drop=True))
        assert T.table1_chosen(part).loc[0, "lambda"] == expected["lambda"]


def test_from_search_sweep_renames_columns_for_fig1():
    native = pd.DataFrame(
        {"lambda": [0.0, 10.0], "n_params": [1000, 10], "bigram_r": [0.9, 0.8], "chosen": [False, True]}
    )
    rows = T.from_search_sweep(native, "default", mask_size=5000)
    assert rows.columns.tolist() == ["model", "lambda", "active_params", "r", "mask_size"]
    assert len(P.fig1_r_vs_params(rows).data) == 1


def test_table2_orders_conditions_like_the_paper():
    rows = pd.DataFrame(
        {"condition": ["embeddings + linear map", "bigram subnetwork", "full model"], "r": [0.81234, 0.95, 0.7]}
    )
    table = T.table2_bigram_r(rows)
    assert table["condition"].tolist() == ["full model", "bigram subnetwork", "embeddings + linear map"]
    assert table["r"].tolist() == [0.7, 0.95, 0.812]
    by_model = T.table2_bigram_r(rows.assign(model="tiny"))
    assert by_model.columns.tolist() == ["condition", "tiny"]


def test_table3_formats_overlap_rows():
    rows = pd.DataFrame(
        [
            {
                "pair": "bigram vs optimal",
                "fraction_overlap": 0.0123,
                "expected": 0.00123,
                "ratio": 10.0,
                "p_value": 0.0,
                "frac_a_in_b": 0.5,
                "expected_frac_a_in_b": 0.05,
                "n_random": 10_000,
            }
        ]
    )
    table = T.table3_overlap(rows)
    assert table.loc[0, "p"] == "< 1e-04"
    assert table.loc[0, "% of A in B"] == 50.0 and table.loc[0, "expected % of A in B"] == 5.0


def test_table3_accepts_overlap_module_output():
    overlap = pytest.importorskip("bigram_circuits.circuits.overlap")
    import torch

    a = {"blocks.0.mlp.hook_post": torch.tensor([True, True, False, False] * 8)}
    b = {"blocks.0.mlp.hook_post": torch.tensor([True, False, True, False] * 8)}
    table = T.table3_overlap(overlap.overlap_table({"a vs b": (a, b)}, n_random=200))
    assert table.loc[0, "overlap"] == pytest.approx(0.25)


def test_table4_orders_and_flattens_generations():
    rows = pd.DataFrame(
        {
            "prompt": ["The", "The", "A"],
            "condition": ["bigram ablated", "full model", "full model"],
            "text": ["the the the", "The cat\nsat", "A dog"],
        }
    )
    table = T.table4_generations(rows)
    assert table["condition"].tolist() == ["full model", "bigram ablated", "full model"]
    assert table.loc[0, "text"] == "The cat sat"
    # evaluate.generate_table names the column "generation"
    renamed = T.table4_generations(rows.rename(columns={"text": "generation"}))
    assert renamed.equals(table)


def test_to_markdown_escapes_pipes_and_groups_thousands():
    text = T.to_markdown(pd.DataFrame({"name": ["a|b"], "params": [1234567], "r": [0.98765]}))
    assert "a\\|b" in text and "1,234,567" in text and "0.988" in text
    assert text.splitlines()[1].startswith("|:")


def test_human_count_matches_paper_style():
    assert [P.human_count(x) for x in (7.24e6, 905_000, 1.38e9, 999_950, 512)] == [
        "7.24M",
        "905k",
        "1.38B",
        "1M",
        "512",
    ]


# ----------------------------------------------------------------------------- saving


def test_save_figure_writes_html_atomically(tmp_path):
    fig = P.fig3_rotation(_lens())
    written = P.save_figure(fig, tmp_path / "sub" / "fig3", png=False)
    assert written == [tmp_path / "sub" / "fig3.html"]
    assert "plotly" in written[0].read_text()[:5000].lower()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["fig3.html"]  # no temp files left


def test_save_figure_directory_mode_shares_one_plotly_bundle(tmp_path):
    fig = P.fig3_rotation(_lens())
    P.save_figure(fig, tmp_path / "a", png=False, include_plotlyjs="directory")
    P.save_figure(fig, tmp_path / "b", png=False, include_plotlyjs="directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "plotly.min.js"]
    assert (tmp_path / "a.html").stat().st_size < 100_000


def test_save_figure_without_browser_warns_once_and_keeps_html(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_png_failure", None)

    def no_browser(*args, **kwargs):
        raise RuntimeError("Kaleido v1 and later requires Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    fig = P.fig3_rotation(_lens())
    with pytest.warns(RuntimeWarning, match="PNG export needs Chromium"):
        written = P.save_figure(fig, tmp_path / "fig")
    assert written == [tmp_path / "fig.html"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second figure skips PNG silently
        assert P.save_figure(fig, tmp_path / "fig2") == [tmp_path / "fig2.html"]


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="PNG export needs /usr/bin/chromium")
def test_save_figure_writes_png_with_chromium(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_png_failure", None)
    # Unset BROWSER_PATH for this test only (setenv records the original state to restore).
    monkeypatch.setenv("BROWSER_PATH", "unset-below")
    monkeypatch.delenv("BROWSER_PATH")
    written = P.save_figure(P.fig4_similarity(_matrices()), tmp_path / "fig4", scale=1)
    assert os.environ["BROWSER_PATH"] == "/usr/bin/chromium"
    assert [p.name for p in written] == ["fig4.html", "fig4.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _finish_png_threads() -> None:
    """Join the export threads a test left blocked (after it released them)."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "save_figure-png":
            thread.join(5)


def test_save_figure_gives_up_on_a_hung_png_export_and_keeps_the_html(tmp_path, monkeypatch):
    """A Chromium that never answers does not hang the caller: after ``png_timeout`` the HTML is
    there, the PNG is not, one FigureExportWarning says so, and later figures skip PNG."""
    import threading

    from bigram_circuits.errors import FigureExportWarning

    monkeypatch.setattr(P, "_png_failure", None)
    release = threading.Event()
    monkeypatch.setattr(go.Figure, "to_image", lambda *args, **kwargs: release.wait(30) and b"late")
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    try:
        with pytest.warns(FigureExportWarning, match=r"fig\.png not written: .*did not finish in 0\.05 s"):
            written = P.save_figure(fig, tmp_path / "fig", png_timeout=0.05)
        assert written == [tmp_path / "fig.html"]
        assert (tmp_path / "fig.html").read_text().rstrip().endswith("</html>")
        assert not (tmp_path / "fig.png").exists()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the next figure skips PNG without a second warning
            assert P.save_figure(fig, tmp_path / "next", png_timeout=0.05) == [tmp_path / "next.html"]
    finally:
        release.set()
        _finish_png_threads()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "next.html"]  # no temp files


def test_save_figure_hands_on_the_exporters_error(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_png_failure", None)

    def broken(*args, **kwargs):
        raise ValueError("kaleido broke")

    monkeypatch.setattr(go.Figure, "to_image", broken)
    with pytest.warns(RuntimeWarning, match="PNG export needs Chromium"):
        assert P.save_figure(go.Figure(), tmp_path / "fig", png_timeout=5.0) == [tmp_path / "fig.html"]
    assert P._png_failure == "ValueError: kaleido broke"


def test_threads_saving_the_same_figure_path_at_once_each_leave_whole_files(tmp_path, monkeypatch):
    """Four threads write one path at the same moment: none fails, both files are whole, and no
    temporary file is left."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(P, "_png_failure", None)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 50_000
    monkeypatch.setattr(go.Figure, "to_image", lambda *args, **kwargs: png)
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    start = threading.Barrier(4)

    def save(_: int) -> list[Path]:
        start.wait(5)
        return P.save_figure(fig, tmp_path / "same", include_plotlyjs="directory", png_timeout=10.0)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(save, range(4)))
    assert results == [[tmp_path / "same.html", tmp_path / "same.png"]] * 4
    assert (tmp_path / "same.png").read_bytes() == png
    html = (tmp_path / "same.html").read_text()
    assert html.count("<html>") == 1 and html.rstrip().endswith("</html>")  # one whole page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotly.min.js", "same.html", "same.png"]


_SAVE_IN_A_PROCESS = """
import sys, time
from pathlib import Path
import plotly.graph_objects as go
from bigram_circuits.plots import figures as P
go.Figure.to_image = lambda self, **kwargs: b"\\x89PNG\\r\\n\\x1a\\n" + sys.argv[2].encode() * 20_000
fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0], name=sys.argv[2]))
ready = Path(sys.argv[3])
(ready / sys.argv[2]).touch()
while len(list(ready.iterdir())) < 2:  # start together, once both interpreters are up
    time.sleep(0.005)
for _ in range(5):
    assert len(P.save_figure(fig, sys.argv[1], include_plotlyjs="directory", png_timeout=30.0)) == 2
"""


def test_two_processes_saving_the_same_figure_path_at_once_do_not_crash_each_other(tmp_path):
    """Two processes write the same figure path five times each, starting together: both exit 0
    and the files are whole, each process's version of them (per-process temp names, renames)."""
    import subprocess
    import sys

    ready = tmp_path.parent / f"{tmp_path.name}_ready"
    ready.mkdir()
    base = str(tmp_path / "same")
    runs = [
        subprocess.Popen([sys.executable, "-c", _SAVE_IN_A_PROCESS, base, name, str(ready)], stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()[-2000:]
    assert (tmp_path / "same.png").read_bytes() in {b"\x89PNG\r\n\x1a\n" + c * 20_000 for c in (b"a", b"b")}
    html = (tmp_path / "same.html").read_text()
    assert html.rstrip().endswith("</html>") and ('"name":"a"' in html) != ('"name":"b"' in html)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotly.min.js", "same.html", "same.png"]


# ----------------------------------------------------------------------------- figures_command


@pytest.mark.slow
def test_figures_command_writes_everything_then_redraws_from_cache(
    tmp_path, tiny_figures_model, tiny_figures_config, monkeypatch
):
    model_dir, corpus = tiny_figures_model
    config = tiny_figures_config(corpus)
    out, cache = tmp_path / "figures", tmp_path / "figures_cache"
    written = A.figures_command(str(model_dir), out, cache, config=config, png=False, show_progress=False)
    names = {p.name for p in written}
    for figure in ("fig1_r_vs_params", "fig2_training_dynamics", "fig3_rotation", "fig4_similarity", "fig5_optimal"):
        assert f"{figure}.html" in names
    assert {"table1_chosen.csv", "table3_overlap.csv", "table4_generations.csv", "tables.md"} <= names
    assert (out / "plotly.min.js").exists()
    assert all(p.exists() for p in written)
    tables = (out / "tables.md").read_text()
    assert "Table 2" in tables and "subnetwork at random init" in tables and "Pythia 1B" in tables
    table2 = pd.read_csv(out / "table2_bigram_r.csv")
    assert list(table2["condition"]) == [
        "full model",
        "bigram subnetwork",
        "subnetwork at random init",
        "random init + trained embeddings",
        "empty subnetwork + embeddings",
        "embeddings + linear map",
    ]
    assert table2["r"].between(-1, 1).all()
    ckpt = pd.read_csv(out / "table1_chosen.csv")
    assert ckpt.loc[0, "mask_size"] > ckpt.loc[0, "active_params"] >= 0
    headline = pd.read_csv(out / "table_headline_seeds.csv")
    assert list(headline["seed"].astype(str)) == ["0", "1", "mean ± sd"]
    assert " ± " in headline["r"].iloc[-1] and "Headline over seeds" in tables

    # Everything is cached: a second run redraws without loading the model.
    from bigram_circuits import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although every result is cached")

    monkeypatch.setattr(models, "load_model", no_loading)
    again = A.figures_command(str(model_dir), out, cache, config=config, png=False, show_progress=False)
    assert {p.name for p in again} == names


def test_table_headline_adds_a_mean_sd_row():
    rows = pd.DataFrame({"seed": [0, 1, 2], "active_params": [10, 12, 14], "r": [0.9, 0.92, 0.94]})
    table = T.table_headline(rows)
    assert list(table["seed"]) == [0, 1, 2, "mean ± sd"]
    assert table["active_params"].iloc[-1] == "12 ± 2" and table["r"].iloc[-1] == "0.92 ± 0.02"
    assert table["active_params"].iloc[0] == "10" and table["r"].iloc[1] == "0.92"


def test_figures_default_to_weight_masks():
    assert A.FiguresConfig().granularities == ("weight",)
    assert A.FiguresConfig().search_config().lr is None  # per granularity: weight logits 0.01


def test_figures_config_key_changes_with_settings():
    assert A.FiguresConfig().key() == A.FiguresConfig().key()
    assert A.FiguresConfig().key() != A.FiguresConfig(search=replace(A.FiguresConfig().search, max_steps=5)).key()
    # a search setting that is no figures option changes the key too; lam and seed (each run's) do not
    assert A.FiguresConfig().key() != A.FiguresConfig(search=replace(A.FiguresConfig().search, weight_decay=0)).key()
    assert A.FiguresConfig().key() == A.FiguresConfig(search=replace(A.FiguresConfig().search, lam=3.0)).key()
    # the search settings that were FiguresConfig's own fields hash flat, as before it nested SearchConfig
    # (so the caches made then are still found)
    config = A.FiguresConfig()
    flat = {name: value for name, value in asdict(config).items() if name != "search"}
    flat.update({name: getattr(config.search, name) for name in A._SEARCH_OPTIONS})  # seq_len, batch_size, ...
    assert config.key() == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:10]
