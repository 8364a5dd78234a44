"""Write the tutorial notebooks (run once; the notebooks are committed, and tests execute them).

    python scripts/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """import os
os.environ.setdefault("TQDM_DISABLE", "1")  # quiet progress bars when executed by the tests
import numpy as np, pandas as pd, torch
pd.set_option("display.width", 140)
torch.manual_seed(0)"""

QUICKSTART = [
    new_markdown_cell("""# 01 — Quickstart: find and inspect a bigram subnetwork

A *bigram subnetwork* is a small set of a model's parameters that, with everything else
removed, predicts the next token from the current token alone (Chang & Bergen 2025).
This notebook loads the bundled default model, counts bigram statistics of its corpus, runs a
short mask search (MLP neurons + attention heads), and inspects the binary subnetwork.
Settings are small so the notebook runs in a few minutes on 2 CPU cores."""),
    new_code_cell(SETUP),
    new_code_cell("""from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats

bridge, tokenizer = load_model("default")          # a TransformerLens 4 TransformerBridge
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
evaluation = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
print(bridge.cfg.n_layers, "layers;", len(train), "train tokens;", V, "vocab")"""),
    new_markdown_cell("What does the bigram distribution predict after a token?"),
    new_code_cell("""token = tokenizer.encode(" United")[0]
stats.top_k(token, k=5, tokenizer=tokenizer)"""),
    new_markdown_cell("""## Search
Loss = soft cross-entropy against P(next | current) + lambda x (mask size). Metrics in the
result are measured with the **binary** mask, never the soft one."""),
    new_code_cell("""from bigram_circuits.search import SearchConfig, Target, search

config = SearchConfig(lam=10.0, max_steps=30, batch_size=8, seed=0, stability_check=False, eval_batches=2)
result = search(bridge, train.windows(128, 512), Target.bigram(stats), ("neuron", "head"), config,
                eval_windows=evaluation.windows(128, 32), show_progress=False)
subnetwork = result.subnetwork
{k: result.metrics[k] for k in ("n_params", "percent_params", "density", "bigram_r", "steps", "stop_reason")}"""),
    new_code_cell("""result.history[["step", "loss", "target_loss", "temperature"]].tail()"""),
    new_markdown_cell("Where does the subnetwork live? (parameters in the paper's unit: weights gated)"),
    new_code_cell("""subnetwork.layer_distribution()"""),
    new_markdown_cell("## Keep only the subnetwork, or ablate it, inside a `with` block"),
    new_code_cell("""from bigram_circuits.evaluate import evaluate_metrics

eval_windows = evaluation.windows(128, 16)
rows = {
    "full model": evaluate_metrics(bridge, stats, eval_windows, show_progress=False),
    "bigram only": evaluate_metrics(bridge, stats, eval_windows, subnetwork, "keep", show_progress=False),
    "bigram ablated": evaluate_metrics(bridge, stats, eval_windows, subnetwork, "ablate", show_progress=False),
}
pd.DataFrame(rows).T[["r_dropped", "soft_xent", "lm_loss_nats"]]"""),
    new_code_cell("""prompt = tokenizer("The President of the United", return_tensors="pt")["input_ids"]
with subnetwork.applied(bridge, mode="keep"):
    logits = bridge(prompt)
tokenizer.decode(logits[0, -1, :V].argmax())"""),
    new_markdown_cell("Save, reload, and export in the authors' mask-dict format."),
    new_code_cell("""import tempfile
from bigram_circuits.subnetwork import Subnetwork
with tempfile.TemporaryDirectory() as tmp:
    subnetwork.save(tmp)
    again = Subnetwork.load(tmp)
all(torch.equal(again.masks[k], subnetwork.masks[k]) for k in subnetwork.masks)"""),
]

CIRCUITS = [
    new_markdown_cell("""# 02 — Circuits: patching, lenses, similarity, sufficiency

Compare the full model, its bigram subnetwork and a random same-shape subnetwork with the
circuits module. A short search provides the subnetwork (see 01)."""),
    new_code_cell(SETUP),
    new_code_cell("""from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search

bridge, tokenizer = load_model("default")
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
evaluation = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
config = SearchConfig(lam=10.0, max_steps=30, batch_size=8, stability_check=False, eval_batches=2)
bigram = search(bridge, train.windows(128, 512), Target.bigram(stats), ("neuron", "head"), config,
                show_progress=False).subnetwork
random = bigram.random_control(seed=0)
windows = evaluation.windows(128, 24)"""),
    new_markdown_cell("## Logit lens (final norm + unembedding at every layer)"),
    new_code_cell("""from bigram_circuits.circuits import logit_lens
logit_lens(bridge, windows[:4], bigram_stats=stats, vocab_size=V, n_tokens=512, progress=False)"""),
    new_markdown_cell("""## Linear lens: rotation towards the input and the output
