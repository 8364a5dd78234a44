"""Tasks: behaviours with clean and corrupted prompts of equal shape and a metric.

A task drives both the build-up (:func:`~bigram_circuits.circuits.buildup.build_up`:
``task(bridge)`` measures its metric under the active run) and the patching methods of
:mod:`~bigram_circuits.circuits.candidates`, which need only what :class:`PairTask` names:

- :class:`RepetitionTask`: in-context repetition. Clean = random token sequences repeated
  twice; corrupted = the same second halves after a *different* random first half, so nothing
  can be copied. Metric: mean loss (nats) on the second half (lower is better).
- :class:`NameCopyingTask`: copying a name from earlier in the prompt (the indirect-object
  pattern, "When Mary and John went to the store, John gave a drink to" -> " Mary"). Chosen
  because it is a documented behaviour of small LMs (GPT-2 small's IOI circuit), it needs
  in-context information that no bigram statistic can supply (the answer follows " to"
  whatever the names), and it has a natural corruption of the same length: the first two
  names replaced by two other names, so the answer no longer occurs in the prompt. Metric:
  logit(answer) - logit(repeated name) at the last position (higher is better).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import repeated_random_tokens
from bigram_circuits.devices import input_device
from bigram_circuits.errors import ConfigError

__all__ = ["NAMES", "MeasuredTask", "NameCopyingTask", "PairTask", "RepetitionTask"]


@runtime_checkable
class PairTask(Protocol):
    """What the patching methods need from a task: paired prompts and a metric."""

    name: str
    clean: Integer[torch.Tensor, "n pos"]
    corrupted: Integer[torch.Tensor, "n pos"]

    def metric_fn(self, index: slice = slice(None)) -> Callable[[torch.Tensor], torch.Tensor]:
        """``logits [len(index), pos, vocab] -> scalar`` for the prompts ``index``."""
        ...


@runtime_checkable
class MeasuredTask(Protocol):
    """What the build-up needs from a task: its name, the name of its main metric, and
    ``task(bridge) -> {metric: value, ...}`` measured under the active run."""

    name: str
    metric_name: str

    def __call__(self, bridge: TransformerBridge) -> Mapping[str, float]:
        """The task's values (the main metric among them) under whatever run is active."""
        ...


class _Task:
    """Shared machinery of a task: batched evaluation of its metric on the clean prompts."""

    name: str
    metric_name: str
    higher_is_better: bool
    clean: Integer[torch.Tensor, "n pos"]
    corrupted: Integer[torch.Tensor, "n pos"]
    batch_size: int = 16

    def per_example(self, logits: Float[torch.Tensor, "n pos vocab"], index: slice) -> Float[torch.Tensor, " n"]:
        """The metric of each prompt ``index`` from its logits."""
        raise NotImplementedError

    def metric_fn(self, index: slice = slice(None)) -> Callable[[torch.Tensor], torch.Tensor]:
        """``logits -> mean metric`` for the prompts ``index`` (a scalar tensor, differentiable)."""
        index = slice(*index.indices(self.clean.shape[0]))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return self.per_example(logits, index).mean()

        return metric

    def extra(self, logits: Float[torch.Tensor, "n pos vocab"], index: slice) -> dict[str, Float[torch.Tensor, " n"]]:
        """Further per-prompt values reported next to the metric."""
        return {}

    @torch.no_grad()
    def __call__(self, bridge: TransformerBridge) -> dict[str, float]:
        """The metric (and extras), averaged over the clean prompts, under the active run."""
        sums: dict[str, float] = {}
        n = self.clean.shape[0]
        device = input_device(bridge)
        for start in range(0, n, self.batch_size):
            index = slice(start, min(start + self.batch_size, n))
            logits = bridge(self.clean[index].to(device)).float().cpu()
            values = {self.metric_name: self.per_example(logits, index), **self.extra(logits, index)}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value.double().sum())
        return {key: total / n for key, total in sums.items()}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            "name": self.name,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "n_prompts": int(self.clean.shape[0]),
            "n_positions": int(self.clean.shape[1]),
        }


