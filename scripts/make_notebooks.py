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

SEARCH_CELL = """from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search
from pathlib import Path

bridge, tokenizer = load_model("default")          # a TransformerLens 4 TransformerBridge
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
evaluation = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
# Weight masks (the paper's unit), lambda 10, 16 x 64-token batches, temperature x1.03 per step:
# decided in a few hundred steps (1-2 minutes on 2 CPU cores). The run is saved, so notebooks
# 01 and 02 share it and a rerun loads it.
root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists())
config = SearchConfig(lam=10.0, max_steps=400, batch_size=16, seq_len=64, temperature_growth=1.03, eval_batches=2)
result = search(bridge, train.windows(64, 2048), Target.bigram(stats), "weight", config,
                root / "runs" / "notebooks" / "weight_lambda_10", eval_windows=evaluation.windows(128, 64),
                show_progress=False)
subnetwork = result.subnetwork"""

QUICKSTART = [
    new_markdown_cell("""# 01 — Quickstart: find and inspect a bigram subnetwork

A *bigram subnetwork* is a small set of a model's weights that, with everything else removed,
predicts the next token from the current token alone (Chang & Bergen 2025). This notebook loads
the bundled default model, counts bigram statistics of its corpus, searches a **weight-mask**
subnetwork (one mask entry per attention / MLP weight, the paper's unit), and shows the paper's
headline: about 1% of the weights, bigram r above 0.95, and removing it hurts the model far
more than removing a random subnetwork of the same shape."""),
    new_code_cell(SETUP),
    new_code_cell(SEARCH_CELL),
    new_markdown_cell("What does the bigram distribution predict after a token?"),
    new_code_cell("""token = tokenizer.encode(" United")[0]
stats.top_k(token, k=5, tokenizer=tokenizer)"""),
    new_markdown_cell("""## The subnetwork
Loss = soft cross-entropy against P(next | current) + lambda x (mean soft mask). Metrics are
measured with the **binary** mask that is returned and saved, never the soft one; r is on
held-out text."""),
    new_code_cell("""{k: result.metrics[k] for k in ("n_params", "n_params_total", "percent_params", "bigram_r", "steps",
                                   "stop_reason")}"""),
    new_code_cell(
        """result.history[["step", "loss", "target_loss", "soft_density", "temperature", "undecided"]].tail()"""
    ),
    new_markdown_cell("Where does it live? The first MLP holds most of it."),
    new_code_cell("""subnetwork.layer_distribution()"""),
    new_markdown_cell("""## Removing it vs removing a random subnetwork of the same shape
`ablation_table` measures the full model, the subnetwork alone, the model without it, and the
same for random subnetworks with the same number of weights in every matrix (three seeds)."""),
    new_code_cell("""from bigram_circuits.evaluate import ablation_table

ablation = ablation_table(bridge, stats, evaluation.windows(128, 64), subnetwork, seeds=(0, 1, 2), show_progress=False)
print("removing the bigram subnetwork costs", round(ablation.attrs["loss_increase_ratio"], 1),
      "x the loss increase of removing a random one")
ablation[["condition", "active_params", "lm_loss_nats", "lm_loss_nats_std", "loss_increase", "r_dropped"]]"""),
    new_markdown_cell("## Keep only the subnetwork, or remove it, inside a `with` block"),
    new_code_cell("""from bigram_circuits.evaluate import generate
prompt = "The President of the United States"
{mode: generate(bridge, tokenizer, prompt, (subnetwork, mode), temperature=0, max_new_tokens=12)
 for mode in ("keep", "ablate")}"""),
    new_code_cell("""ids = tokenizer("The President of the United", return_tensors="pt")["input_ids"]
with subnetwork.applied(bridge, mode="keep"):
    logits = bridge(ids)
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

Compare the full model, its weight-mask bigram subnetwork and a random same-shape subnetwork
with the circuits module. The subnetwork is notebook 01's search (loaded when 01 ran first)."""),
    new_code_cell(SETUP),
    new_code_cell(
        SEARCH_CELL
        + """
bigram = subnetwork
random = bigram.random_control(seed=0)
windows = evaluation.windows(128, 24)"""
    ),
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
    new_code_cell("""from bigram_circuits.plots import fig3_rotation
fig3_rotation(lens)"""),
    new_markdown_cell("## Layer covariance similarity"),
    new_code_cell("""from bigram_circuits.circuits import layer_covariance_similarity
layer_covariance_similarity(bridge, windows[:8], n_tokens=1024, progress=False).round(3)"""),
    new_markdown_cell("""## Activation patching
Patch the residual stream of a clean prompt into a corrupted one, layer by layer, and measure
the logit difference between the clean and the corrupted answer."""),
    new_code_cell("""from bigram_circuits.circuits import patch, logit_difference
from bigram_circuits.plots import patching_heatmap
clean = tokenizer("The President of the United States", return_tensors="pt")["input_ids"]
corrupted = tokenizer("The President of the French Republic", return_tensors="pt")["input_ids"]
n = min(clean.shape[1], corrupted.shape[1])
clean, corrupted = clean[:, :n], corrupted[:, :n]
answer, wrong = tokenizer.encode(" States")[0], tokenizer.encode(" Republic")[0]
table = patch(bridge, clean, corrupted, "resid_pre", logit_difference(answer, wrong), positions="each")
patching_heatmap(table)"""),
    new_markdown_cell("""## Sufficiency: add induction heads to the bigram subnetwork
Loss on the second half of repeated random token sequences: bigram subnetwork only, bigram +
the strongest induction heads (their Q/K/V/O weights switched on), and the full model. The
default model has no real induction heads (best score about .02), so expect little; notebook 04
builds up circuits on SmolLM2-135M's results."""),
    new_code_cell("""from bigram_circuits.circuits import find_induction_heads, sufficiency, RepeatedSequenceLoss
heads, scores = find_induction_heads(bridge, V, top_k=2)
scores.head()"""),
    new_code_cell("""sufficiency(bridge, bigram, heads, RepeatedSequenceLoss(V, seq_len=32, n_sequences=16))"""),
]

