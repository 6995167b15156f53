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
from spectral_peft._lrnn import component_apply
from spectral_peft._lrnn import component_init
from spectral_peft._lrnn import interaction_heatmap
from spectral_peft._lrnn import lrnn_apply
from spectral_peft._lrnn import lrnn_init
from spectral_peft._lrnn import lrnn_layer
from spectral_peft._lrnn import lrnn_projection_init
from spectral_peft._lrnn import product_activation
from spectral_peft._pde import laplacian
from spectral_peft._pde import poisson_exact_solution
from spectral_peft._pde import poisson_grid
from spectral_peft._pde import poisson_loss
from spectral_peft._pde import poisson_residual
from spectral_peft._pde import poisson_source
from spectral_peft._pde import relative_l2_error
from spectral_peft._sparse_interpolation import SparseFit
from spectral_peft._sparse_interpolation import random_support
from spectral_peft._sparse_interpolation import sparse_least_squares

__version__ = "0.1.0"

__all__ = (
    "SineRankBound",
    "SparseFit",
    "component_apply",
    "component_init",
    "default_block_size",
    "default_sine_gain",
    "interaction_heatmap",
    "laplacian",
    "linen",
    "lowrank",
    "lowrank_dense",
    "lrnn_apply",
    "lrnn_init",
    "lrnn_layer",
    "lrnn_projection_init",
    "nnx",
    "numerical_rank",
    "peft",
    "poisson_exact_solution",
    "poisson_grid",
    "poisson_loss",
    "poisson_residual",
    "poisson_source",
    "product_activation",
    "random_support",
    "relative_l2_error",
    "sine_lowrank",
    "sine_lowrank_dense",
    "sine_lowrank_matmul",
    "sparse_least_squares",
    "sine_rank_lower_bound",
    "singular_spectrum",
    "stable_rank",
)
