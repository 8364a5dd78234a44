"""Bigram subnetwork of SmolLM2-135M (LLaMA-style, 30 layers) at weight masks (the paper's unit) on CPU.

    python benchmarks/smollm2_study.py --lambdas 0 1 10 --max-steps 350 --batch-size 8 --seq-len 64 \
        --time-budget-s 1500 --out runs/smollm2_weight

``--granularity neuron,head`` runs the coarser neuron + head masks instead.

The command line of :func:`bigram_circuits.app.study.run_study`, generated like the CLI's
(:mod:`bigram_circuits.app.options`): one option per :class:`~bigram_circuits.app.study.StudyConfig`
field and per search setting it exposes (same name, same default, the field's comment is the
help; paths default under the repository). The study loads SmolLM2-135M and its
tokenizer, counts (or reuses) bigram statistics of the default corpus's train split, runs a
short, resumable lambda sweep (checkpoints under ``--out``), and reports the chosen
subnetwork's r, size (attention + MLP weight entries), layer distribution, an ablation
comparison with a random same-shape subnetwork, sample generations, an optimal subnetwork at
``--optimal-lambda`` with its overlap (exact null), and the linear-lens rotation (Fig 3) and
covariance similarity (Fig 4) of full, bigram and random.

``--only-control NAME`` (one of ``--controls``) runs that control's search alone, at the lambda the
finished sweep in ``--out`` chose, and writes nothing else: the study then reuses it.

Writes ``benchmarks/results/smollm2_study.json`` and ``.md``. The search is far shorter than the
paper's (up to 15k steps): the result says whether it converged. Re-running with the same
``--out`` resumes the sweep from its checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.app.options import add_options, build, given
from bigram_circuits.app.study import StudyConfig, render_markdown, run_control, run_study, study_options
from bigram_circuits.io import atomic_write_bytes


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    """``--option`` per :class:`StudyConfig` field (its search settings flattened: ``--lr``);
    tuple fields take several values; a search setting not given is the ``--schedule``'s (or
    the study's size); paths not given are under the repository."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dests = add_options(parser, study_options(), lists="spaces")
    values = given(parser.parse_args(argv), dests)
    config = build(StudyConfig(schedule=values.get("schedule", StudyConfig.schedule)), values)
    paths = [f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), Path)]
    return dataclasses.replace(config, **{name: REPO / getattr(config, name) for name in paths if name not in values})


def main(argv: list[str] | None = None) -> dict:
    import torch

    torch.set_flush_denormal(True)  # before the thread pool exists (see bigram_circuits.search.flush_denormals)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--only-control" in argv:  # one control search, for running the study's searches side by side
        at = argv.index("--only-control")
        name, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
        row = run_control(parse_args(rest), name)
        print(json.dumps(row, indent=2, default=str))
        return row
    config = parse_args(argv)
    result = run_study(config)
    result["command"] = "python benchmarks/smollm2_study.py " + " ".join(argv)
    result["figures"] = [
        str(Path(p).relative_to(REPO)) if Path(p).is_relative_to(REPO) else p for p in result["figures"]
    ]
    config.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config.results.with_suffix(".json"), json.dumps(result, indent=2, default=str).encode("utf-8"))
    atomic_write_bytes(config.results.with_suffix(".md"), render_markdown(result).encode("utf-8"))
    print(
        json.dumps(
            {k: result[k] for k in ("full_model", "chosen", "loss_increase_ratio", "wall_time_s")},
            indent=2,
            default=str,
        )
    )
    return result


if __name__ == "__main__":
    from bigram_circuits.errors import BigramCircuitsError

    try:
        main()
    except BigramCircuitsError as exc:  # one line that says what to pass, not a traceback
        sys.exit(f"error: {' '.join(str(exc).split())}")
