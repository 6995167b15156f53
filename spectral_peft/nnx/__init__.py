"""Thin Flax NNX modules over the core functions of :mod:`spectral_peft`."""

from spectral_peft.nnx._lowrank import LowRankDense
from spectral_peft.nnx._lowrank import SineLowRankDense

__all__ = (
    "LowRankDense",
    "SineLowRankDense",
)
