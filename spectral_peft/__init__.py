"""spectral_peft: parameter-efficient learning with spectral and sinusoidal structure, in JAX.

Pure functions of arrays at the top level, adapters over parameter pytrees in
:mod:`spectral_peft.peft`, thin Flax modules in :mod:`spectral_peft.nnx` and
:mod:`spectral_peft.linen`.
"""

from spectral_peft import linen
from spectral_peft import nnx
from spectral_peft import peft
from spectral_peft._diagnostics import SineRankBound
from spectral_peft._diagnostics import numerical_rank
from spectral_peft._diagnostics import sine_rank_lower_bound
from spectral_peft._diagnostics import singular_spectrum
from spectral_peft._diagnostics import stable_rank
from spectral_peft._lowrank import default_block_size
from spectral_peft._lowrank import default_sine_gain
from spectral_peft._lowrank import lowrank
from spectral_peft._lowrank import lowrank_dense
from spectral_peft._lowrank import sine_lowrank
from spectral_peft._lowrank import sine_lowrank_dense
from spectral_peft._lowrank import sine_lowrank_matmul

__version__ = "0.1.0"

__all__ = (
    "SineRankBound",
    "default_block_size",
    "default_sine_gain",
    "linen",
    "lowrank",
    "lowrank_dense",
    "nnx",
    "numerical_rank",
    "peft",
    "sine_lowrank",
    "sine_lowrank_dense",
    "sine_lowrank_matmul",
    "sine_rank_lower_bound",
    "singular_spectrum",
    "stable_rank",
)
