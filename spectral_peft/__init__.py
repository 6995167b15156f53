"""spectral_peft: parameter-efficient learning with spectral and sinusoidal structure, in JAX.

Pure functions of arrays at the top level, adapters over parameter pytrees in
:mod:`spectral_peft.peft`, thin Flax modules in :mod:`spectral_peft.nnx` and
:mod:`spectral_peft.linen`. The three subpackages load on first use (``sp.nnx.LRNN`` works as
usual), so that ``import spectral_peft`` does not pay for Flax, optax or orbax.
"""

from typing import TYPE_CHECKING

from spectral_peft._lazy import lazy_names as _lazy_names

from spectral_peft._version import __version__
from spectral_peft._lowrank.diagnostics import SineRankBound
from spectral_peft._lowrank.diagnostics import numerical_rank
from spectral_peft._lowrank.diagnostics import sine_rank_lower_bound
from spectral_peft._lowrank.diagnostics import singular_spectrum
from spectral_peft._lowrank.diagnostics import stable_rank
from spectral_peft._lowrank.matrices import default_block_size
from spectral_peft._lowrank.matrices import default_sine_gain
from spectral_peft._lowrank.matrices import lowrank
from spectral_peft._lowrank.matrices import lowrank_dense
from spectral_peft._lowrank.matrices import sine_lowrank
from spectral_peft._lowrank.matrices import sine_lowrank_dense
from spectral_peft._lowrank.matrices import sine_lowrank_factor_init
from spectral_peft._lowrank.matrices import sine_lowrank_matmul
from spectral_peft._lrnn.network import interaction_heatmap
from spectral_peft._lrnn.network import lrnn_apply
from spectral_peft._lrnn.network import lrnn_init
from spectral_peft._lrnn.network import lrnn_layer
from spectral_peft._lrnn.network import lrnn_projection_init
from spectral_peft._lrnn.neurons import component_apply
from spectral_peft._lrnn.neurons import component_init
from spectral_peft._lrnn.neurons import product_activation
from spectral_peft._lrnn.neurons import resolve_activation
from spectral_peft._lrnn.pde import laplacian
from spectral_peft._lrnn.pde import poisson_exact_solution
from spectral_peft._lrnn.pde import poisson_grid
from spectral_peft._lrnn.pde import poisson_loss
from spectral_peft._lrnn.pde import poisson_residual
from spectral_peft._lrnn.pde import poisson_source
from spectral_peft._lrnn.pde import relative_l2_error
from spectral_peft._sinusoidal.bounding import block_bounds
from spectral_peft._sinusoidal.bounding import block_index
from spectral_peft._sinusoidal.bounding import bound_matrix
from spectral_peft._sinusoidal.bounding import bound_params
from spectral_peft._sinusoidal.bounding import bounding
from spectral_peft._sinusoidal.fitting import FitResult
from spectral_peft._sinusoidal.fitting import fit_periodic_siren
from spectral_peft._sinusoidal.frequency_analysis import HarmonicExpansion
from spectral_peft._sinusoidal.frequency_analysis import SubPeriod
from spectral_peft._sinusoidal.frequency_analysis import amplitude_bound
from spectral_peft._sinusoidal.frequency_analysis import bessel_j
from spectral_peft._sinusoidal.frequency_analysis import detect_sub_period
from spectral_peft._sinusoidal.frequency_analysis import expansion_apply
from spectral_peft._sinusoidal.frequency_analysis import generated_frequencies
from spectral_peft._sinusoidal.frequency_analysis import harmonic_expansion
from spectral_peft._sinusoidal.frequency_analysis import hidden_neurons
from spectral_peft._sinusoidal.frequency_analysis import multi_indices
from spectral_peft._sinusoidal.growing import GrowthRound
from spectral_peft._sinusoidal.growing import band_frequencies
from spectral_peft._sinusoidal.growing import block_importance
from spectral_peft._sinusoidal.growing import grow_loop
from spectral_peft._sinusoidal.growing import grow_params
from spectral_peft._sinusoidal.pruning import PruningRound
from spectral_peft._sinusoidal.pruning import prune_params
from spectral_peft._sinusoidal.pruning import pruning_selection
from spectral_peft._sinusoidal.pruning import shrink_params
from spectral_peft._sinusoidal.pruning import structured_pruning
from spectral_peft._sinusoidal.siren import frequencies_as_integers
from spectral_peft._sinusoidal.siren import integer_frequencies
from spectral_peft._sinusoidal.siren import periodic_siren_apply
from spectral_peft._sinusoidal.siren import periodic_siren_first_layer
from spectral_peft._sinusoidal.siren import periodic_siren_init
from spectral_peft._sinusoidal.siren import periodic_siren_num_parameters
from spectral_peft._sinusoidal.siren import siren_frequencies
from spectral_peft._sinusoidal.siren import symmetric_frequencies
from spectral_peft._sinusoidal.weight_decay import alpha_schedule
from spectral_peft._sinusoidal.weight_decay import group_l1_norms
from spectral_peft._sinusoidal.weight_decay import l1_weight_decay
from spectral_peft._sinusoidal.weight_decay import regularized_loss
from spectral_peft._sinusoidal.weight_decay import targeted_weight_decay
from spectral_peft._sparse.deltas import fourier_delta
from spectral_peft._sparse.deltas import fourier_matmul
from spectral_peft._sparse.deltas import scatter_coefficients
from spectral_peft._sparse.deltas import sparse_matmul
from spectral_peft._sparse.deltas import random_topk_spectrum
from spectral_peft._sparse.deltas import topk_spectral_mask
from spectral_peft._sparse.deltas import waveft_delta
from spectral_peft._sparse.deltas import waveft_matmul
from spectral_peft._sparse.interpolation import SparseFit
from spectral_peft._sparse.interpolation import random_support
from spectral_peft._sparse.interpolation import sparse_least_squares
from spectral_peft._sparse.theory import gradient_coverage
from spectral_peft._sparse.theory import lemma1_threshold
from spectral_peft._sparse.theory import receptive_field_size
from spectral_peft._sparse.theory import sparse_positions
from spectral_peft._sparse.theory import sparse_rank_curve
from spectral_peft._sparse.wavelets import dwt2
from spectral_peft._sparse.wavelets import idwt2
from spectral_peft._sparse.wavelets import wavelet_coefficient_shape

