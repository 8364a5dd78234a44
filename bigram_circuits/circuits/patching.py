"""Activation patching between two runs of one bridge.

A patch goes from (clean tokens, clean run) into (corrupted tokens, corrupted run), a run
being a :class:`~bigram_circuits.runspec.RunSpec` (the full model, or a subnetwork kept or
ablated): clean vs corrupted prompts on the full model, or the full model vs the bigram
subnetwork on the same prompt, or any mix. Activations of the clean run are cached (under
the clean run's subnetwork, so they are what that run computes) and written into the
corrupted run (under its own subnetwork; the patch hook runs after any mask hook on the same
hook point, so the patched value is what downstream layers see).

The patching loop is TransformerLens' :func:`transformer_lens.patching.generic_activation_patch`
(it works on a ``TransformerBridge`` in TL 4.3); this module adds what it lacks: runs under a
subnetwork, single MLP neurons, and "all positions at once" for every component.

Components (hook points of a TransformerBridge):

=============  ===============================  =====================
component      hook                             unit axis
=============  ===============================  =====================
``resid_pre``  ``blocks.{L}.hook_resid_pre``    --
``attn_out``   ``blocks.{L}.hook_attn_out``     --
``mlp_out``    ``blocks.{L}.hook_mlp_out``      --
``head``       ``blocks.{L}.attn.hook_z``       head (dim 2)
``neuron``     ``blocks.{L}.mlp.hook_post``     neuron (dim 2)
=============  ===============================  =====================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer
from transformer_lens import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.patching import generic_activation_patch

from bigram_circuits.circuits.runs import RunLike, RunSpec, as_token_tensor
from bigram_circuits.errors import ConfigError, StatsError, TokenError
from bigram_circuits.masks import MaskKey

__all__ = [
    "COMPONENTS",
    "Component",
    "SoftTargets",
    "bigram_cross_entropy",
    "cache_run",
    "component_hook_name",
    "kl_to_reference",
    "logit_difference",
    "next_token_loss",
    "patch",
    "run_with_patches",
]

Metric = Callable[[torch.Tensor], Any]


@runtime_checkable
class SoftTargets(Protocol):
    """What :func:`bigram_cross_entropy` needs of its statistics (a
    :class:`~bigram_circuits.ngrams.BigramStats`): a next-token distribution to score logits against."""

    def soft_cross_entropy(self, logits: torch.Tensor, tokens: Any) -> Any:
        """Mean cross-entropy of ``logits`` [batch, pos, vocab] against P(. | token) of ``tokens``."""
        ...


@dataclass(frozen=True)
class Component:
    """A patchable activation: its TransformerLens short name and the unit it splits into."""

    name: str
    act_name: str  # the short name transformer_lens.utils.get_act_name expands
    hook_template: str
    unit: str | None  # "head" / "neuron": indexed on dim 2 of the activation

    def hook_name(self, layer: int) -> str:
        """The bridge hook point of this component at ``layer``."""
        return self.hook_template.format(layer=layer)

    def n_units(self, cfg: Any) -> int:
        """How many heads or neurons one layer has (0 for whole-vector components)."""
        if self.unit == "head":
            return int(cfg.n_heads)
        if self.unit == "neuron":
            return int(cfg.d_mlp)
        return 0


COMPONENTS: dict[str, Component] = {
    "resid_pre": Component("resid_pre", "resid_pre", "blocks.{layer}.hook_resid_pre", None),
    "attn_out": Component("attn_out", "attn_out", "blocks.{layer}.hook_attn_out", None),
    "mlp_out": Component("mlp_out", "mlp_out", "blocks.{layer}.hook_mlp_out", None),
    "head": Component("head", "z", MaskKey.hook_template("head"), "head"),
    "neuron": Component("neuron", "post", MaskKey.hook_template("neuron"), "neuron"),
}


def _component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ConfigError(f"unknown component {name!r}; choose one of {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def _check_hook_names(bridge: TransformerBridge, names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in bridge.hook_dict]
    if unknown:
        raise ConfigError(
            f"unknown hook name(s) {unknown[:3]} for this model; use names from bridge.hook_dict, "
            "e.g. blocks.0.hook_resid_pre"
        )


def component_hook_name(component: str, layer: int) -> str:
    """Hook point name of ``component`` at ``layer``, e.g. ``("head", 1) -> blocks.1.attn.hook_z``."""
    return _component(component).hook_name(layer)


@torch.no_grad()
def cache_run(
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, "batch pos"],
    run: RunLike = None,
    names: Sequence[str] | None = None,
) -> tuple[Float[torch.Tensor, "batch pos vocab"], ActivationCache]:
    """Logits and cached activations (``names``; all when None) of one run."""
    run = RunSpec.coerce(run)
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    if names is not None:
        _check_hook_names(bridge, list(names))
    with run.context(bridge):
        logits, cache = bridge.run_with_cache(tokens, names_filter=list(names) if names is not None else None)
    return logits, cache


@torch.no_grad()
def run_with_patches(
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, "batch pos"],
    patches: Mapping[str, torch.Tensor],
    run: RunLike = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits of a run with whole activations replaced: ``{hook_name: activation}``."""
    run = RunSpec.coerce(run)
    tokens = as_token_tensor(tokens, int(bridge.cfg.d_vocab))
    _check_hook_names(bridge, list(patches))

    def make_hook(value: torch.Tensor):
        def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            if activation.shape != value.shape:
                raise TokenError(
                    f"patch for {hook.name} has shape {tuple(value.shape)} but the run's activation is "
                    f"{tuple(activation.shape)}; clean and corrupted tokens must have the same shape"
                )
            return value.to(activation.device, activation.dtype)

        return replace

    with run.context(bridge):
        return bridge.run_with_hooks(tokens, fwd_hooks=[(name, make_hook(v)) for name, v in patches.items()])


