"""Thin Flax NNX modules over the core functions of :mod:`spectral_peft`."""

from spectral_peft.nnx._lrnn import LRNN
from spectral_peft.nnx._lrnn import LRNNLayer
from spectral_peft.nnx._lowrank import LowRankDense
from spectral_peft.nnx._lowrank import SineLowRankDense
from spectral_peft.nnx._siren import Frequencies
from spectral_peft.nnx._siren import PeriodicSiren
from spectral_peft.nnx._spectral import AdapterIndices
from spectral_peft.nnx._spectral import FourierFTDense
from spectral_peft.nnx._spectral import LFMADense
from spectral_peft.nnx._spectral import SHiRADense
from spectral_peft.nnx._spectral import WaveFTDense

__all__ = (
    "AdapterIndices",
    "FourierFTDense",
    "Frequencies",
    "LFMADense",
    "LRNN",
    "LRNNLayer",
    "LowRankDense",
    "PeriodicSiren",
    "SHiRADense",
    "SineLowRankDense",
    "WaveFTDense",
)
