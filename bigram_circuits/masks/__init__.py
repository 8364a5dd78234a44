"""Learnable masks over a TransformerBridge: granularities, parameterisations and attachment.

Granularities (combine freely, e.g. ``("neuron", "head")``):

- ``"neuron"``: one entry per MLP neuron, applied to ``blocks.{L}.mlp.hook_post``
  ([batch, pos, d_mlp]); mask key ``blocks.{L}.mlp.hook_post``.
- ``"head"``: one entry per attention head, applied to ``blocks.{L}.attn.hook_z``
  ([batch, pos, n_heads, d_head]); mask key ``blocks.{L}.attn.hook_z``.
- ``"weight"``: one entry per weight of every attention (Q, K, V, O) and MLP (in, out, and
  gate for gated MLPs) matrix; mask keys ``blocks.{L}.attn.{q,k,v,o}.weight`` and
  ``blocks.{L}.mlp.{in,gate,out}.weight``. Embeddings, unembedding, layernorms and biases are
  never masked, and weights that are exactly zero are never kept (as in the paper).

Each granularity is a :class:`GranularitySpec` in a registry (:func:`register_granularity`,
:data:`GRANULARITY_REGISTRY`): its components for a model, how its masks attach, how its entries
expand to weight masks, its default learning rate and its typed key. The three above are
:class:`NeuronGranularity`, :class:`HeadGranularity` and :class:`WeightGranularity`; code that
handles masks asks the registry (:func:`get_granularity`, :func:`granularity_of_key`) instead of
branching on names.

The built-in keys are built and parsed only by :class:`MaskKey` (``str(MaskKey.head(0)) ==
"blocks.0.attn.hook_z"``, ``MaskKey.parse("blocks.0.mlp.in.weight")``); any registered key by
:func:`parse_mask_key`. Mask dicts and saved files hold the keys' strings.

Weight masks are stored in one canonical layout, ``[out_features, in_features]`` (the
``nn.Linear`` convention), whatever the module's own layout (GPT-2's ``Conv1D`` is transposed).

Parameterisations:

- ``"continuous"``: continuous sparsification (Savarese et al. 2020), as in the paper. A real
  logit per entry (init 0), soft mask ``sigmoid(T * m)``; the search multiplies ``T`` by 1.001
  per step; the final mask is ``m > 0``.
- ``"hard_concrete"``: hard concrete gates (Louizos et al. 2018), stretch (-0.1, 1.1),
  beta 2/3, sampled while training, deterministic in eval mode, closed-form expected L0.
  The final mask is also ``m > 0`` (the deterministic gate is above 0.5 exactly then).

Both implement :class:`MaskParameterization` (``sample``, ``probability``, ``logit_at``);
:class:`MaskSet` takes a name or any instance.

Applying masks: :func:`attach_masks` is the one mechanism (forward hooks on the HookPoints for
neurons and heads, ``torch.nn.utils.parametrize`` for weights, one application per bridge at a
time); :meth:`MaskSet.attach` (soft masks), :func:`apply_binary_masks` and
``Subnetwork.applied`` (boolean masks, keep or ablate) and ``Candidate.applied`` are built on it.

A mask entry's size in the paper's unit (weights gated): a weight gates 1 weight; a neuron
gates its row of every MLP input matrix and its column of the output matrix; a head gates its
d_head rows of Q (and its share of K and V under grouped-query attention) and its d_head
columns of O.
The modules, each importing only those above it:

- :mod:`~bigram_circuits.masks.vocabulary`: the ``Literal`` names and :class:`MaskKey`;
- :mod:`~bigram_circuits.masks.geometry`: :class:`ModelGeometry` and the projections a bridge
  runs through;
- :mod:`~bigram_circuits.masks.hooks`: the hooks and weight parametrizations an attachment adds
  (:class:`Attachment`);
- :mod:`~bigram_circuits.masks.granularities`: :class:`MaskComponent`, :class:`GranularitySpec`,
  the built-in granularities and the registry;
- :mod:`~bigram_circuits.masks.attach`: :func:`attach_masks` and :func:`apply_binary_masks`;
- :mod:`~bigram_circuits.masks.parameterizations`: :class:`MaskParameterization` and its two
  implementations;
- :mod:`~bigram_circuits.masks.maskset`: :class:`MaskSet` and :class:`ForwardMasks`;
- :mod:`~bigram_circuits.masks.expand`: :func:`expand_to_weight_masks`;
- :mod:`~bigram_circuits.masks.authors`: the authors' released mask format (HF parameter names
  and layouts, the restricted pickle reader).
"""