def _patch_setter(axes: tuple[str, ...]):
    """A TL patch setter for an index row laid out as ``axes`` (layer first)."""
    has_pos = "pos" in axes
    has_unit = len(axes) == (3 if has_pos else 2)

    def setter(corrupted: torch.Tensor, index: Sequence[int], clean: torch.Tensor) -> torch.Tensor:
        patched = corrupted.clone()
        pos = int(index[1]) if has_pos else slice(None)
        if has_unit:
            unit = int(index[-1])
            patched[:, pos, unit] = clean[:, pos, unit].to(patched.device, patched.dtype)
        else:
            patched[:, pos] = clean[:, pos].to(patched.device, patched.dtype)
        return patched

    return setter


def _positions(positions: str | Sequence[int], n_positions: int) -> list[int] | None:
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions == "each":
            return list(range(n_positions))
        raise ConfigError(f"positions must be 'all', 'each' or a list of positions, got {positions!r}")
    chosen = [p % n_positions if -n_positions <= p < n_positions else p for p in positions]
    bad = [p for p in chosen if not 0 <= p < n_positions]
    if bad or not chosen:
        raise ConfigError(f"positions {list(positions)} are outside the {n_positions}-token prompt; pass ones in it")
    return chosen


def _index_frame(
    component: Component,
    cfg: Any,
    layers: Sequence[int],
    positions: list[int] | None,
    units: Sequence[int] | None,
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Rows of (layer[, pos][, unit]) to patch; ``unit`` is ``head_index`` or ``neuron``."""
    axes: list[str] = ["layer"]
    ranges: list[Sequence[int]] = [layers]
    if positions is not None:
        axes.append("pos")
        ranges.append(positions)
    if component.unit is not None:
        n_units = component.n_units(cfg)
        chosen = list(range(n_units)) if units is None else [int(u) for u in units]
        if not chosen or any(not 0 <= u < n_units for u in chosen):
            raise ConfigError(f"{component.unit} indices must be in [0, {n_units}); got {units}")
        axes.append("head_index" if component.unit == "head" else "neuron")
        ranges.append(chosen)
    grid = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(len(axes), -1).T
    return pd.DataFrame(grid, columns=axes), tuple(axes)


def _scalar(value: Any) -> float:
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1:
        raise ConfigError(f"a patching metric must return a scalar, got shape {tuple(tensor.shape)}; average it")
    return float(tensor.item())


@torch.no_grad()
def patch(
    bridge: TransformerBridge,
    clean_tokens: Integer[torch.Tensor, "batch pos"],
    corrupted_tokens: Integer[torch.Tensor, "batch pos"] | None,
    component: str,
    metric: Metric,
    positions: str | Sequence[int] = "all",
    *,
    clean_run: RunLike = None,
    corrupted_run: RunLike = None,
    layers: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Patch one component at a time from the clean run into the corrupted run.

    ``corrupted_tokens=None`` uses the clean tokens (e.g. full model -> bigram subnetwork on
    one prompt). ``positions``: ``"all"`` patches every position at once, ``"each"`` one
    position at a time, or a list of positions (one at a time). ``units`` restricts the heads
    or neurons patched. ``metric(logits) -> scalar`` sees the patched corrupted run's logits.
    The loop is TransformerLens' ``generic_activation_patch`` (with its progress bar).

    Returns one row per patch with columns ``component``, ``layer``, [``pos``],
    [``head`` | ``neuron``], ``hook``, ``metric`` and ``recovered`` =
    (metric - corrupted) / (clean - corrupted) (NaN when clean = corrupted). The unpatched
    values are in ``df.attrs["clean_metric"]`` and ``df.attrs["corrupted_metric"]``.
    """
    spec = _component(component)
    clean = as_token_tensor(clean_tokens, int(bridge.cfg.d_vocab))
    corrupted = clean if corrupted_tokens is None else as_token_tensor(corrupted_tokens, int(bridge.cfg.d_vocab))
    if clean.shape != corrupted.shape:
        raise TokenError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in shape; "
            "patching needs prompts of the same length"
        )
    n_layers = int(bridge.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise ConfigError(f"layers must be in [0, {n_layers}); got {layers}")
    clean_spec, corrupted_spec = RunSpec.coerce(clean_run), RunSpec.coerce(corrupted_run)
    index_df, axes = _index_frame(spec, bridge.cfg, layers, _positions(positions, clean.shape[1]), units)

    hook_names = [spec.hook_name(layer) for layer in layers]
    clean_logits, clean_cache = cache_run(bridge, clean, clean_spec, hook_names)
    clean_value = _scalar(metric(clean_logits))
    with corrupted_spec.context(bridge):
        corrupted_value = _scalar(metric(bridge(corrupted)))
        values = generic_activation_patch(
            bridge,
            corrupted,
            clean_cache,
            lambda logits: torch.as_tensor(_scalar(metric(logits))),
            _patch_setter(axes),
            spec.act_name,
            index_df=index_df,
        )
    table = index_df.rename(columns={"head_index": "head"}).astype("int64")
    table.insert(0, "component", spec.name)
    table["hook"] = [spec.hook_name(layer) for layer in table["layer"]]
    table["metric"] = values.detach().cpu().double().numpy()
    gap = clean_value - corrupted_value
    table["recovered"] = (table["metric"] - corrupted_value) / gap if gap != 0 else float("nan")
    table.attrs.update(
        clean_metric=clean_value,
        corrupted_metric=corrupted_value,
        clean_run=clean_spec.name,
        corrupted_run=corrupted_spec.name,
    )
    return table


# --------------------------------------------------------------------------- metrics


def _token_column(ids: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    tensor = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if tensor.numel() == 1:
        tensor = tensor.expand(batch)
    if tensor.numel() != batch:
        raise TokenError(f"expected one token id or one per prompt ({batch}), got {tensor.numel()}")
    return tensor


def logit_difference(
    correct: int | Sequence[int] | torch.Tensor,
    incorrect: int | Sequence[int] | torch.Tensor,
    position: int = -1,
) -> Metric:
    """Metric: mean over prompts of logit[correct] - logit[incorrect] at ``position``."""

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        last = logits[:, position]
        rows = torch.arange(last.shape[0])
        good = _token_column(correct, last.shape[0])
        bad = _token_column(incorrect, last.shape[0])
        return (last[rows, good] - last[rows, bad]).mean()

    return metric


def next_token_loss(tokens: Integer[torch.Tensor, "batch pos"], vocab_size: int | None = None) -> Metric:
    """Metric: mean cross-entropy (nats) of the actual next tokens of ``tokens``."""
    tokens = as_token_tensor(tokens)

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :-1, :vocab_size].double(), -1)
        return -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).mean()

    return metric


