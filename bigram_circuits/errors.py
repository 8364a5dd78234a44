"""Exceptions raised by bigram_circuits; each message is one line that says what to do."""

from __future__ import annotations


class BigramCircuitsError(Exception):
    """Base class of every error this package raises on bad input."""


class CorpusError(BigramCircuitsError, ValueError):
    """A corpus source cannot be found, fetched, read or is too small."""


class ModelLoadError(BigramCircuitsError, ValueError):
    """A model cannot be loaded or re-created (unknown name offline, missing or corrupt files, vocab mismatch)."""


class TokenError(BigramCircuitsError, ValueError):
    """Token ids are invalid (negative, out of range, wrong dtype, empty, or token arrays of mismatched shapes).

    Only for the token ids themselves; a bad option value is a :class:`ConfigError`.
    """


class StatsError(BigramCircuitsError, ValueError):
    """Bigram statistics do not match the model or tokenizer, or a stats file is invalid."""


class MaskError(BigramCircuitsError, ValueError):
    """A mask or subnetwork does not fit the model, granularity, or is applied twice."""


class SearchError(BigramCircuitsError, RuntimeError):
    """A search cannot run or diverged (bad config, NaN loss)."""


class NonFiniteLoss(SearchError):
    """The batch loss of a search step was not finite; raised before the backward pass, so the mask
    logits, optimizer, temperature and step are those of the last good step."""

    def __init__(self, value: float, step: int, lam: float) -> None:
        super().__init__(f"loss became {value} at step {step} (lambda {lam:g})")
        self.value, self.step = value, step


class GradientOverflow(NonFiniteLoss):
    """The mask-logit gradients overflowed float32 at every loss scale a search step tried; raised
    before the optimizer step, so the mask logits, optimizer, temperature and step are those of the
    last good step."""

    def __init__(self, step: int, lam: float, scale: float) -> None:
        SearchError.__init__(
            self,
            f"the mask-logit gradients overflowed float32 at step {step} (lambda {lam:g}) "
            f"with the loss scaled down to {scale:g}",
        )
        self.value, self.step = float("inf"), step


class UnsafeFileError(BigramCircuitsError, ValueError):
    """A file would need to execute code to be loaded (e.g. a pickle with objects), so it is refused."""


class ConfigError(BigramCircuitsError, ValueError):
    """An option or argument has an invalid value (out of range, NaN, unknown name, wrong shape, too few rows)."""


class OutputError(BigramCircuitsError, OSError):
    """An output file or directory cannot be written (permission denied, disk full, not a directory)."""


class ManifestError(BigramCircuitsError, ValueError):
    """A run directory's manifest.json is missing or unreadable."""


class DeviceError(ConfigError):
    """A device option (or device map) asks for a device that is unknown, not present here, or
    impossible for this launch (e.g. one GPU for every torchrun rank); a :class:`ConfigError`."""


class FigureDataError(BigramCircuitsError, ValueError):
    """A results table lacks the columns (or shape) a figure or table needs."""


class BaselineError(BigramCircuitsError, ValueError):
    """A baseline cannot be built from the models or data given."""


class HubError(BigramCircuitsError, OSError):
    """A Hugging Face Hub repository cannot be resolved, read from the cache or pushed to."""


class FigureExportWarning(RuntimeWarning):
    """A figure's PNG was not written (no Chromium, the export failed or did not finish in time);
    its HTML was."""
