"""Sufficiency and necessity of a candidate circuit relative to the bigram subnetwork.

A *candidate* is any set of attention heads, MLP neurons and (optionally) weight-mask entries,
e.g. the previous-token and induction heads found by :func:`head_scores`. Two questions:

- *Sufficiency*: run the base (bigram) subnetwork with the candidate switched on as well,
  and measure a behaviour (e.g. :class:`RepeatedSequenceLoss`, the loss on the second half of
  repeated random token sequences, which only in-context copying can lower). Rows: base only,
  base + candidate, base + a random same-size candidate, full model.
- *Necessity*: remove the candidate from the full model (zero its heads' outputs ``hook_z``
  and neurons' activations ``hook_post``) and measure the same behaviour. Rows: full, full
  minus candidate, full minus a random same-size candidate.

"Base + candidate" is built in the base subnetwork's own mask space: the candidate's head /
neuron entries are OR-ed into the base's masks under the same keys (``blocks.{L}.attn.hook_z``
[n_heads], ``blocks.{L}.mlp.hook_post`` [d_mlp], or weight keys), and the result is a new
subnetwork of the base's class. A component the base does not gate at all is already on.
A behaviour is any callable ``behaviour(bridge) -> float | dict[str, float]``; it is called
while the run's subnetwork is applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Integer
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.runs import MaskedSubnetwork, RunLike, RunSpec, SubnetworkLike, as_token_tensor
from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError, MaskError, TokenError
from bigram_circuits.evaluate import evaluate_metrics
from bigram_circuits.masks import (
    MaskKey,
    ModelGeometry,
    RunMode,
    apply_binary_masks,
    granularity_of_key,
    model_geometry,
)

__all__ = [
    "PARTIAL_FRACTIONS",
    "Candidate",
    "MeanAblation",
    "RepeatedSequenceLoss",
    "add_candidate",
    "find_induction_heads",
    "head_key",
    "head_scores",
    "necessity",
    "neuron_key",
    "partial_ablation_table",
    "partial_subnetwork",
    "repeated_random_tokens",
    "repeated_sequence_loss",
    "select_heads",
    "sufficiency",
    "unit_mean_activations",
]

Behaviour = Callable[[Any], "float | Mapping[str, float]"]


def head_key(layer: int) -> str:
    """Mask key of the attention heads of ``layer`` (values [n_heads])."""
    return str(MaskKey.head(layer))


def neuron_key(layer: int) -> str:
    """Mask key of the MLP neurons of ``layer`` (values [d_mlp])."""
    return str(MaskKey.neuron(layer))


def _pairs(entries: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    out = []
    for entry in entries:
        if len(entry) != 2:
            raise MaskError(f"candidate entries are (layer, index) pairs; got {entry!r}")
        out.append((int(entry[0]), int(entry[1])))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class Candidate:
    """A user-supplied circuit: (layer, head) pairs, (layer, neuron) pairs, weight-mask entries.

    ``weights`` maps a weight-mask key of the subnetwork (e.g. ``blocks.0.mlp.in.weight``) to a
    boolean tensor of the entries to switch on; it is used when adding the candidate to a
    weight-granularity subnetwork.
    As a run (it has ``applied``), ``mode="ablate"`` zeroes the candidate's heads and neurons
    and ``mode="keep"`` keeps only them (within the granularities the candidate lists).
    """

    name: str = "candidate"
    # Any sequence of (layer, index) pairs in; a sorted tuple of int pairs after __post_init__.
    heads: Sequence[Sequence[int]] = ()
    neurons: Sequence[Sequence[int]] = ()
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)
    # Optional importance of each unit, keyed ("head" | "neuron", layer, index); larger = more
    # important (as the method that found the candidate defines it). Used by ``top_k``.
    scores: Mapping[tuple[str, int, int], float] = field(default_factory=dict, compare=False)
    method: str | None = field(default=None, compare=False)
    # Every MLP neuron of each layer the heads are in belongs to the candidate (set by
    # :meth:`with_layer_mlps`); a random control then draws the heads and takes their layers' MLPs.
    layer_mlps: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _pairs(self.heads))
        object.__setattr__(self, "neurons", _pairs(self.neurons))
        object.__setattr__(self, "weights", {k: torch.as_tensor(v).bool() for k, v in dict(self.weights).items()})
        scores = {}
        for key, value in dict(self.scores).items():
            if len(key) != 3 or key[0] not in ("head", "neuron"):
                raise MaskError(f"candidate scores are keyed ('head' | 'neuron', layer, index); got {key!r}")
            scores[(str(key[0]), int(key[1]), int(key[2]))] = float(value)
        object.__setattr__(self, "scores", scores)
        if not (self.heads or self.neurons or self.weights):
            raise MaskError("a candidate needs at least one head, neuron or weight entry")

    def ranked(self) -> pd.DataFrame:
        """The candidate's heads and neurons with their scores, best first (unscored last).

        Columns: kind ("head" | "neuron"), layer, index, score (NaN when unscored), rank.
        """
        rows = [("head", layer, head) for layer, head in self.heads]
        rows += [("neuron", layer, neuron) for layer, neuron in self.neurons]
        table = pd.DataFrame(rows, columns=["kind", "layer", "index"])
        table["score"] = [self.scores.get(row, float("nan")) for row in rows]
        table = table.sort_values("score", ascending=False, na_position="last", kind="stable", ignore_index=True)
        table["rank"] = range(1, len(table) + 1)
        return table

    def top_k(self, k: int, *, absolute: bool = False, name: str | None = None) -> Candidate:
        """The ``k`` highest-scoring of the candidate's heads and neurons (by ``|score|`` with
        ``absolute``); unscored units rank last. Weight entries are dropped."""
        if k < 1:
            raise MaskError(f"top_k needs k >= 1, got {k}")
        table = self.ranked()
        if absolute:
            table = table.assign(order=table["score"].abs()).sort_values(
                "order", ascending=False, na_position="last", kind="stable"
            )
        kept = table.head(int(k))
        units = list(zip(kept["kind"], kept["layer"].astype(int), kept["index"].astype(int)))
        return Candidate(
            name=name or f"{self.name} (top {k})",
            heads=[(layer, index) for kind, layer, index in units if kind == "head"],
            neurons=[(layer, index) for kind, layer, index in units if kind == "neuron"],
            scores=self.scores,
            method=self.method,
        )

    def with_layer_mlps(self, bridge: TransformerBridge) -> Candidate:
        """The candidate with every MLP neuron of each layer its heads are in (the next unit up
        from a head: a head with the MLP that reads its output), same name, scores and method."""
        d_mlp = int(bridge.cfg.d_mlp)
        layers = sorted({layer for layer, _ in self.heads})
        neurons = set(self.neurons) | {(layer, neuron) for layer in layers for neuron in range(d_mlp)}
        return replace(self, neurons=sorted(neurons), layer_mlps=True)

    @property
    def n_heads(self) -> int:
        """Number of attention heads in the candidate."""
        return len(self.heads)

    @property
    def n_neurons(self) -> int:
        """Number of MLP neurons in the candidate."""
        return len(self.neurons)

    def validate(self, bridge: TransformerBridge) -> None:
        """Raise ``MaskError`` when a head or neuron does not exist in ``bridge``."""
        cfg = bridge.cfg
        for layer, head in self.heads:
            if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
                raise MaskError(
                    f"head ({layer}, {head}) does not exist: the model has {cfg.n_layers} layers x {cfg.n_heads} heads"
                )
        for layer, neuron in self.neurons:
            if not (0 <= layer < cfg.n_layers and 0 <= neuron < cfg.d_mlp):
                raise MaskError(
                    f"neuron ({layer}, {neuron}) does not exist: the model has {cfg.n_layers} layers x "
                    f"{cfg.d_mlp} neurons"
                )

    def masks(self, bridge: TransformerBridge) -> dict[str, Bool[torch.Tensor, ...]]:
        """Boolean masks of the candidate: head/neuron keys for layers it touches, plus ``weights``."""
        self.validate(bridge)
        cfg = bridge.cfg
        out: dict[str, torch.Tensor] = {}
        for layer, head in self.heads:
            out.setdefault(head_key(layer), torch.zeros(cfg.n_heads, dtype=torch.bool))[head] = True
        for layer, neuron in self.neurons:
            out.setdefault(neuron_key(layer), torch.zeros(cfg.d_mlp, dtype=torch.bool))[neuron] = True
        for key, mask in self.weights.items():
            out[key] = mask.clone()
        return out

    def random_control(
        self, bridge: TransformerBridge, seed: int = 0, exclude: Mapping[str, torch.Tensor] | None = None
    ) -> Candidate:
        """A random candidate with as many heads and neurons per layer, avoiding ``exclude``
        (masks under head/neuron keys, e.g. the base subnetwork's) and the candidate itself.

        Where a layer has too few free units the rest are drawn from other layers. A candidate
        with ``layer_mlps`` gets random heads, each with the whole MLP of its layer.
        """
        if self.weights:
            raise MaskError("random controls are drawn for heads and neurons only; drop the weight entries")
        if self.layer_mlps:
            # Random heads (as many per layer), each with its layer's MLP: only the heads differ.
            head_layers = {layer for layer, _ in self.heads}
            own = replace(self, neurons=[n for n in self.neurons if n[0] not in head_layers], layer_mlps=False)
            control = own.random_control(bridge, seed, exclude)
            return control.with_layer_mlps(bridge)
        generator = torch.Generator().manual_seed(seed)
        own = self.masks(bridge)
        exclude = dict(exclude or {})
        cfg = bridge.cfg
        picked: dict[str, list[tuple[int, int]]] = {}
        for kind, entries, size, key_of in (
            ("heads", self.heads, int(cfg.n_heads), head_key),
            ("neurons", self.neurons, int(cfg.d_mlp), neuron_key),
        ):
            free = {}
            for layer in range(int(cfg.n_layers)):
                taken = torch.zeros(size, dtype=torch.bool)
                for masks in (own, exclude):
                    if key_of(layer) in masks:
                        taken |= torch.as_tensor(masks[key_of(layer)]).bool().reshape(-1).cpu()
                free[layer] = torch.nonzero(~taken).reshape(-1)
            chosen: list[tuple[int, int]] = []
            shortfall = 0
            for layer in range(int(cfg.n_layers)):
                want = sum(1 for entry_layer, _ in entries if entry_layer == layer)
                order = free[layer][torch.randperm(len(free[layer]), generator=generator)]
                take = order[:want].tolist()
                chosen += [(layer, unit) for unit in take]
                free[layer] = order[len(take) :]
                shortfall += want - len(take)
            if shortfall:
                pool = [(layer, int(unit)) for layer in free for unit in free[layer]]
                if len(pool) < shortfall:
                    raise MaskError(f"not enough free {kind} for a random control of size {len(entries)}")
                for index in torch.randperm(len(pool), generator=generator)[:shortfall].tolist():
                    chosen.append(pool[index])
            picked[kind] = chosen
        return Candidate(
            name=f"random({self.name}, seed={seed})",
            heads=picked["heads"],
            neurons=picked["neurons"],
        )

    @contextlib.contextmanager
    def applied(self, bridge: TransformerBridge, mode: RunMode = "keep") -> Iterator[Any]:
        """Zero the candidate's heads and neurons (``ablate``) or all other ones (``keep``).

        Applied like any mask (:func:`bigram_circuits.masks.apply_binary_masks`, which checks
        ``mode``), so it cannot be nested in another subnetwork's ``applied`` block (``MaskError``)."""
        if self.weights:
            raise MaskError(
                "a candidate with weight entries cannot run on its own; add it to a subnetwork with add_candidate"
            )
        masks = self.masks(bridge)
        cfg = bridge.cfg
        chosen: dict[str, torch.Tensor] = {}  # the masks of the layers whose units are not all kept
        for granularity, entries, size in (
            ("head", self.heads, int(cfg.n_heads)),
            ("neuron", self.neurons, int(cfg.d_mlp)),
        ):
            if not entries:
                continue
            for layer in range(int(cfg.n_layers)):
                key = str(MaskKey.unit(granularity, layer))
                mask = masks.get(key, torch.zeros(size, dtype=torch.bool))
                all_kept = bool(mask.all()) if mode == "keep" else not bool(mask.any())
                if not all_kept:
                    chosen[key] = mask
        with apply_binary_masks(bridge, chosen, mode):
            yield bridge


def _unit_as_weight_masks(
    key: str, units: torch.Tensor, masks: Mapping[str, torch.Tensor], geometry: ModelGeometry
) -> dict[str, torch.Tensor]:
    """The weight entries a mask of any granularity switches on, in the canonical ``[out, in]``
    layout of :mod:`bigram_circuits.masks` (its granularity's ``expand``): a head's Q/K/V rows
    and O columns, a neuron's MLP input row(s) and output column. Only keys present in
    ``masks`` are returned."""
    spec = granularity_of_key(key)
    out: dict[str, torch.Tensor] = {}
    for weight_key, gate in spec.expand(spec.parse_key_or_raise(key), units.bool().cpu(), geometry).items():
        if weight_key not in masks:
            continue
        shape = tuple(masks[weight_key].shape)
        try:
            out[weight_key] = gate.expand(shape).clone()
        except RuntimeError:
            raise MaskError(
                f"weight mask {weight_key} has shape {shape}; the {key} mask gates {tuple(gate.shape)}"
            ) from None
    return out


def add_candidate(base: MaskedSubnetwork, candidate: Candidate, bridge: TransformerBridge) -> MaskedSubnetwork:
    """A new subnetwork like ``base``: its masks OR the candidate's, key by key.

    ``base`` is a :class:`~bigram_circuits.circuits.runs.MaskedSubnetwork` (``masks``,
    ``metadata`` and ``with_masks(masks, metadata)``, e.g. a
    :class:`~bigram_circuits.subnetwork.Subnetwork`); the result is ``base.with_masks(...)``.
    Heads and neurons join the base's head/neuron masks; where the base gates that layer by
    weights instead, the weights the head/neuron uses are switched on (Q/K/V rows and O
    columns; MLP input rows and output column). A head/neuron the base does not gate at all
    is already on.
    """
    if not isinstance(base, MaskedSubnetwork):
        raise MaskError(
            f"the base {type(base).__name__} cannot copy itself with new masks; pass a Subnetwork "
            "(or anything with .masks, .metadata, .with_masks(masks, metadata) and .applied)"
        )
    masks = {key: torch.as_tensor(value).bool().clone() for key, value in base.masks.items()}
    additions: list[tuple[str, torch.Tensor]] = []
    for key, extra in candidate.masks(bridge).items():
        if key in masks:
            additions.append((key, extra))
            continue
        unit = MaskKey.try_parse(key)
        if unit is None or not unit.is_unit:
            raise MaskError(f"the base subnetwork has no mask {key}; use keys of its masks for weight entries")
        additions.extend(_unit_as_weight_masks(key, extra, masks, model_geometry(bridge)).items())
        # No weight key either: the base does not gate this component, so it is already on.
    added: dict[str, int] = {}
    for key, extra in additions:
        if masks[key].shape != extra.shape:
            raise MaskError(
                f"candidate mask {key} has shape {tuple(extra.shape)}, the subnetwork's {tuple(masks[key].shape)}"
            )
        extra = extra.to(masks[key].device)
        added[key] = added.get(key, 0) + int((extra & ~masks[key]).sum())
        masks[key] = masks[key] | extra
    metadata = {
        **dict(base.metadata or {}),
        "added_candidate": candidate.name,
        "added_entries": added,
    }
    return base.with_masks(masks, metadata)


# --------------------------------------------------------------------------- behaviours


def repeated_random_tokens(
    vocab_size: int,
    seq_len: int = 32,
    n_sequences: int = 64,
    seed: int = 0,
    *,
    prefix_token: int | None = None,
    low: int = 0,
    pool: Sequence[int] | None = None,
) -> Integer[torch.Tensor, "n total"]:
    """Random token sequences repeated twice: [n, 2 * seq_len] (+1 with ``prefix_token`` first).

    Tokens are drawn uniformly from ``[low, vocab_size)`` (set ``low`` to skip special tokens),
    or from the ids in ``pool`` (e.g. the frequent tokens, whose embeddings are well trained).
    """
    if seq_len < 2 or n_sequences < 1 or not 0 <= low < vocab_size:
        raise ConfigError("need seq_len >= 2, n_sequences >= 1 and 0 <= low < vocab_size")
    generator = torch.Generator().manual_seed(seed)
    if pool is not None:
        ids = torch.as_tensor(list(pool), dtype=torch.int64)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise TokenError(f"the token pool must be non-empty ids in [0, {vocab_size})")
        half = ids[torch.randint(0, ids.numel(), (n_sequences, seq_len), generator=generator)]
    else:
        half = torch.randint(low, vocab_size, (n_sequences, seq_len), generator=generator)
    tokens = torch.cat([half, half], dim=1)
    if prefix_token is not None:
        tokens = torch.cat([torch.full((n_sequences, 1), int(prefix_token)), tokens], dim=1)
    return tokens


@torch.no_grad()
def repeated_sequence_losses(
    bridge: TransformerBridge,
    tokens: Integer[torch.Tensor, "n total"],
    seq_len: int,
    vocab_size: int,
    *,
    prefix: int = 0,
    batch_size: int = 16,
) -> tuple[float, float]:
    """Mean next-token loss (nats) within the first copy and within the second copy.

    Scored predictions: tokens 2..seq_len of each copy (the first token of a copy cannot be
    predicted from inside it); ``prefix`` tokens precede the first copy.
    """
    start_second = prefix + seq_len
    sums, count = [0.0, 0.0], 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        logp = torch.log_softmax(bridge(batch)[..., :vocab_size].double(), -1)
        for index, begin in enumerate((prefix, start_second)):
            predicted = logp[:, begin : begin + seq_len - 1]
            targets = batch[:, begin + 1 : begin + seq_len]
            sums[index] += float(-predicted.gather(-1, targets.unsqueeze(-1)).sum())
        count += batch.shape[0] * (seq_len - 1)
    return sums[0] / count, sums[1] / count


def repeated_sequence_loss(
    bridge: TransformerBridge,
    vocab_size: int,
    seq_len: int = 32,
    n_sequences: int = 64,
    seed: int = 0,
    *,
    run: RunLike = None,
    batch_size: int = 16,
    prefix_token: int | None = None,
    low: int = 0,
    pool: Sequence[int] | None = None,
) -> float:
    """Mean next-token loss (nats) on the second half of repeated random sequences, under ``run``
    (default the full model).

    Positions predicting the 2nd..last token of the repeat are scored (the first token of the
    repeat cannot be copied); logits are cut to ``vocab_size``.
    """
    tokens = repeated_random_tokens(
        vocab_size, seq_len, n_sequences, seed, prefix_token=prefix_token, low=low, pool=pool
    )
    with RunSpec.coerce(run).context(bridge):
        _, second = repeated_sequence_losses(
            bridge,
            tokens,
            seq_len,
            vocab_size,
            prefix=int(prefix_token is not None),
            batch_size=batch_size,
        )
    return second


@dataclass(frozen=True)
class RepeatedSequenceLoss:
    """Behaviour: losses on fixed repeated random sequences (same seed every call).

    Returns ``second_half_loss`` (the loss in-context copying can lower), ``first_half_loss``
    and ``copy_gain`` = first - second (about 0 for a model without induction).
    """

    vocab_size: int
    seq_len: int = 32
    n_sequences: int = 64
    seed: int = 0
    prefix_token: int | None = None
    low: int = 0
    pool: tuple[int, ...] | None = None

    def tokens(self) -> Integer[torch.Tensor, "n total"]:
        """The repeated sequences this behaviour scores."""
        return repeated_random_tokens(
            self.vocab_size,
            self.seq_len,
            self.n_sequences,
            self.seed,
            prefix_token=self.prefix_token,
            low=self.low,
            pool=self.pool,
        )

    def __call__(self, bridge: TransformerBridge) -> dict[str, float]:
        """Losses under whatever run is active."""
        first, second = repeated_sequence_losses(
            bridge,
            self.tokens(),
            self.seq_len,
            self.vocab_size,
            prefix=int(self.prefix_token is not None),
        )
        return {"second_half_loss": second, "first_half_loss": first, "copy_gain": first - second}


@torch.no_grad()
def head_scores(
    bridge: TransformerBridge,
    vocab_size: int,
    seq_len: int = 32,
    n_sequences: int = 32,
    seed: int = 0,
    *,
    run: RunLike = None,
    batch_size: int = 16,
    prefix_token: int | None = None,
    low: int = 0,
    pool: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Previous-token and induction scores of every head on repeated random sequences, under
    ``run`` (default the full model).

    ``previous_token_score``: mean attention from each position to the position before it.
    ``induction_score``: mean attention, over the second copy, from position i to the token
    after the previous occurrence of token i (i - seq_len + 1). Both in [0, 1]; sorted by
    induction score. (TransformerLens' ``detect_head`` scores the same patterns but needs text
    prompts; on random token ids this direct computation is used.)
    """
    tokens = repeated_random_tokens(
        vocab_size, seq_len, n_sequences, seed, prefix_token=prefix_token, low=low, pool=pool
    )
    offset = 0 if prefix_token is None else 1
    n_layers, n_heads = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    prev_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    ind_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    queries = torch.arange(offset + seq_len, tokens.shape[1])
    with RunSpec.coerce(run).context(bridge):
        for start in range(0, tokens.shape[0], batch_size):
            _, cache = bridge.run_with_cache(tokens[start : start + batch_size], names_filter=names)
            for layer, name in enumerate(names):
                pattern = cache[name].double()  # [batch, head, query, key]
                prev_sum[layer] += pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).sum(0)
                ind_sum[layer] += pattern[:, :, queries, queries - seq_len + 1].mean(-1).sum(0)
    n = tokens.shape[0]
    rows = [
        {
            "layer": layer,
            "head": head,
            "previous_token_score": float(prev_sum[layer, head] / n),
            "induction_score": float(ind_sum[layer, head] / n),
        }
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    return pd.DataFrame(rows).sort_values("induction_score", ascending=False, ignore_index=True)


def select_heads(
    scores: pd.DataFrame, column: str, *, threshold: float | None = None, top_k: int | None = None
) -> list[tuple[int, int]]:
    """(layer, head) pairs whose ``column`` score is >= ``threshold`` and/or among the ``top_k``."""
    if column not in scores.columns:
        raise MaskError(f"no column {column!r} in the head scores; use one of {list(scores.columns)}")
    if threshold is None and top_k is None:
        raise MaskError("select_heads needs a threshold or a top_k")
    ranked = scores.sort_values(column, ascending=False)
    if threshold is not None:
        ranked = ranked[ranked[column] >= threshold]
    if top_k is not None:
        ranked = ranked.head(top_k)
    return [(int(layer), int(head)) for layer, head in zip(ranked["layer"], ranked["head"])]


def find_induction_heads(
    bridge: TransformerBridge,
    vocab_size: int,
    *,
    induction_threshold: float = 0.2,
    previous_token_threshold: float = 0.4,
    top_k: int | None = None,
    seq_len: int = 32,
    n_sequences: int = 32,
    seed: int = 0,
    include_previous_token_heads: bool = True,
    low: int = 0,
    pool: Sequence[int] | None = None,
) -> tuple[Candidate, pd.DataFrame]:
    """The induction circuit as a :class:`Candidate` (induction heads plus, by default,
    previous-token heads), and the per-head score table it was chosen from.

    A head is chosen when its score passes the threshold (or it is among the ``top_k`` by
    induction score when ``top_k`` is given). ``low`` / ``pool`` choose the random tokens as in
    :func:`repeated_random_tokens`.
    """
    scores = head_scores(bridge, vocab_size, seq_len, n_sequences, seed, low=low, pool=pool)
    heads = set(
        select_heads(scores, "induction_score", top_k=top_k)
        if top_k is not None
        else select_heads(scores, "induction_score", threshold=induction_threshold)
    )
    if include_previous_token_heads:
        heads |= set(select_heads(scores, "previous_token_score", threshold=previous_token_threshold))
    if not heads:
        raise MaskError(
            f"no head passes the thresholds (best induction score {scores['induction_score'].max():.3f}); "
            "lower induction_threshold or pass top_k"
        )
    return Candidate(name="induction circuit", heads=sorted(heads)), scores


# --------------------------------------------------------------------------- sufficiency / necessity


def _measure(bridge: TransformerBridge, run: RunSpec, behaviour: Behaviour) -> dict[str, float]:
    with run.context(bridge):
        value = behaviour(bridge)
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {"behaviour": float(value)}


_Row = tuple[RunSpec, "Candidate | None", "int | None"]  # run, candidate it adds/removes, new entries


def _table(bridge: TransformerBridge, runs: Sequence[_Row], behaviour: Behaviour, desc: str) -> pd.DataFrame:
    rows = []
    for run, candidate, new_entries in tqdm(runs, desc=desc, leave=False):
        row: dict[str, Any] = {
            "run": run.name,
            "heads": 0 if candidate is None else candidate.n_heads,
            "neurons": 0 if candidate is None else candidate.n_neurons,
            "new_entries": new_entries,
        }
        row.update(_measure(bridge, run, behaviour))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["new_entries"] = table["new_entries"].astype("Int64")  # missing where nothing is added
    return table


def _with_candidate(bridge: TransformerBridge, base: Any, candidate: Candidate, label: str) -> _Row:
    combined = add_candidate(base, candidate, bridge)
    new_entries = int(sum(combined.metadata["added_entries"].values()))
    return RunSpec(combined, "keep", label), candidate, new_entries


def sufficiency(
    bridge: TransformerBridge,
    base: Any,
    candidate: Candidate,
    behaviour: Behaviour,
    *,
    n_random_controls: int = 1,
    seed: int = 0,
    base_label: str = "bigram",
) -> pd.DataFrame:
    """Behaviour of base only, base + candidate, base + random same-size candidates, full model.

    ``base`` is a subnetwork (kept). Columns: ``run``, ``heads`` / ``neurons`` (size of the
    candidate), ``new_entries`` (mask entries the candidate switched on that the base had
    off) and the behaviour's value(s). Random controls avoid the base's and the candidate's
    heads/neurons.
    """
    runs: list[_Row] = [(RunSpec(base, "keep", base_label), None, None)]
    runs.append(_with_candidate(bridge, base, candidate, f"{base_label} + {candidate.name}"))
    for index in range(n_random_controls):
        control = candidate.random_control(bridge, seed=seed + index, exclude=dict(base.masks))
        runs.append(_with_candidate(bridge, base, control, f"{base_label} + random #{index}"))
    runs.append((RunSpec(None, "keep", "full"), None, None))
    return _table(bridge, runs, behaviour, "sufficiency")


def necessity(
    bridge: TransformerBridge,
    candidate: Candidate | SubnetworkLike,
    behaviour: Behaviour,
    *,
    n_random_controls: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Behaviour of the full model, the full model without the candidate, and without random
    same-size candidates. ``candidate`` may also be any subnetwork (run with ``mode="ablate"``).
    """
    own = candidate if isinstance(candidate, Candidate) else None
    name = own.name if own is not None else "candidate"
    runs: list[_Row] = [(RunSpec(None, "keep", "full"), None, None)]
    runs.append((RunSpec(candidate, "ablate", f"full - {name}"), own, None))
    if own is not None:
        for index in range(n_random_controls):
            control = own.random_control(bridge, seed=seed + index)
            runs.append((RunSpec(control, "ablate", f"full - random #{index}"), control, None))
    return _table(bridge, runs, behaviour, "necessity")


# --------------------------------------------------------------------------- partial ablation (controls)

PARTIAL_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)


def partial_subnetwork(subnetwork, fraction: float, seed: int = 0):
    """A random ``fraction`` of ``subnetwork``'s kept entries, drawn per block (each mask key keeps
    ``round(fraction * kept)`` of its kept entries), as a subnetwork of the same class; seeded."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"fraction must be in [0, 1], got {fraction!r}")
    gen = torch.Generator().manual_seed(int(seed))
    masks = {}
    for key in sorted(subnetwork.masks):  # sorted: the draw must not depend on dict order
        mask = subnetwork.masks[key]
        kept = torch.nonzero(mask.reshape(-1)).reshape(-1)
        take = kept[torch.randperm(len(kept), generator=gen)[: round(float(fraction) * len(kept))]]
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[take] = True
        masks[key] = flat.reshape(mask.shape)
    meta = {**subnetwork.metadata, "derived": "partial", "fraction": float(fraction), "partial_seed": int(seed)}
    return subnetwork.with_masks(masks, meta)


def _unit_keys(subnetwork) -> list[str]:
    return [k for k in sorted(subnetwork.masks) if MaskKey.parse(k).kind in ("head", "neuron")]


@torch.no_grad()
def unit_mean_activations(
    bridge: TransformerBridge, windows: Integer[torch.Tensor, "n seq"] | Any, keys: Sequence[str], batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Mean activation of every unit of the hooks ``keys`` (neuron keys ``blocks.{L}.mlp.hook_post``
    -> [d_mlp], head keys ``blocks.{L}.attn.hook_z`` -> [n_heads, d_head]) over all positions of
    ``windows`` in the full model."""
    tokens = as_token_tensor(windows)
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def accumulate(key: str):
        def hook_fn(act, hook):  # keyed by the mask key: a bridge's hook.name may be an alias's target
            total = act.detach().double().sum(dim=(0, 1)).cpu()
            sums[key] = sums[key] + total if key in sums else total

        return hook_fn

    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(input_device(bridge))
        bridge.run_with_hooks(batch, fwd_hooks=[(key, accumulate(key)) for key in keys])
        count += batch.numel()
    return {key: (sums[key] / max(count, 1)).float() for key in keys}


@dataclass
class MeanAblation:
    """A neuron/head subnetwork removed by setting its units to their mean activation (``means``
    from :func:`unit_mean_activations`) instead of zero; usable wherever a subnetwork with
    ``applied(bridge, mode="ablate")`` is (``evaluate_metrics(..., RunSpec(MeanAblation(sub, means), "ablate"))``)."""

    subnetwork: Any
    means: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        keys = _unit_keys(self.subnetwork)
        if not keys or len(keys) != len(self.subnetwork.masks):
            raise MaskError("mean ablation needs a neuron/head subnetwork; search with granularity neuron,head")
        missing = sorted(set(keys) - set(self.means))
        if missing:
            raise MaskError(f"no mean activation for {missing[:2]}; compute them with unit_mean_activations")

    def n_params(self) -> int:
        return int(self.subnetwork.n_params())

    def complement(self):
        return self.subnetwork.complement()

    @contextlib.contextmanager
    def applied(self, bridge: TransformerBridge, mode: RunMode = "ablate") -> Iterator[Any]:
        """Inside the block, the subnetwork's units output their mean activation (only ``ablate``)."""
        if mode != "ablate":
            raise MaskError("mean ablation only removes a subnetwork; use mode='ablate' (or the subnetwork to keep)")

        def make_hook(key: str):
            removed = self.subnetwork.masks[key].to(self._device(bridge))
            mean = self.means[key].to(self._device(bridge))

            def hook_fn(act, hook):
                # neurons: act [b, p, d_mlp], removed [d_mlp]; heads: act [b, p, h, d_head], removed [h]
                return torch.where(removed.reshape(removed.shape + (1,) * (act.dim() - 3)), mean.to(act.dtype), act)

            return hook_fn

        with bridge.hooks(fwd_hooks=[(key, make_hook(key)) for key in _unit_keys(self.subnetwork)]):
            yield bridge

    @staticmethod
    def _device(bridge: TransformerBridge) -> torch.device:
        return next(bridge.parameters()).device


def partial_ablation_table(
    bridge: TransformerBridge,
    stats,
    windows: Integer[torch.Tensor, "n seq"] | Any,
    subnetwork,
    fractions: Sequence[float] = PARTIAL_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    mean_ablation: bool | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Held-out loss and bigram r with random ``fractions`` of ``subnetwork`` removed, beside the
    same fractions of a random same-shape subnetwork (``random_control(seed)``), one draw per seed.

    Rows: ``condition`` ("bigram" or "random"), ``ablation`` ("zero"; also "mean" for neuron/head
    subnetworks, or when ``mean_ablation`` is True), ``fraction`` (0 = the full model), ``seed``,
    ``removed_params`` and the metrics of :func:`bigram_circuits.evaluate.evaluate_metrics`
    (binary masks, ``mode="ablate"``), plus ``loss_increase`` over the full model."""
    if not seeds:
        raise ConfigError("seeds must name at least one draw; pass e.g. seeds=(0, 1, 2)")
    unit_only = bool(subnetwork.masks) and len(_unit_keys(subnetwork)) == len(subnetwork.masks)
    if mean_ablation is None:
        mean_ablation = unit_only
    if mean_ablation and not unit_only:
        raise MaskError("mean ablation needs a neuron/head subnetwork; pass mean_ablation=False for weight masks")
    means = unit_mean_activations(bridge, windows, _unit_keys(subnetwork), batch_size) if mean_ablation else {}
    full = evaluate_metrics(bridge, stats, windows, None, batch_size=batch_size, show_progress=False)
    ablations = ("zero", "mean") if mean_ablation else ("zero",)
    jobs = [
        (condition, ablation, float(fraction), int(seed))
        for condition in ("bigram", "random")
        for ablation in ablations
        for fraction in fractions
        for seed in seeds
    ]
    rows = [
        {"condition": c, "ablation": a, "fraction": 0.0, "seed": int(s), "removed_params": 0, **full}
        for c in ("bigram", "random")
        for a in ablations
        for s in seeds
    ]
    for condition, ablation, fraction, seed in tqdm(jobs, desc="partial ablation", disable=not show_progress):
        source = subnetwork if condition == "bigram" else subnetwork.random_control(seed)
        removed = partial_subnetwork(source, fraction, seed)
        run = RunSpec(MeanAblation(removed, means) if ablation == "mean" else removed, "ablate")
        metrics = evaluate_metrics(bridge, stats, windows, run, batch_size=batch_size, show_progress=False)
        rows.append(
            {
                "condition": condition,
                "ablation": ablation,
                "fraction": fraction,
                "seed": seed,
                "removed_params": int(removed.n_params()),
                **metrics,
            }
        )
    table = pd.DataFrame(rows)
    table["loss_increase"] = table["lm_loss_nats"] - float(full["lm_loss_nats"])
    return table
