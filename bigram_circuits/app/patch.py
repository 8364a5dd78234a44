"""``bigram-circuits patch``: activation patching between a clean and a corrupted prompt."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from bigram_circuits.circuits.patching import (
    COMPONENTS,
    cache_run,
    kl_to_reference,
    logit_difference,
    patch,
)
from bigram_circuits.circuits.runs import RunSpec
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import TokenError
from bigram_circuits.plots import patching_heatmap

__all__ = ["patch_command"]


def patch_command(
    model: str = "default",
    clean: str = "",  # the clean prompt
    corrupted: str = "",  # the corrupted prompt
    component: str = "resid_pre",  # the activation patched, in every layer
    run: str | os.PathLike | None = None,  # a run directory: patch with its subnetwork (and its model)
    out: str | os.PathLike | None = None,  # write the heatmap HTML here
    *,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """``bigram-circuits patch``: patch ``component`` from the clean prompt into the corrupted one.

    With ``run``, both prompts run under that run's bigram subnetwork (and its model; ``model``
    is then ignored). Whole-vector components are patched one position at a time, heads and
    neurons at all positions at once. Metric: the logit difference, at the last position,
    between the clean run's top token and the corrupted run's top token (the KL divergence to
    the clean output when both agree). ``out`` receives the heatmap (HTML).
    """
    from bigram_circuits.models import load_model, model_vocab_size

    device = resolve_device(device)  # once, before any work
    subnetwork = None
    if run is not None:
        from bigram_circuits.circuits.runs import load_run

        loaded = load_run(run, device=device)
        bridge, tokenizer, subnetwork = loaded.bridge, loaded.tokenizer, loaded.subnetwork
    else:
        bridge, tokenizer = load_model(model, device=device)
    vocab = model_vocab_size(bridge, tokenizer)

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.numel() == 0:
            raise TokenError("a prompt is empty; pass --clean and --corrupted text")
        return ids

    clean_tokens, corrupted_tokens = encode(clean), encode(corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise TokenError(
            f"the clean prompt has {clean_tokens.shape[1]} tokens and the corrupted one {corrupted_tokens.shape[1]}; "
            "use prompts of the same length in tokens"
        )
    spec = RunSpec(subnetwork, "keep", "bigram" if subnetwork is not None else "full")
    clean_logits, _ = cache_run(bridge, clean_tokens, spec, names=[])
    corrupted_logits, _ = cache_run(bridge, corrupted_tokens, spec, names=[])
    clean_top = int(clean_logits[0, -1, :vocab].argmax())
    corrupted_top = int(corrupted_logits[0, -1, :vocab].argmax())
    if clean_top != corrupted_top:
        metric = logit_difference(clean_top, corrupted_top)
        metric_name = f"logit[{tokenizer.decode([clean_top])!r}] - logit[{tokenizer.decode([corrupted_top])!r}]"
    else:
        metric = kl_to_reference(clean_logits, vocab, position=-1)
        metric_name = "KL(clean || patched) at the last position"
    positions = "all" if COMPONENTS.get(component, COMPONENTS["head"]).unit is not None else "each"
    table = patch(
        bridge,
        clean_tokens,
        corrupted_tokens,
        component,
        metric,
        positions,
        clean_run=spec,
        corrupted_run=spec,
    )
    table.attrs["metric_name"] = metric_name
    if out is not None:
        from bigram_circuits.plots import save_figure

        target = Path(out)
        save_figure(
            patching_heatmap(table, title=f"Activation patching: {component} ({metric_name})"),
            target.with_suffix("") if target.suffix == ".html" else target,
            png=False,
        )
    return table
