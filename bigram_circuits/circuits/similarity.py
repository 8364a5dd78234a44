"""Layer covariance similarity (as in the tuned-lens paper; Chang & Bergen 2025, Fig. 4).

For each hidden state X_l (rows = tokens): centre it, project out its top singular direction
(the first right singular vector, which in trained models is dominated by a few outlier
dimensions), and take the covariance C_l = A^T A / n. The similarity of layers i and j is the
Frobenius cosine <C_i, C_j>_F / (||C_i||_F ||C_j||_F).

Only the d x d covariance of each layer is needed: the top right singular vector of the
centred activations is the top eigenvector of their covariance C, and removing it gives
P C P with P = I - v v^T. Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.runs import RunLike, RunSpec, hidden_state_names, select_windows
from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError, TokenError

__all__ = [
    "covariance_similarity",
    "deflated_covariance",
    "layer_covariance_similarity",
    "similarity_report",
]


def _deflate(covariance: torch.Tensor) -> np.ndarray:
    """P C P with P projecting out the top eigenvector of the covariance C (float64)."""
    covariance = covariance.double()
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = eigenvectors[:, -1:]
    projector = torch.eye(covariance.shape[0], dtype=torch.float64, device=covariance.device) - top @ top.T
    return (projector @ covariance @ projector).cpu().numpy()


def deflated_covariance(activations: Float[torch.Tensor, "n d"]) -> Float[np.ndarray, "d d"]:
    """Covariance of centred activations after projecting out their top singular direction."""
    a = torch.as_tensor(activations).double()
    if a.ndim != 2 or a.shape[0] < 2:
        raise ConfigError(f"covariance needs activations [n >= 2, d], got shape {tuple(a.shape)}; pass more rows")
    a = a - a.mean(dim=0)
    return _deflate(a.T @ a / a.shape[0])


def _similarity_frame(covariances: Sequence[np.ndarray], labels: list) -> pd.DataFrame:
    flat = np.stack([c.reshape(-1) for c in covariances])
    norms = np.linalg.norm(flat, axis=1)
    if np.any(norms == 0):
        raise ConfigError("an activation set has zero covariance after deflation (constant or rank-1); use more tokens")
    unit = flat / norms[:, None]
    matrix = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return pd.DataFrame(matrix, index=pd.Index(labels, name="layer"), columns=pd.Index(labels, name="layer"))


def covariance_similarity(
    activations: Sequence[Float[torch.Tensor, "n d"]] | Mapping[Any, Float[torch.Tensor, "n d"]],
) -> pd.DataFrame:
    """Frobenius cosine between the deflated covariances of every pair of activation sets.

    ``activations`` is a list (labels 0..n-1) or a mapping label -> [n_tokens, d]; the result
    is a symmetric DataFrame indexed and columned by those labels, with ones on the diagonal.
    """
    if isinstance(activations, Mapping):
        labels, values = list(activations.keys()), list(activations.values())
    else:
        labels, values = list(range(len(activations))), list(activations)
    if not values:
        raise ConfigError("covariance_similarity needs at least one activation set; pass a list or mapping of [n, d]")
    return _similarity_frame([deflated_covariance(v) for v in values], labels)


@torch.no_grad()
def layer_covariance_similarity(
    bridge: TransformerBridge,
    windows: Any,
    run: RunLike = None,
    *,
    n_tokens: int | None = 32768,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Layer-by-layer covariance similarity of the hidden states X_0..X_L of one run (``run``,
    default the full model).

    Streams over ``windows`` [n, seq] (whole windows covering ``n_tokens``), accumulating each
    layer's sum and second moment in float64, so memory does not grow with the token count.
    """
    tokens = select_windows(windows, n_tokens)
    if int(tokens.max()) >= int(bridge.cfg.d_vocab):
        raise TokenError(f"token id {int(tokens.max())} is outside the model's vocabulary")
    names = hidden_state_names(bridge)
    d_model = int(bridge.cfg.d_model)
    sums = torch.zeros(len(names), d_model, dtype=torch.float64)
    moments = torch.zeros(len(names), d_model, d_model, dtype=torch.float64)
    n = 0
    with RunSpec.coerce(run).context(bridge):
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="layer covariances", disable=not progress):
            batch = tokens[start : start + batch_size].to(input_device(bridge))
            _, cache = bridge.run_with_cache(batch, names_filter=names)
            for layer, name in enumerate(names):
                rows = cache[name].reshape(-1, d_model).double().cpu()
                sums[layer] += rows.sum(0)
                moments[layer] += rows.T @ rows
            n += tokens[start : start + batch_size].numel()
    if n < 2:
        raise ConfigError("covariance similarity needs at least two tokens; pass more windows or a larger n_tokens")
    covariances = []
    for layer in range(len(names)):
        mean = sums[layer] / n
        covariances.append(_deflate(moments[layer] / n - torch.outer(mean, mean)))
    return _similarity_frame(covariances, list(range(len(names))))


def similarity_report(
    bridge: TransformerBridge,
    windows: Any,
    runs: Mapping[str, RunLike],
    n_tokens: int | None = 32768,
    *,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """:func:`layer_covariance_similarity` for several runs (label -> run: a RunSpec, a subnetwork to
    keep or None): label -> (layers x layers) DataFrame."""
    if not runs:
        raise ConfigError("similarity_report needs at least one run; pass e.g. {'full': None}")
    return {
        label: layer_covariance_similarity(bridge, windows, run, n_tokens=n_tokens, progress=progress)
        for label, run in runs.items()
    }
