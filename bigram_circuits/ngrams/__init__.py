"""N-gram statistics of a token corpus: sparse counts, backoff distributions and the soft
cross-entropy of model logits against them, without ever building a dense (batch, pos, vocab)
target.

- :mod:`~bigram_circuits.ngrams.counting`: exact, streaming counting into sparse count tables
  (:class:`CountTable`); :mod:`bigram_circuits.cluster` counts shards with it;
- :mod:`~bigram_circuits.ngrams.loss`: sparse soft targets (:class:`TargetRows`) and the soft
  cross-entropy of logits against them, with a custom backward;
- :mod:`~bigram_circuits.ngrams.stats`: :class:`BigramStats`, the counts of a corpus, their
  backoff distributions (defined there), the loss, permuted controls and the stats file.
"""

from bigram_circuits.ngrams.counting import CountTable
from bigram_circuits.ngrams.loss import TargetRows
from bigram_circuits.ngrams.stats import PERMUTATION_VARIANTS, STATS_FORMAT_VERSION, BigramStats

__all__ = ["PERMUTATION_VARIANTS", "STATS_FORMAT_VERSION", "BigramStats", "CountTable", "TargetRows"]
