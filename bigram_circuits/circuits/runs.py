"""A *run* of a bridge: the full model, or the model with a subnetwork kept or ablated.

Every analysis in :mod:`bigram_circuits.circuits` compares runs of one bridge. A run is a
:class:`RunSpec`: a subnetwork (anything with an ``applied(bridge, mode=...)`` context manager,
e.g. :class:`bigram_circuits.subnetwork.Subnetwork`; ``None`` is the full model) and a mode.
Analyses take it as one ``run`` argument (a :data:`RunLike`).
This module also collects per-token activations of a run for the lens and similarity
analyses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.data import load_token_dataset
from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError, MaskError, TokenError
from bigram_circuits.masks import RUN_MODES, RunMode
from bigram_circuits.models import load_model
from bigram_circuits.rundir import RunDir
from bigram_circuits.runspec import MaskedSubnetwork, RunLike, RunSpec, SubnetworkLike, run_context
from bigram_circuits.subnetwork import Subnetwork

# RunSpec and friends live in bigram_circuits.runspec (below the evaluation core); they are
# re-exported here, where circuit code has always imported them.
__all__ = [
    "RUN_MODES",
    "MaskedSubnetwork",
    "RunLike",
    "RunMode",
    "RunSpec",
    "SubnetworkLike",
    "TokenActivations",
    "as_token_tensor",
    "collect_activations",
    "hidden_state_names",
    "run_context",
    "select_windows",
]


def hidden_state_names(bridge: TransformerBridge) -> list[str]:
    """Hook names of the paper's hidden states X_0..X_L (all before the final layer norm).

    X_0 is the embedding output (``blocks.0.hook_resid_pre``), X_l the residual stream
    entering block l, and X_L the residual stream after the last block.
    """
    n_layers = int(bridge.cfg.n_layers)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return names


def as_token_tensor(tokens: Any, vocab_size: int | None = None) -> Integer[torch.Tensor, "batch pos"]:
    """Validate token ids (numpy or torch, 1-D or 2-D) and return an int64 tensor [batch, pos]."""
    if isinstance(tokens, torch.Tensor):
        tensor = tokens
    else:
        array = np.asarray(tokens)
        if not array.flags.writeable:  # read-only memmap windows: copy rather than share (torch warns)
            array = array.copy()
        tensor = torch.as_tensor(array)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TokenError(f"token ids must be integers, got dtype {tensor.dtype}; pass token ids, not text")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.numel() == 0:
        raise TokenError(f"tokens must be a non-empty [batch, pos] array, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.int64)
    if int(tensor.min()) < 0:
        raise TokenError("token ids must be non-negative")
    if vocab_size is not None and int(tensor.max()) >= vocab_size:
        raise TokenError(f"token id {int(tensor.max())} is outside the model's vocabulary of {vocab_size}")
    return tensor


def select_windows(windows: Any, n_tokens: int | None) -> Integer[torch.Tensor, "n_windows seq"]:
    """The first windows that together hold at least ``n_tokens`` tokens (all when None)."""
    tensor = as_token_tensor(windows)
    if n_tokens is None:
        return tensor
    if n_tokens <= 0:
        raise ConfigError(f"n_tokens must be positive, got {n_tokens}")
    n_windows = math.ceil(n_tokens / tensor.shape[1])
    if n_windows > tensor.shape[0]:
        raise ConfigError(
            f"need {n_tokens} tokens but the windows hold only {tensor.numel()}; "
            "pass more windows or a smaller n_tokens"
        )
    return tensor[:n_windows]


@dataclass
class TokenActivations:
    """Activations of one run, flattened over (window, position) into one row per token."""

    activations: dict[str, Float[torch.Tensor, "n_tokens d"]]
    input_tokens: Integer[torch.Tensor, " n_tokens"]
    next_tokens: Integer[torch.Tensor, " n_tokens"]  # -1 at the last position of a window
    positions: Integer[torch.Tensor, " n_tokens"]

    @property
    def n_tokens(self) -> int:
        """Number of token rows."""
        return int(self.input_tokens.shape[0])


@torch.no_grad()
def collect_activations(
    bridge: TransformerBridge,
    windows: Any,
    hook_names: Sequence[str],
    run: RunLike = None,
    *,
    n_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "collecting activations",
) -> TokenActivations:
    """Run the bridge over ``windows`` [n, seq] under ``run`` (default the full model) and keep
    the named activations.

    Each activation must be [batch, pos, d]; it is flattened to [n_tokens, d] (float32, CPU).
    ``n_tokens`` truncates to the first that many tokens (whole windows are run).
    """
    tokens = select_windows(windows, n_tokens)
    vocab = int(bridge.cfg.d_vocab)
    if int(tokens.max()) >= vocab:
        raise TokenError(f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}")
    names = list(hook_names)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    device = input_device(bridge)
    with RunSpec.coerce(run).context(bridge):
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=description, disable=not progress):
            batch = tokens[start : start + batch_size].to(device)
            _, cache = bridge.run_with_cache(batch, names_filter=names)
            for name in names:
                act = cache[name]
                if act.ndim != 3:
                    raise MaskError(f"activation {name} has shape {tuple(act.shape)}; expected [batch, pos, d]")
                chunks[name].append(act.reshape(-1, act.shape[-1]).float().cpu())
    limit = tokens.numel() if n_tokens is None else n_tokens
    next_tokens = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -1)], dim=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return TokenActivations(
        activations={name: torch.cat(parts)[:limit] for name, parts in chunks.items()},
        input_tokens=tokens.reshape(-1)[:limit],
        next_tokens=next_tokens.reshape(-1)[:limit],
        positions=positions.reshape(-1)[:limit],
    )


@dataclass
class LoadedRun:
    """A saved ``bigram-circuits find`` run, ready for analysis."""

    bridge: Any
    tokenizer: Any
    subnetwork: Any
    subnetwork_dir: Path
    model_name: str
    corpus: str
    seq_len: int

    def eval_windows(self, n_tokens: int | None = None) -> Integer[np.ndarray, "n seq"]:
        """Held-out windows of the run's corpus (enough for ``n_tokens`` when given)."""
        dataset = load_token_dataset(self.corpus, self.tokenizer, split="eval")
        max_windows = None if n_tokens is None else math.ceil(n_tokens / self.seq_len)
        return dataset.windows(self.seq_len, max_windows)


def subnetwork_dir_of(run_dir: str | os.PathLike) -> Path:
    """The subnetwork directory of a run: ``run_dir`` itself when it holds ``subnetwork.json``,
    else the lambda marked ``chosen`` in its ``sweep.csv`` (or its only lambda); see
    :meth:`bigram_circuits.rundir.RunDir.subnetwork_dir`."""
    return RunDir(run_dir).subnetwork_dir()


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run's chosen subnetwork and the model and corpus it was found on (the model on
    ``device``, a ``torch.device`` the caller resolved or a request :func:`load_model` resolves)."""
    directory = subnetwork_dir_of(run_dir)
    subnetwork = Subnetwork.load(directory)
    metadata = dict(subnetwork.metadata)
    model_name = str(metadata.get("model") or metadata.get("model_name") or "default")
    bridge, tokenizer = load_model(model_name, device=device)
    return LoadedRun(
        bridge=bridge,
        tokenizer=tokenizer,
        subnetwork=subnetwork,
        subnetwork_dir=directory,
        model_name=model_name,
        corpus=str(metadata.get("corpus", "default")),
        seq_len=int(dict(metadata.get("config", {}) or {}).get("seq_len", 128)),
    )