class RepetitionTask(_Task):
    """In-context repetition: loss on the second copy of a repeated random token sequence.

    ``clean`` = ``[prefix] + A + A`` (``A`` = ``seq_len`` random tokens from ``[low, vocab)``
    or from ``pool``); ``corrupted`` = ``[prefix] + B + A`` with another random ``B``, so the
    scored tokens are identical but nothing can be copied. Scored: the predictions of tokens
    2..seq_len of the second copy (as in
    :func:`~bigram_circuits.circuits.ablation.repeated_sequence_losses`).
    """

    name = "repetition"
    metric_name = "second_half_loss"
    higher_is_better = False

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 24,
        n_sequences: int = 16,
        seed: int = 0,
        *,
        low: int = 0,
        pool: Sequence[int] | None = None,
        prefix_token: int | None = None,
        batch_size: int = 16,
    ) -> None:
        self.vocab_size, self.seq_len, self.seed = int(vocab_size), int(seq_len), int(seed)
        self.low, self.pool = int(low), None if pool is None else tuple(int(t) for t in pool)
        self.prefix = int(prefix_token is not None)
        self.batch_size = int(batch_size)
        self.clean = repeated_random_tokens(
            vocab_size, seq_len, n_sequences, seed, prefix_token=prefix_token, low=low, pool=pool
        )
        other = repeated_random_tokens(
            vocab_size,
            seq_len,
            n_sequences,
            seed + 10_007,
            prefix_token=prefix_token,
            low=low,
            pool=pool,
        )
        self.corrupted = self.clean.clone()
        first = slice(self.prefix, self.prefix + self.seq_len)
        self.corrupted[:, first] = other[:, first]
        start = self.prefix + self.seq_len
        self._predict = torch.arange(start, start + self.seq_len - 1)
        self._first = torch.arange(self.prefix, self.prefix + self.seq_len - 1)

    def _nll(self, logits: torch.Tensor, index: slice, positions: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, positions, : self.vocab_size].double(), -1)
        targets = self.clean[index][:, positions + 1].to(logits.device)
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)

    def per_example(self, logits, index):
        """Mean next-token loss (nats) over the scored second-copy positions of each prompt."""
        return self._nll(logits, index, self._predict)

    def extra(self, logits, index):
        """``first_half_loss`` (nothing to copy yet) and ``copy_gain`` = first - second."""
        first = self._nll(logits, index, self._first)
        return {"first_half_loss": first, "copy_gain": first - self._nll(logits, index, self._predict)}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            **super().describe(),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": f"pool of {len(self.pool)}" if self.pool else f"uniform [{self.low}, {self.vocab_size})",
        }


# Common English first names; a tokenizer's single-token ones (with a leading space) are used.
NAMES = (
    "Mary",
    "John",
    "Alice",
    "Bob",
    "James",
    "Tom",
    "Anna",
    "David",
    "Sarah",
    "Michael",
    "Robert",
    "William",
    "George",
    "Thomas",
    "Henry",
    "Paul",
    "Peter",
    "Mark",
    "Lisa",
    "Emma",
    "Jack",
    "Kate",
    "Susan",
    "Frank",
    "Charles",
    "Edward",
    "Richard",
    "Joseph",
    "Daniel",
    "Andrew",
    "Steven",
    "Kevin",
    "Brian",
    "Jason",
    "Matthew",
    "Eric",
    "Stephen",
    "Scott",
    "Samuel",
    "Patrick",
    "Adam",
    "Nathan",
    "Walter",
    "Carl",
    "Roger",
    "Arthur",
    "Louis",
    "Philip",
    "Christian",
    "Linda",
    "Barbara",
    "Elizabeth",
    "Jennifer",
    "Maria",
    "Margaret",
    "Nancy",
    "Karen",
    "Helen",
    "Laura",
    "Jessica",
    "Rachel",
    "Emily",
    "Julia",
    "Diana",
    "Rose",
    "Jane",
    "Anne",
    "Victoria",
    "Grace",
    "Alan",
)

# Templates: {a} first name (the answer), {b} second name, repeated as the giver.
TEMPLATES = (
    "When{a} and{b} went to the store,{b} gave a drink to",
    "When{a} and{b} went to the park,{b} gave a ball to",
    "After{a} and{b} went to the office,{b} handed a letter to",
    "While{a} and{b} were at the house,{b} gave a book to",
)