FIGURES = [
    new_markdown_cell("""# 03 — Paper figures from results

Every figure function takes a DataFrame of results and returns a plotly figure, so a figure can
be drawn from any run. This notebook redraws the paper's figures from the committed results of
`make figures` (weight masks on the default model; `figures/data/*.csv` are the figures' input
tables), then runs one small live sweep to show where those tables come from."""),
    new_code_cell(SETUP),
    new_code_cell("""from pathlib import Path
from bigram_circuits import plots as P, tables as T

root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists())
data = root / "figures" / "data"
read = lambda name, **kw: pd.read_csv(data / f"{name}.csv", **kw)
sweep_rows = read("bigram_sweep")
P.fig1_r_vs_params(sweep_rows)"""),
    new_code_cell("""T.table1_chosen(sweep_rows)"""),
    new_markdown_cell("Headline numbers of the chosen lambda over three search seeds (mean ± sd in the last row):"),
    new_code_cell("""T.table_headline(read("headline_seeds"))"""),
    new_code_cell("""P.fig2_training_dynamics(read("checkpoint_r"), read("checkpoint_layer_share"))"""),
    new_code_cell(
        """P.fig_layer_distribution(read("layer_distribution"), "Where the chosen bigram subnetwork sits")"""
    ),
    new_code_cell("""P.fig3_rotation(read("lens"))"""),
    new_code_cell(
        """P.fig4_similarity({name: read(f"similarity_{name}", index_col=0) for name in ("full", "bigram", "random")})"""
    ),
    new_code_cell("""ablation = read("ablation").rename(columns={"lm_loss_nats": "loss", "lm_loss_nats_std": "loss_std"})
ablation = ablation[ablation["condition"].isin(["full model", "random ablated", "bigram ablated", "optimal ablated"])]
P.fig5_optimal(read("optimal_sweep"), ablation)"""),
    new_code_cell("""T.table2_bigram_r(read("bigram_r_rows"))"""),
    new_code_cell("""T.table3_overlap(read("overlap"))"""),
    new_code_cell("""T.table4_generations(read("generations"))"""),
    new_markdown_cell("""## Where the tables come from: a small live sweep
A two-lambda weight-mask sweep (short settings; `make figures` runs five lambdas, the optimal
subnetworks, the training checkpoints and the baselines)."""),
    new_code_cell("""from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, sweep
import tempfile

bridge, tokenizer = load_model("default")
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
evaluation = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
config = SearchConfig(max_steps=60, batch_size=8, seq_len=64, temperature_growth=1.08, stability_check=False,
                      eval_batches=2)
table = sweep(bridge, train.windows(64, 512), Target.bigram(stats), [0.0, 10.0], "weight", config,
              tempfile.mkdtemp(), eval_windows=evaluation.windows(64, 32), show_progress=False)
live = T.from_search_sweep(table, "default (live, 60 steps)")
P.fig1_r_vs_params(pd.concat([sweep_rows, live], ignore_index=True))"""),
]


