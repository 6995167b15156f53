"""Thin Flax Linen modules over the core functions of :mod:`spectral_peft`."""

from spectral_peft.linen._lowrank import LowRankDense
from spectral_peft.linen._lowrank import SineLowRankDense

__all__ = (
    "LowRankDense",
    "SineLowRankDense",
)
