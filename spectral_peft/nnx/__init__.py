"""Thin Flax NNX modules over the core functions of :mod:`spectral_peft`."""

from spectral_peft.nnx._lrnn import LRNN
from spectral_peft.nnx._lrnn import LRNNLayer
from spectral_peft.nnx._lowrank import LowRankDense
from spectral_peft.nnx._lowrank import SineLowRankDense
from spectral_peft.nnx._siren import Frequencies
from spectral_peft.peft._runtime.nnx import AdapterConstant
from spectral_peft.peft._runtime.nnx import AdapterParam
from spectral_peft.peft._runtime.nnx import adapt
from spectral_peft.peft._runtime.nnx import set_adapter
from spectral_peft.peft._runtime.nnx import merge_and_unload
from spectral_peft.peft._runtime.nnx import disable_adapters
from spectral_peft.peft._runtime.nnx import delete_adapter
from spectral_peft.peft._runtime.nnx import adapter_names
from spectral_peft.peft._runtime.nnx import add_weighted_adapter
from spectral_peft.peft._runtime.nnx import active_adapters
from spectral_peft.peft._runtime.nnx import adapter_index
from spectral_peft.peft._runtime.nnx import adapters_of
from spectral_peft.peft._runtime.nnx import attach
from spectral_peft.peft._runtime.nnx import base_params
from spectral_peft.peft._runtime.nnx import detach_adapters
from spectral_peft.peft._runtime.nnx import load_into
from spectral_peft.peft._runtime.nnx import merge_adapters
from spectral_peft.peft._runtime.nnx import quantize
from spectral_peft.peft._runtime.nnx import set_adapter_dropout
from spectral_peft.nnx._siren import PeriodicSiren
from spectral_peft.nnx._spectral import AdapterIndices
from spectral_peft.nnx._spectral import FourierFTDense
from spectral_peft.nnx._spectral import LFMADense
from spectral_peft.nnx._spectral import SHiRADense
from spectral_peft.nnx._spectral import WaveFTDense

__all__ = (
    "AdapterConstant",
    "AdapterIndices",
    "AdapterParam",
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
    "adapt",
    "set_adapter",
    "merge_and_unload",
    "disable_adapters",
    "delete_adapter",
    "adapter_names",
    "add_weighted_adapter",
    "active_adapters",
    "adapter_index",
    "adapters_of",
    "attach",
    "base_params",
    "detach_adapters",
    "load_into",
    "merge_adapters",
    "quantize",
    "set_adapter_dropout",
)