def bigram_cross_entropy(stats: SoftTargets, tokens: Integer[torch.Tensor, "batch pos"]) -> Metric:
    """Metric: soft cross-entropy of the logits against the bigram distribution of ``tokens``."""
    if not isinstance(stats, SoftTargets):
        raise StatsError("bigram_cross_entropy needs a BigramStats (with soft_cross_entropy)")
    tokens = as_token_tensor(tokens)

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        return torch.as_tensor(stats.soft_cross_entropy(logits, tokens))

    return metric


def kl_to_reference(
    reference_logits: Float[torch.Tensor, "batch pos vocab"],
    vocab_size: int | None = None,
    position: int | None = None,
) -> Metric:
    """Metric: mean KL(reference || patched) in nats, e.g. to the full model's output.

    ``position`` restricts to one position; ``None`` averages over every position.
    """
    reference = torch.log_softmax(reference_logits[..., :vocab_size].detach().double(), -1)
    if position is not None:
        reference = reference[:, position : position + 1 if position != -1 else None]

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        patched = logits[..., :vocab_size].double()
        if position is not None:
            patched = patched[:, position : position + 1 if position != -1 else None]
        logp = torch.log_softmax(patched, -1)
        if logp.shape != reference.shape:
            raise ConfigError(
                f"reference logits {tuple(reference.shape)} do not match the run's {tuple(logp.shape)}; "
                "compute them on the same prompts"
            )
        return (reference.exp() * (reference - logp)).sum(-1).mean()

    return metric


# --------------------------------------------------------------------------- plots
