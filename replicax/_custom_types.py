"""Shared jaxtyping aliases (the dimension names used across replicax)."""

from typing import Any, Union

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree


# The last axis of every probability-like array is the vocabulary; everything in front
# of it is a batch of independent contexts.
Logits = Float[Array, "*batch vocab"]
LogProb = Float[Array, "*batch vocab"]
RealScalarLike = Union[float, int, Float[ArrayLike, ""], Int[ArrayLike, ""]]
BatchScalarLike = Union[float, int, Float[ArrayLike, "*batch"]]
TimesLike = Float[ArrayLike, " times"]
Aux = PyTree[Any]

__all__ = [
    "Any",
    "Array",
    "ArrayLike",
    "Aux",
    "BatchScalarLike",
    "Bool",
    "Float",
    "Int",
    "LogProb",
    "Logits",
    "PyTree",
    "RealScalarLike",
    "TimesLike",
]