class NameCopyingTask(_Task):
    """Copying a name from earlier in the prompt (indirect-object identification).

    Clean: ``"When A and B went to the store, B gave a drink to"`` (answer `` A``). Corrupted:
    the same prompt with A and B in the first clause replaced by two other names C and D, so
    the answer is nowhere in the prompt. Metric ``logit_diff`` = logit(`` A``) - logit(`` B``)
    at the last position (higher is better); extras ``answer_prob`` and ``accuracy``
    (answer logit above the repeated name's). Only names that are one token with a leading
    space are used (at least four are needed), and only the templates whose prompts all have
    the most common length, so prompts batch without padding.
    """

    name = "names"
    metric_name = "logit_diff"
    higher_is_better = True

    def __init__(
        self,
        tokenizer: Any,
        n_prompts: int = 24,
        seed: int = 0,
        *,
        names: Sequence[str] | None = None,
        templates: Sequence[str] = TEMPLATES,
        vocab_size: int | None = None,
        batch_size: int = 16,
    ) -> None:
        if n_prompts < 1:
            raise ConfigError(f"n_prompts must be >= 1, got {n_prompts}")
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        ids: dict[str, int] = {}
        for name in dict.fromkeys(names or NAMES):
            encoded = tokenizer.encode(" " + name, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] < self.vocab_size:
                ids[name] = int(encoded[0])
        if len(ids) < 4:
            raise ConfigError(
                f"the tokenizer has only {len(ids)} single-token names ({', '.join(ids)}); "
                "the name task needs 4: pass names="
            )
        self.names = tuple(ids)
        rng = np.random.default_rng(seed)
        # Keep the templates of the most common length (names are one token each).
        first = self.names[:2]
        lengths = [
            len(tokenizer.encode(t.format(a=" " + first[0], b=" " + first[1]), add_special_tokens=False))
            for t in templates
        ]
        if not lengths:
            raise ConfigError("no name-copying template given; pass templates=")
        common = int(pd.Series(lengths).mode().iloc[0])
        templates = [t for t, n in zip(templates, lengths) if n == common]
        prompts: list[tuple[list[int], list[int], int, int, str]] = []
        attempts = 0
        while len(prompts) < n_prompts and attempts < 50 * n_prompts:
            attempts += 1
            template = templates[int(rng.integers(len(templates)))]
            a, b, c, d = (self.names[i] for i in rng.choice(len(self.names), 4, replace=False))
            clean_text = template.format(a=" " + a, b=" " + b)
            corrupted_text = self._corrupt(template, c, d, b)
            clean_ids = tokenizer.encode(clean_text, add_special_tokens=False)
            corrupted_ids = tokenizer.encode(corrupted_text, add_special_tokens=False)
            if not len(clean_ids) == len(corrupted_ids) == common:
                continue
            prompts.append((clean_ids, corrupted_ids, ids[a], ids[b], clean_text))
        if not prompts:
            raise ConfigError("no name prompt tokenized to the templates' length; pass other templates=")
        self.texts = [p[4] for p in prompts]
        self.clean = torch.tensor([p[0] for p in prompts], dtype=torch.int64)
        self.corrupted = torch.tensor([p[1] for p in prompts], dtype=torch.int64)
        self.answers = torch.tensor([p[2] for p in prompts], dtype=torch.int64)
        self.repeated = torch.tensor([p[3] for p in prompts], dtype=torch.int64)

    @staticmethod
    def _corrupt(template: str, c: str, d: str, b: str) -> str:
        """The template with the first name C, the second D and the repeated name still B."""
        first, rest = template.split("{b}", 1)
        return first.format(a=" " + c) + " " + d + rest.format(b=" " + b)

    def _last(self, logits: torch.Tensor, index: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last = logits[:, -1, : self.vocab_size]
        answers = self.answers[index].to(last.device)
        repeated = self.repeated[index].to(last.device)
        return last, answers, repeated

    def per_example(self, logits, index):
        """logit(answer) - logit(repeated name) at the last position."""
        last, answers, repeated = self._last(logits, index)
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, answers] - last[rows, repeated]

    def extra(self, logits, index):
        """``answer_prob`` (softmax over the vocabulary) and ``accuracy`` (answer beats B)."""
        last, answers, _ = self._last(logits, index)
        rows = torch.arange(last.shape[0], device=last.device)
        prob = torch.softmax(last.double(), -1)[rows, answers]
        return {"answer_prob": prob, "accuracy": (self.per_example(logits, index) > 0).double()}

    def describe(self) -> dict[str, Any]:
        """Settings of the task (for results files)."""
        return {
            **super().describe(),
            "seed": self.seed,
            "n_names": len(self.names),
            "example": self.texts[0] if self.texts else None,
        }
