"""Baselines of Table 2 that are not subnetworks of the trained model.

Two of the paper's reference points for "how much of bigram prediction do the embeddings
alone explain?":

* **random init + trained embeddings** — the randomly initialised model (training step 0)
  with the trained model's token embedding, unembedding and final norm copied in
  (:func:`transplant_embeddings`); a bigram subnetwork is then searched in it as in any model.
* **embeddings + linear map** — the trained embedding, one learned ``d_model x d_model``
  linear map (plus bias), the final normalisation and the trained unembedding
  (:func:`fit_linear_map`): the best a single linear step between the two embedding spaces
  does, fitted to the same bigram target as the subnetwork search.

Everything except the linear map stays frozen. The map starts at the identity, i.e. at the
"empty subnetwork + embeddings" predictor of a rotary model, so fitting can only improve on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.devices import input_device
from bigram_circuits.errors import BaselineError, ConfigError
from bigram_circuits.evaluate import (
    TokenSurprisals,
    metrics_from_surprisals,
    surprisals_from_logits,
)
from bigram_circuits.models import frozen_parameters
from bigram_circuits.ngrams import BigramStats

__all__ = [
    "BaselineError",
    "LinearMapBaseline",
    "LinearMapConfig",
    "fit_linear_map",
    "transplant_embeddings",
]


def _embedding_parameters(bridge: TransformerBridge, include_final_norm: bool) -> dict[str, torch.nn.Parameter]:
    """Token embedding, unembedding (a tied pair appears once) and optionally final-norm
    parameters by name."""
    params: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    components = [("embed", bridge.embed), ("unembed", bridge.unembed)]
    if include_final_norm:
        components.append(("ln_final", bridge.ln_final))
    for prefix, component in components:
        for name, param in component.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params[f"{prefix}.{name}"] = param
    return params


@torch.no_grad()
def transplant_embeddings(target_bridge, source_bridge, include_final_norm: bool = True) -> list[str]:
    """Copy ``source_bridge``'s token embedding, unembedding and (by default) final norm into
    ``target_bridge`` in place.

    Used to build "random init + trained embeddings": ``target_bridge`` is the step-0
    checkpoint, ``source_bridge`` the trained model. The final norm comes along by default
    because it sits on the direct embedding -> unembedding path: without it the trained
    embeddings are read through an untrained scale (default model: the transplanted model's
    empty subnetwork has bigram r 0.05 without it, 0.16 with it; the trained model's, whose
    blocks' biases are trained too, 0.54). Every block's weights, its layernorms and positional
    embeddings keep the target's values. Returns the names of the copied parameters.
    """
    target = _embedding_parameters(target_bridge, include_final_norm)
    source = _embedding_parameters(source_bridge, include_final_norm)
    if target.keys() != source.keys():
        raise BaselineError(
            f"embedding parameters differ ({sorted(target)} vs {sorted(source)}); "
            "transplant between checkpoints of the same architecture"
        )
    for name, param in target.items():
        if param.shape != source[name].shape:
            raise BaselineError(
                f"{name} has shape {tuple(param.shape)} in the target but "
                f"{tuple(source[name].shape)} in the source; use checkpoints of one model"
            )
    for name, param in target.items():
        param.copy_(source[name].to(dtype=param.dtype, device=param.device))
    return sorted(target)


@dataclass(frozen=True)
class LinearMapConfig:
    """Training of the linear map: AdamW on the bigram soft cross-entropy of training positions."""

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not (np.isfinite(self.lr) and self.lr > 0) or not self.weight_decay >= 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


@dataclass
class LinearMapBaseline:
    """A fitted "embeddings + linear map" predictor: ``unembed(norm(embed(x) @ W + b))``."""

    weight: Float[torch.Tensor, "d_model d_model"]
    bias: Float[torch.Tensor, " d_model"]
    losses: list[float] = field(default_factory=list)
    config: LinearMapConfig = field(default_factory=LinearMapConfig)

    def logits(
        self, bridge: TransformerBridge, tokens: Integer[torch.Tensor, "batch pos"]
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Next-token logits of every position from its own token alone."""
        hidden = bridge.embed(tokens) @ self.weight + self.bias
        return bridge.unembed(bridge.ln_final(hidden))

    def surprisals(
        self, bridge: TransformerBridge, stats: BigramStats, windows: Integer[np.ndarray, "n seq"], batch_size: int = 16
    ) -> TokenSurprisals:
        """Model and bigram surprisal of every actual next token of ``windows``."""
        return surprisals_from_logits(
            lambda tokens: self.logits(bridge, tokens),
            stats,
            windows,
            self.weight.device,
            batch_size,
            desc="evaluate linear map",
            show_progress=False,
        )

    def evaluate(
        self, bridge: TransformerBridge, stats: BigramStats, windows: Integer[np.ndarray, "n seq"], batch_size: int = 16
    ) -> dict[str, float]:
        """The metric row of :func:`bigram_circuits.evaluate.evaluate_metrics` for this predictor."""
        return metrics_from_surprisals(self.surprisals(bridge, stats, windows, batch_size))


def fit_linear_map(
    bridge: TransformerBridge,
    stats: BigramStats,
    train_windows: Integer[np.ndarray, "n seq"],
    config: LinearMapConfig | None = None,
    show_progress: bool = True,
) -> LinearMapBaseline:
    """Fit the "embeddings + linear map" baseline to the bigram distribution.

    Only ``W`` (``d_model x d_model``, initialised to the identity) and ``b`` (zeros) learn; the
    model's embedding, final norm and unembedding stay frozen and untouched. The loss is the
    bigram soft cross-entropy of every position of random batches of ``train_windows``, so
    contexts count by their corpus frequency, as in the subnetwork search.
    """
    config = config or LinearMapConfig()
    windows = np.asarray(train_windows)
    if windows.ndim != 2 or len(windows) == 0 or not np.issubdtype(windows.dtype, np.integer):
        raise BaselineError("train_windows must be a non-empty [n, seq] array of token ids")
    if int(windows.max()) >= int(stats.vocab_size):
        raise BaselineError(
            f"token id {int(windows.max())} is outside the bigram stats' vocab "
            f"{stats.vocab_size}; build the stats with this model's tokenizer"
        )
    d_model = int(bridge.cfg.d_model)
    device = input_device(bridge)
    weight = torch.nn.Parameter(torch.eye(d_model, device=device))
    bias = torch.nn.Parameter(torch.zeros(d_model, device=device))
    optimizer = torch.optim.AdamW([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    baseline = LinearMapBaseline(weight=weight, bias=bias, config=config)
    rng = np.random.default_rng(config.seed)
    vocab = int(stats.vocab_size)
    with frozen_parameters(bridge):  # no gradients for the model itself while fitting
        for _ in tqdm(range(config.steps), desc="fit linear map", unit="step", disable=not show_progress):
            batch_np = windows[rng.integers(0, len(windows), size=config.batch_size)].astype(np.int64)
            logits = baseline.logits(bridge, torch.as_tensor(batch_np, device=device))[..., :vocab]
            loss = stats.soft_cross_entropy(logits, batch_np)
            if not torch.isfinite(loss):
                raise BaselineError("linear-map loss became non-finite; lower LinearMapConfig.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            baseline.losses.append(float(loss.detach()))
    weight.requires_grad_(False)  # the fitted map stays fixed from here on
    bias.requires_grad_(False)
    return baseline
