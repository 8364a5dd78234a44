"""The run-time type checker of the test suite (``--jaxtyping-packages=bigram_circuits,typechecks.checked``
in pyproject.toml): every function of the package is wrapped by ``jaxtyping.jaxtyped`` with
beartype, so jaxtyping shapes and plain annotations are checked on every call in the tests."""

import contextlib
from collections.abc import Iterator

import jaxtyping
from beartype import BeartypeConf, beartype

# PEP 484's numeric tower, as static checkers read it: an int is a valid float (temperature=0).
checked = beartype(conf=BeartypeConf(is_pep484_tower=True))


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """The run-time checks off inside the block: for tests of the package's own input validation,
    which pass wrongly typed arguments on purpose and expect the one-line errors a user without
    a type checker gets."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
