"""The subnetwork viewer: its tables, the figure, the offline HTML page in a real headless Chromium,
and the ``view`` / ``push`` commands."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from huggingface_hub.hf_api import HfApi

from bigram_circuits.app.view import view, view_command
from bigram_circuits.circuits.overlap import overlap
from bigram_circuits.cli import main
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.viewdata import view_tables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _random(bridge, granularities, p: float, seed: int, metadata=None) -> Subnetwork:
    full = Subnetwork.full(bridge, granularities)
    gen = torch.Generator().manual_seed(seed)
    masks = {k: torch.rand(m.shape, generator=gen) < p for k, m in full.masks.items()}
    return full.with_masks(masks, metadata or {"config": {"lam": 10.0}, "metrics": {"bigram_r": 0.75}})


def test_view_tables_of_one_subnetwork(tiny_neox):
    bridge, _ = tiny_neox
    sub = _random(bridge, ("neuron", "head"), 0.5, seed=1)
    tables = view_tables(sub, names=["nh"])
    matrices = tables["matrices"]
    assert len(matrices) == sub.geometry.n_layers * 6 and set(matrices["matrix"]) == {"q", "k", "v", "o", "in", "out"}
    assert matrices["kept_params"].sum() == sub.n_params() and matrices["total_params"].sum() == sub.n_params_total()
    weights = sub.to_weight_masks()
    rows = tables["rows"]
    assert len(rows) == sum(m.shape[0] for m in weights.values())
    assert len(tables["columns"]) == sum(m.shape[1] for m in weights.values())
    units = tables["units"]
    assert units["kept"].sum() == sub.n_kept and set(units["kind"]) == {"neuron", "head"}
    metrics = dict(zip(tables["metrics"]["metric"], tables["metrics"]["value"]))
    assert metrics["lambda"] == 10.0 and metrics["bigram_r"] == 0.75 and metrics["n_params"] == sub.n_params()
    assert "overlap" not in tables


def test_overlap_per_block_uses_the_exact_null(tiny_neox):
    bridge, _ = tiny_neox
    a, b = _random(bridge, "weight", 0.3, seed=1), _random(bridge, "weight", 0.3, seed=2)
    tables = view_tables(a, b, n_random=500)
    table = tables["overlap"]
    assert len(table) == len(a.masks)
    for _, row in table.iterrows():
        ma, mb = a.masks[row["key"]], b.masks[row["key"]]
        assert row["kept_both"] == int((ma & mb).sum())
        assert row["expected"] == pytest.approx(int(ma.sum()) * int(mb.sum()) / ma.numel())
        assert 0.0 <= row["p_value"] <= 1.0
    total = tables["overlap_total"].iloc[0]
    assert total["fraction_overlap"] == pytest.approx(overlap(a, b, n_random=500).fraction_overlap)
    same = view_tables(a, a, names=["a", "again"], n_random=500)["overlap"]
    assert (same["ratio"] > 2).all() and (same["p_value"] == 0).all()  # identical masks: far above chance


def test_subnetworks_of_different_granularities_compare_on_weights(tiny_neox):
    bridge, _ = tiny_neox
    a, b = _random(bridge, "weight", 0.3, seed=1), _random(bridge, ("neuron", "head"), 0.5, seed=2)
    table = view_tables(a, b)["overlap"]
    assert table["size"].sum() == a.n_params_total()


def _run_dir(tmp_path: Path, sub: Subnetwork, name: str) -> Path:
    """A `find` run layout: lambda_* folders and a sweep.csv marking the chosen one."""
    run = tmp_path / name
    sub.save(run / "lambda_10")
    sub.complement().save(run / "lambda_0")
    pd.DataFrame({"lambda": [0.0, 10.0], "chosen": [False, True]}).to_csv(run / "sweep.csv", index=False)
    return run


def test_view_returns_a_figure_with_a_drill_down(tiny_neox, tmp_path):
    bridge, _ = tiny_neox
    a, b = _random(bridge, "weight", 0.3, seed=1), _random(bridge, ("neuron", "head"), 0.5, seed=2)
    fig = view(_run_dir(tmp_path, a, "run_a"), b)
    assert isinstance(fig, go.Figure)
    kinds = [trace.type for trace in fig.data]
    assert kinds.count("heatmap") == 2 + 2 and "table" in kinds and "bar" in kinds
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == a.geometry.n_layers * 6
    visible = buttons[3].args[0]["visible"]
    drills = [t for t, v in zip(fig.data, visible) if t.type == "scattergl" and v]
    assert {t.name.rsplit(" ", 1)[0] for t in drills} == {"run_a L0 o", "B L0 o"}
    table = next(t for t in fig.data if t.type == "table")
    assert "overlap / expected" in table.cells.values[0]


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into an array, with no imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6)
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros_like(line)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + up) % 256
        else:  # Sub, Average, Paeth depend on the left neighbour: one pixel at a time
            row = np.zeros_like(line)
            for x in range(line.size):
                left = row[x - channels] if x >= channels else 0
                upper_left = up[x - channels] if x >= channels else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up[x]) // 2
                else:
                    p = left + up[x] - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - upper_left)
                    predictor = left if pa <= pb and pa <= pc else up[x] if pb <= pc else upper_left
                row[x] = (line[x] + predictor) % 256
            out[y] = row
    return out.reshape(height, width, channels)[..., :3]


def chromium_screenshot(html: Path, png: Path, size: tuple[int, int] = (1200, 1600)) -> list[str]:
    """Open ``html`` in headless Chromium with every host unresolvable (nothing from the network),
    save a screenshot; returns the page's console lines that report an error."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--window-size={size[0]},{size[1]}",
            "--virtual-time-budget=15000",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert png.exists(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return [line for line in console if "Uncaught" in line or "Error" in line or "Failed to load" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (CI installs it: apt-get install chromium)")
def test_the_html_page_renders_offline_in_headless_chromium(tiny_neox, tmp_path):
    bridge, _ = tiny_neox
    a, b = _random(bridge, "weight", 0.3, seed=1), _random(bridge, ("neuron", "head"), 0.5, seed=2)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    page = view_command(tmp_path / "a", tmp_path / "b", out=tmp_path / "view.html")
    html = page.read_text(encoding="utf-8")
    assert "<script src=" not in html and "Plotly.newPlot" in html  # plotly.js is inline

    errors = chromium_screenshot(page, tmp_path / "view.png")
    assert errors == []
    pixels = _png_pixels(tmp_path / "view.png")
    background = np.median(pixels.reshape(-1, 3), axis=0)
    drawn = np.abs(pixels - background).sum(axis=2) > 30
    assert drawn.mean() > 0.05  # heatmaps, curves and bars were drawn, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 20

    broken = tmp_path / "broken.html"  # the check itself: a page whose script fails is caught
    broken.write_text("<html><body><p>x</p><script>notAFunction();</script></body></html>")
    assert chromium_screenshot(broken, tmp_path / "broken.png", (200, 200))


def test_cli_view_and_push(tiny_neox, tmp_path, monkeypatch, capsys):
    bridge, _ = tiny_neox
    run = _run_dir(tmp_path, _random(bridge, "weight", 0.3, seed=1), "run")
    out = tmp_path / "page.html"
    assert main(["view", str(run), str(run / "lambda_0"), "--out", str(out), "--n-random", "200"]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out

    sent = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: sent.update(repo=(repo_id, kw)))

    def create_commit(self, repo_id, operations, **kwargs):
        sent["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/x/commit/1"})()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert main(["push", str(run), "--repo", "someone/x", "--private"]) == 0
    assert sent["repo"] == ("someone/x", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert sorted(sent["files"]) == ["README.md", "masks.safetensors", "subnetwork.json"]
    assert sent["files"]["masks.safetensors"] == (run / "lambda_10" / "masks.safetensors").read_bytes()
    assert "commit/1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["view", "/no/such/run"], "neither a run or subnetwork directory"),
        (["push", "/no/such/run", "--repo", "someone/x"], "holds no subnetwork.json"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
