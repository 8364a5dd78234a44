"""The run-time type checker of the test suite (``--jaxtyping-packages=bigram_circuits,typechecks.checked``
in pyproject.toml): every function of the package is wrapped by ``jaxtyping.jaxtyped`` with
beartype, so jaxtyping shapes and plain annotations are checked on every call in the tests."""

from beartype import BeartypeConf, beartype

# PEP 484's numeric tower, as static checkers read it: an int is a valid float (temperature=0).
checked = beartype(conf=BeartypeConf(is_pep484_tower=True))
