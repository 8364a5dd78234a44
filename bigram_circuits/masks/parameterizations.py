"""How mask logits become masks: the :class:`MaskParameterization` protocol, continuous
sparsification (:class:`ContinuousSparsification`, its soft mask recomputed in the backward)
and hard concrete gates (:class:`HardConcrete`), and :func:`make_parameterization` by name."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float

from bigram_circuits.errors import MaskError
from bigram_circuits.masks.vocabulary import ParameterizationName

__all__ = ["ContinuousSparsification", "HardConcrete", "MaskParameterization", "make_parameterization"]


@runtime_checkable
class MaskParameterization(Protocol):
    """How mask logits become masks: the strategy a :class:`MaskSet` takes.

    ``name`` is what configs and saved runs call it; ``sample_is_probability`` says that
    :meth:`sample` equals :meth:`probability` (so the penalty may be summed from the forward
    pass's masks, sharing their graph); ``stochastic`` that :meth:`sample` draws noise from the
    mask set's generator while training. The final (binary) mask is always ``logit > 0``.
    """

    name: str
    sample_is_probability: bool
    stochastic: bool

    def sample(
        self,
        logits: Float[torch.Tensor, "*shape"],
        temperature: float,
        training: bool,
        generator: torch.Generator | None,
    ) -> Float[torch.Tensor, "*shape"]:
        """The mask the forward pass multiplies by (differentiable w.r.t. ``logits``)."""
        ...

    def sample_kept(
        self,
        logits: Float[torch.Tensor, "*shape"],
        temperature: float,
        training: bool,
        generator: torch.Generator | None,
    ) -> Float[torch.Tensor, "*shape"]:
        """:meth:`sample` for a mask that nothing recomputes for the backward pass (autograd keeps
        what it needs of it): the same values, possibly through other kernels."""
        ...

    def probability(self, logits: Float[torch.Tensor, "*shape"], temperature: float) -> Float[torch.Tensor, "*shape"]:
        """The soft mask / P(entry on): the sparsity penalty, densities and the stopping rule."""
        ...

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which :meth:`probability` equals ``p``."""
        ...


class _SoftMask(torch.autograd.Function):
    """``sigmoid(T * logits)`` that saves only the logits (a parameter, alive anyway) and
    recomputes the sigmoid in the backward: the same kernels as autograd's own
    (``sigmoid_backward``, then ``x T``), so bitwise the same gradients, without keeping the soft
    mask (4 bytes per entry) from the forward pass to the backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        return torch.sigmoid(logits * temperature)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        soft = torch.sigmoid(logits * ctx.temperature)
        return torch.ops.aten.sigmoid_backward(grad, soft) * ctx.temperature, None


class ContinuousSparsification:
    """Soft mask ``sigmoid(T * m)`` (Savarese et al. 2020); final mask ``m > 0``."""

    name = "continuous"
    sample_is_probability = True  # the forward mask is the penalty's soft mask
    stochastic = False

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which the soft mask equals ``p``."""
        return math.log(p / (1.0 - p)) / temperature

    def sample(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        return _SoftMask.apply(logits, float(temperature))

    def sample_kept(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The same mask through autograd's own sigmoid, which keeps it for the backward (one
        pass over the logits less there, 4 bytes per entry more until then)."""
        return torch.sigmoid(logits * float(temperature))

    def probability(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The soft mask; used for the sparsity penalty, densities and the stopping rule."""
        return torch.sigmoid(logits * temperature)


class HardConcrete:
    """Hard concrete gates (Louizos et al. 2018): stretch (gamma, zeta), temperature beta.

    ``probability`` is the closed-form expected L0, P(gate != 0).
    """

    name = "hard_concrete"
    sample_is_probability = False
    stochastic = True

    def __init__(self, beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1):
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self._l0_shift = beta * math.log(-gamma / zeta)

    def sample(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        if training:
            # Noise is drawn on the generator's device (one stream for masks on several devices).
            noise_device = generator.device if generator is not None else logits.device
            u = torch.rand(logits.shape, generator=generator, device=noise_device, dtype=logits.dtype)
            u = u.to(logits.device)
            u = u.clamp(1e-6, 1.0 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / self.beta)
        else:
            s = torch.sigmoid(logits)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample_kept(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """:meth:`sample` (a sampled gate is never recomputed)."""
        return self.sample(logits, temperature, training, generator)

    def probability(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.sigmoid(logits - self._l0_shift)

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which P(gate != 0) equals ``p``."""
        return math.log(p / (1.0 - p)) + self._l0_shift


def make_parameterization(name: ParameterizationName | MaskParameterization) -> MaskParameterization:
    """The parameterization called ``name`` (an instance is returned as it is)."""
    if not isinstance(name, str):
        if isinstance(name, MaskParameterization):
            return name
        raise MaskError(
            f"{type(name).__name__} is not a mask parameterization (needs name, sample, sample_kept, "
            "probability, logit_at, sample_is_probability, stochastic)"
        )
    if name == "continuous":
        return ContinuousSparsification()
    if name == "hard_concrete":
        return HardConcrete()
    raise MaskError(f"unknown parameterization {name!r}; use 'continuous' or 'hard_concrete'")


_make_parameterization = make_parameterization  # the old private name