Ridge maps (alpha 1, intercept) from each layer's hidden states to the input embeddings and to
the last layer; rotation = median |angle| of the map's eigenvalues."""),
    new_code_cell("""from bigram_circuits.circuits import lens_report
lens = lens_report(bridge, tokenizer, windows, {"full": None, "bigram": bigram, "random": random},
                   n_tokens=2048, progress=False)
lens.head(12)"""),
    new_code_cell("""from bigram_circuits.figures import fig3_rotation
fig3_rotation(lens)"""),
    new_markdown_cell("## Layer covariance similarity"),
    new_code_cell("""from bigram_circuits.circuits import layer_covariance_similarity
layer_covariance_similarity(bridge, windows[:8], n_tokens=1024, progress=False).round(3)"""),
    new_markdown_cell("""## Activation patching
Patch the residual stream of a clean prompt into a corrupted one, layer by layer, and measure
the logit difference between the clean and the corrupted answer."""),
    new_code_cell("""from bigram_circuits.circuits import patch, logit_difference, patching_heatmap
clean = tokenizer("The President of the United States", return_tensors="pt")["input_ids"]
corrupted = tokenizer("The President of the French Republic", return_tensors="pt")["input_ids"]
n = min(clean.shape[1], corrupted.shape[1])
clean, corrupted = clean[:, :n], corrupted[:, :n]
answer, wrong = tokenizer.encode(" States")[0], tokenizer.encode(" Republic")[0]
table = patch(bridge, clean, corrupted, "resid_pre", logit_difference(answer, wrong), positions="each")
patching_heatmap(table)"""),
    new_markdown_cell("""## Sufficiency: add induction heads to the bigram subnetwork
Loss on the second half of repeated random token sequences: bigram subnetwork only, bigram +
the strongest induction heads, and the full model."""),
    new_code_cell("""from bigram_circuits.circuits import find_induction_heads, sufficiency, RepeatedSequenceLoss
heads, scores = find_induction_heads(bridge, V, top_k=2)
scores.head()"""),
    new_code_cell("""sufficiency(bridge, bigram, heads, RepeatedSequenceLoss(V, seq_len=32, n_sequences=16))"""),
]

FIGURES = [
    new_markdown_cell("""# 03 — Paper figures from results

Every figure function takes a DataFrame of results and returns a plotly figure, so a figure
can be drawn from any run. Here: a small lambda sweep on the default model (Fig 1 and Table 1),
the ablation table (Fig 5 right) and the layer distribution. `bigram-circuits figures` runs the
whole set with full settings."""),
    new_code_cell(SETUP),
    new_code_cell("""from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, sweep

bridge, tokenizer = load_model("default")
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
evaluation = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
config = SearchConfig(max_steps=25, batch_size=8, stability_check=False, eval_batches=2)
import tempfile
run_dir = tempfile.mkdtemp()
table = sweep(bridge, train.windows(128, 384), Target.bigram(stats), [0.0, 10.0, 100.0], ("neuron", "head"),
              config, run_dir, eval_windows=evaluation.windows(128, 16), show_progress=False)
table[["lambda", "n_params", "percent_params", "bigram_r", "chosen"]]"""),
    new_code_cell("""from bigram_circuits.figures import fig1_r_vs_params, table1_chosen
sweep_rows = table.assign(model="default", active_params=table["n_params"], r=table["bigram_r"])
fig1_r_vs_params(sweep_rows)"""),
    new_code_cell("""table1_chosen(sweep_rows)"""),
    new_code_cell("""from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.evaluate import ablation_table
chosen = Subnetwork.load(table.loc[table["chosen"], "path"].iloc[0])
ablation = ablation_table(bridge, stats, evaluation.windows(128, 16), chosen, seeds=(0, 1), show_progress=False)
ablation[["condition", "active_params", "lm_loss_nats", "loss_increase", "r_dropped"]]"""),
    new_code_cell("""from bigram_circuits.figures import fig_layer_distribution
print("loss increase ratio (bigram ablated / random ablated):", round(ablation.attrs["loss_increase_ratio"], 2))
fig_layer_distribution(chosen.layer_distribution())"""),
    new_markdown_cell("""Table 2: the chosen subnetwork against baselines. "random init + trained embeddings" is
a bigram search in the step-0 checkpoint after copying in the trained embedding, unembedding and
final norm; "embeddings + linear map" learns one `d_model x d_model` map between the trained
embeddings (tiny settings here)."""),
    new_code_cell("""import pandas as pd
from bigram_circuits.baselines import LinearMapConfig, fit_linear_map, transplant_embeddings
from bigram_circuits.figures import table2_bigram_r
from bigram_circuits.search import bigram_correlation, search

eval_windows = evaluation.windows(128, 16)
init, _ = load_model("default", checkpoint=0)
transplant_embeddings(init, bridge)
init_result = search(init, train.windows(128, 384), Target.bigram(stats), ("neuron", "head"),
                     SearchConfig(lam=10.0, max_steps=25, batch_size=8, stability_check=False, eval_batches=2),
                     show_progress=False)
linear = fit_linear_map(bridge, stats, train.windows(128, 384), LinearMapConfig(steps=60), show_progress=False)
rows = pd.DataFrame([
    {"condition": "full model", "r": bigram_correlation(bridge, stats, eval_windows)},
    {"condition": "bigram subnetwork", "r": bigram_correlation(bridge, stats, eval_windows, chosen)},
    {"condition": "random init + trained embeddings", "r": bigram_correlation(init, stats, eval_windows, init_result.subnetwork)},
    {"condition": "empty subnetwork + embeddings",
     "r": bigram_correlation(bridge, stats, eval_windows, Subnetwork.empty(bridge, ("neuron", "head")))},
    {"condition": "embeddings + linear map", "r": linear.evaluate(bridge, stats, eval_windows)["r_dropped"]},
])
table2_bigram_r(rows)"""),
]


def write(name: str, cells) -> None:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    HERE.mkdir(exist_ok=True)
    nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_circuits.ipynb", CIRCUITS)
    write("03_paper_figures.ipynb", FIGURES)