# Lazy names (PEP 562): served on first access because their modules import Flax, optax or orbax,
# and ``import spectral_peft`` should cost little more than ``import jax``. Pure-JAX names are
# imported above, one per line. To add a name whose module is heavy: an entry here
# (name -> module) and the same import in the ``TYPE_CHECKING`` block, which type checkers read.
_LAZY: dict[str, str] = {
    "linen": "spectral_peft.linen",
    "nnx": "spectral_peft.nnx",
    "peft": "spectral_peft.peft",
}

if TYPE_CHECKING:
  from spectral_peft import linen
  from spectral_peft import nnx
  from spectral_peft import peft


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals())


__all__ = (
    "FitResult",
    "GrowthRound",
    "HarmonicExpansion",
    "PruningRound",
    "SineRankBound",
    "SparseFit",
    "SubPeriod",
    "alpha_schedule",
    "amplitude_bound",
    "band_frequencies",
    "bessel_j",
    "block_bounds",
    "block_importance",
    "block_index",
    "bound_matrix",
    "bound_params",
    "bounding",
    "component_apply",
    "component_init",
    "default_block_size",
    "default_sine_gain",
    "detect_sub_period",
    "dwt2",
    "expansion_apply",
    "fit_periodic_siren",
    "fourier_delta",
    "fourier_matmul",
    "frequencies_as_integers",
    "generated_frequencies",
    "gradient_coverage",
    "group_l1_norms",
    "grow_loop",
    "grow_params",
    "harmonic_expansion",
    "hidden_neurons",
    "idwt2",
    "integer_frequencies",
    "interaction_heatmap",
    "l1_weight_decay",
    "laplacian",
    "lemma1_threshold",
    "linen",
    "lowrank",
    "lowrank_dense",
    "lrnn_apply",
    "lrnn_init",
    "lrnn_layer",
    "lrnn_projection_init",
    "multi_indices",
    "nnx",
    "numerical_rank",
    "peft",
    "periodic_siren_apply",
    "periodic_siren_first_layer",
    "periodic_siren_init",
    "periodic_siren_num_parameters",
    "poisson_exact_solution",
    "poisson_grid",
    "poisson_loss",
    "poisson_residual",
    "poisson_source",
    "product_activation",
    "prune_params",
    "pruning_selection",
    "random_support",
    "receptive_field_size",
    "regularized_loss",
    "random_topk_spectrum",
    "relative_l2_error",
    "resolve_activation",
    "scatter_coefficients",
    "shrink_params",
    "sine_lowrank",
    "sine_lowrank_dense",
    "sine_lowrank_factor_init",
    "sine_lowrank_matmul",
    "siren_frequencies",
    "sparse_least_squares",
    "sine_rank_lower_bound",
    "singular_spectrum",
    "sparse_matmul",
    "sparse_positions",
    "sparse_rank_curve",
    "stable_rank",
    "structured_pruning",
    "symmetric_frequencies",
    "targeted_weight_decay",
    "topk_spectral_mask",
    "waveft_delta",
    "waveft_matmul",
    "wavelet_coefficient_shape",
)
