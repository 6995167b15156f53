"""Thin Flax Linen modules over the core functions of :mod:`spectral_peft`."""

from spectral_peft.linen._lrnn import LRNN
from spectral_peft.linen._lrnn import LRNNLayer
from spectral_peft.linen._lowrank import LowRankDense
from spectral_peft.linen._lowrank import SineLowRankDense
from spectral_peft.linen._siren import PeriodicSiren
from spectral_peft.linen._siren import periodic_siren_dict
from spectral_peft.linen._spectral import FourierFTDense
from spectral_peft.linen._spectral import LFMADense
from spectral_peft.linen._spectral import SHiRADense
from spectral_peft.linen._spectral import WaveFTDense

__all__ = (
    "FourierFTDense",
    "LFMADense",
    "LRNN",
    "LRNNLayer",
    "LowRankDense",
    "PeriodicSiren",
    "SHiRADense",
    "SineLowRankDense",
    "WaveFTDense",
    "periodic_siren_dict",
)