BUILD_UP = [
    new_markdown_cell("""# 04 — Circuits built on the bigram base

The bigram subnetwork is a minimal circuit: it predicts the next token from the current one.
Here we *build up* from it: find candidate circuits (attention heads) with three methods, switch
them on in the bigram subnetwork, and measure how much of the full model's behaviour they bring
back, against random heads of the same count and layers. Behaviours: in-context repetition
(loss on the second copy of repeated random tokens) and copying a name from earlier in the
prompt. Everything runs on the bundled default model with small settings; it has no induction
heads (best induction score about .02), so expect small effects here. The SmolLM2-135M numbers
at the end come from the committed results file of `benchmarks/buildup_smollm2.py`."""),
    new_code_cell(SETUP),
    new_code_cell("""from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.data import load_token_dataset
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search

bridge, tokenizer = load_model("default")
V = model_vocab_size(bridge, tokenizer)
train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
stats = BigramStats.from_tokens(train, V, show_progress=False)
config = SearchConfig(lam=10.0, max_steps=30, batch_size=8, stability_check=False, eval_batches=2)
bigram = search(bridge, train.windows(128, 256), Target.bigram(stats), ("weight",), config,
                show_progress=False).subnetwork     # a weight-mask bigram subnetwork (short search)
bigram.summary()"""),
    new_markdown_cell("""## Two behaviours, each with clean and corrupted prompts
`RepetitionTask`: clean = random tokens repeated twice, corrupted = the same second half after a
different first half (nothing to copy). `NameCopyingTask`: "When A and B went to the store, B
gave a drink to" -> " A"; corrupted = the first two names replaced by two others."""),
    new_code_cell("""from bigram_circuits.circuits.tasks import RepetitionTask, NameCopyingTask
repetition = RepetitionTask(V, seq_len=16, n_sequences=8, batch_size=8)
names = NameCopyingTask(tokenizer, n_prompts=12)
print(names.texts[0], "| names usable as one token:", names.names)
{"repetition (full model)": repetition(bridge), "names (full model)": names(bridge)}"""),
    new_markdown_cell("""## Candidates from three methods
Head scores (attention patterns on repeated random tokens), TransformerLens 4.3's own
attribution patching (`transformer_lens.tools.analysis.attribution_patch`, node level) and
activation patching. Each returns a `Candidate` that carries the score of every head, so
`candidate.top_k(k)` cuts it."""),
    new_code_cell("""from bigram_circuits.circuits.candidates import (head_score_candidates, attribution_scores, patching_scores,
    candidate_from_scores, candidate_agreement, method_head_table, transformer_lens_version)
head_candidates, scores = head_score_candidates(bridge, V, n_induction=3, n_previous=2, seq_len=16, n_sequences=8)
attribution = attribution_scores(bridge, repetition, n_examples=4)
patching = patching_scores(bridge, repetition, n_examples=4)
candidates = {
    "induction heads": head_candidates["induction heads"],
    "induction + previous-token": head_candidates["induction + previous-token"],
    "attribution top 3": candidate_from_scores(attribution, "attribution top 3", 3, method="attribution patching"),
    "patching top 3": candidate_from_scores(patching, "patching top 3", 3, method="activation patching"),
}
print("transformer-lens", transformer_lens_version())
scores.head()"""),
    new_code_cell(
        """candidate_agreement(candidates)[["a", "b", "shared", "jaccard", "shared_heads", "spearman"]].round(3)"""
    ),
    new_code_cell("""method_head_table(candidates).round(3).head(8)"""),
    new_markdown_cell("""## Build-up: base, base + candidate, base + random heads, full model
Recovered fraction = (m - m_base) / (m_full - m_base): 0 is the bigram subnetwork alone, 1 the full
model."""),
    new_code_cell("""from bigram_circuits.circuits.buildup import build_up, summarize_build_up, build_up_report
table = build_up(bridge, bigram, candidates, repetition, seeds=(0, 1, 2), progress=False)
report = build_up_report(summarize_build_up(table))
report[["candidate", "heads", "base_value", "with_candidate", "full_value", "recovered",
        "random_recovered", "random_recovered_std", "full_minus_recovered"]].round(3)"""),
    new_markdown_cell("Name copying, with candidates found by patching on the name prompts:"),
    new_code_cell("""name_candidates = {
    "induction + previous-token": head_candidates["induction + previous-token"],
    "attribution top 3": candidate_from_scores(attribution_scores(bridge, names, n_examples=4), "attribution top 3", 3),
    "patching top 3": candidate_from_scores(patching_scores(bridge, names, n_examples=4), "patching top 3", 3),
}
name_table = build_up(bridge, bigram, name_candidates, names, seeds=(0, 1, 2), progress=False)
build_up_report(summarize_build_up(name_table))[["candidate", "base_value", "with_candidate", "full_value",
                                                 "recovered", "random_recovered"]].round(3)"""),
    new_code_cell("""from bigram_circuits.plots import fig_build_up
fig_build_up(summarize_build_up(pd.concat([table, name_table], ignore_index=True)))"""),
    new_markdown_cell("""## Does the bigram subnetwork already hold these circuits?
Weight-level overlap (a head = its W_Q/W_K/W_V rows and W_O columns) with the exact per-matrix
null, and where the candidates sit per layer."""),
    new_code_cell("""from bigram_circuits.circuits.overlap import circuit_overlap, circuit_placement
circuit_overlap(bigram, candidates, bridge, n_random=1000)[
    ["candidate", "circuit_weights", "circuit_in_base", "expected_circuit_in_base", "random_heads_in_base", "p_value_text"]].round(3)"""),
    new_code_cell("""placement = circuit_placement(bigram, candidates, bridge)
placement[placement["heads"] > 0][["candidate", "layer", "head_labels", "circuit_in_base", "base_attn_fraction_kept"]].round(3)"""),
    new_markdown_cell("""## Your own candidate
Any set of heads (and neurons) is a `Candidate`; the same calls measure it."""),
    new_code_cell("""from bigram_circuits.circuits import Candidate
mine = Candidate("my heads", heads=[(1, 3), (2, 5)])
summarize_build_up(build_up(bridge, bigram, {"my heads": mine}, repetition, seeds=(0,), necessity=False,
                            progress=False))[["condition", "candidate", "value", "recovered"]].round(3)"""),
    new_markdown_cell("""## SmolLM2-135M (from the committed results)
`python benchmarks/buildup_smollm2.py` runs the same experiments on SmolLM2-135M with its
weight-mask bigram subnetwork and its optimal subnetwork as bases."""),
    new_code_cell("""import json
from pathlib import Path
root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "benchmarks").is_dir())
path = root / "benchmarks" / "results" / "buildup_smollm2.json"
if path.exists():
    smol = json.loads(path.read_text())
    smol_report = pd.DataFrame(smol["tables"]["build_up_report"])
    display(pd.DataFrame(smol["tables"]["candidates"]))
    display(smol_report[["task", "base", "candidate", "heads", "base_value", "with_candidate", "full_value",
                         "recovered", "random_recovered", "random_recovered_std"]].round(3))
else:
    print("no SmolLM2 results yet: run python benchmarks/buildup_smollm2.py")"""),
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
    write("04_build_up.ipynb", BUILD_UP)
