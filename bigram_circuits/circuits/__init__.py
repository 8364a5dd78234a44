"""Circuit analyses of a bridge, its bigram subnetwork and controls.

A *run* is the full model (``None``) or a subnetwork kept / ablated (a
:class:`~bigram_circuits.runspec.RunSpec`); every analysis takes its run as one ``run``
argument, so the full model, the bigram subnetwork and a random same-shape subnetwork can be
compared side by side.

- :mod:`~bigram_circuits.circuits.patching`: activation patching between two runs.
- :mod:`~bigram_circuits.circuits.lens`: logit lens and the paper's linear lens (rotation,
  recall@k).
- :mod:`~bigram_circuits.circuits.similarity`: layer covariance similarity.
- :mod:`~bigram_circuits.circuits.ablation`: sufficiency / necessity of candidate circuits
  (e.g. induction heads) relative to the bigram subnetwork.
- :mod:`~bigram_circuits.circuits.overlap`: overlap between subnetworks and its random null.
"""

from bigram_circuits.circuits.ablation import (
    Candidate,
    RepeatedSequenceLoss,
    add_candidate,
    find_induction_heads,
    head_scores,
    necessity,
    repeated_random_tokens,
    repeated_sequence_loss,
    repeated_sequence_losses,
    select_heads,
    sufficiency,
)
from bigram_circuits.circuits.lens import (
    LinearLensConfig,
    RidgeMap,
    fit_ridge,
    lens_report,
    linear_lens,
    logit_lens,
    logit_lens_logits,
    logit_lens_report,
    logit_lens_top_tokens,
    recall_at_k,
    rotation_degrees,
)
from bigram_circuits.circuits.overlap import (
    BlockCounts,
    OverlapResult,
    block_counts,
    layer_distribution,
    null_overlap_samples,
    overlap,
    overlap_table,
)
from bigram_circuits.circuits.patching import (
    COMPONENTS,
    bigram_cross_entropy,
    cache_run,
    kl_to_reference,
    logit_difference,
    next_token_loss,
    patch,
    run_with_patches,
)
from bigram_circuits.circuits.runs import (
    LoadedRun,
    RunLike,
    RunSpec,
    SubnetworkLike,
    collect_activations,
    hidden_state_names,
    load_run,
    run_context,
    subnetwork_dir_of,
)
from bigram_circuits.circuits.similarity import (
    covariance_similarity,
    deflated_covariance,
    layer_covariance_similarity,
    similarity_report,
)

__all__ = [
    "COMPONENTS",
    "BlockCounts",
    "Candidate",
    "LinearLensConfig",
    "LoadedRun",
    "OverlapResult",
    "RepeatedSequenceLoss",
    "RidgeMap",
    "RunLike",
    "RunSpec",
    "SubnetworkLike",
    "add_candidate",
    "bigram_cross_entropy",
    "block_counts",
    "cache_run",
    "collect_activations",
    "covariance_similarity",
    "deflated_covariance",
    "find_induction_heads",
    "fit_ridge",
    "head_scores",
    "hidden_state_names",
    "kl_to_reference",
    "layer_covariance_similarity",
    "layer_distribution",
    "lens_report",
    "linear_lens",
    "load_run",
    "logit_difference",
    "logit_lens",
    "logit_lens_logits",
    "logit_lens_report",
    "logit_lens_top_tokens",
    "necessity",
    "next_token_loss",
    "null_overlap_samples",
    "overlap",
    "overlap_table",
    "patch",
    "recall_at_k",
    "repeated_random_tokens",
    "repeated_sequence_loss",
    "repeated_sequence_losses",
    "rotation_degrees",
    "run_context",
    "run_with_patches",
    "select_heads",
    "similarity_report",
    "subnetwork_dir_of",
    "sufficiency",
]