from bigram_circuits.masks.attach import apply_binary_masks, attach_masks, masks_attached
from bigram_circuits.masks.authors import (
    author_dict_to_weight_masks,
    author_parameter_names,
    weight_masks_to_author_dict,
)
from bigram_circuits.masks.expand import expand_to_weight_masks
from bigram_circuits.masks.geometry import ModelGeometry, model_geometry
from bigram_circuits.masks.granularities import (
    DEFAULT_LEARNING_RATES,
    GRANULARITY_REGISTRY,
    GranularitySpec,
    HeadGranularity,
    MaskComponent,
    NeuronGranularity,
    WeightGranularity,
    component_device,
    get_granularity,
    granularity_of_key,
    mask_components,
    parse_granularities,
    parse_mask_key,
    register_granularity,
    registered_granularities,
    unregister_granularity,
    weight_tensor,
)
from bigram_circuits.masks.granularities import _weight_module as _weight_module
from bigram_circuits.masks.hooks import Attachment
from bigram_circuits.masks.hooks import _MaskedWeights as _MaskedWeights
from bigram_circuits.masks.maskset import ForwardMasks, MaskSet
from bigram_circuits.masks.maskset import _safe as _safe
from bigram_circuits.masks.parameterizations import (
    ContinuousSparsification,
    HardConcrete,
    MaskParameterization,
    make_parameterization,
)
from bigram_circuits.masks.parameterizations import _make_parameterization as _make_parameterization
from bigram_circuits.masks.vocabulary import (
    ATTN_MATRICES,
    DEFAULT_GRANULARITIES,
    GRANULARITIES,
    MLP_MATRICES,
    PARAMETERIZATIONS,
    RUN_MODES,
    Block,
    BuiltinGranularity,
    Granularity,
    MaskKey,
    MaskKind,
    Matrix,
    ParameterizationName,
    PenaltyWeighting,
    RunMode,
    TypedMaskKey,
    UnitGranularity,
    check_run_mode,
)

# The private helpers imported ``as`` themselves above (_MaskedWeights, _make_parameterization,
# _safe, _weight_module) stay importable from here, as before the package split; new code
# imports them from their modules.
__all__ = [
    "ATTN_MATRICES",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_LEARNING_RATES",
    "GRANULARITIES",
    "GRANULARITY_REGISTRY",
    "MLP_MATRICES",
    "PARAMETERIZATIONS",
    "RUN_MODES",
    "Attachment",
    "Block",
    "BuiltinGranularity",
    "ContinuousSparsification",
    "ForwardMasks",
    "Granularity",
    "GranularitySpec",
    "HardConcrete",
    "HeadGranularity",
    "MaskComponent",
    "MaskKey",
    "MaskKind",
    "MaskParameterization",
    "MaskSet",
    "Matrix",
    "ModelGeometry",
    "NeuronGranularity",
    "ParameterizationName",
    "PenaltyWeighting",
    "RunMode",
    "TypedMaskKey",
    "UnitGranularity",
    "WeightGranularity",
    "apply_binary_masks",
    "attach_masks",
    "author_dict_to_weight_masks",
    "author_parameter_names",
    "check_run_mode",
    "component_device",
    "expand_to_weight_masks",
    "get_granularity",
    "granularity_of_key",
    "make_parameterization",
    "mask_components",
    "masks_attached",
    "model_geometry",
    "parse_granularities",
    "parse_mask_key",
    "register_granularity",
    "registered_granularities",
    "unregister_granularity",
    "weight_masks_to_author_dict",
    "weight_tensor",
]
