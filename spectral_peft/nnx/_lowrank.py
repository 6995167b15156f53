"""Flax NNX low-rank and sine low-rank Dense layers (thin wrappers over the core functions)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_peft import _validation
from spectral_peft._lowrank import matrices

Array = jax.Array
default_a_init = nnx.initializers.lecun_normal()
default_b_init = nnx.initializers.lecun_normal()


class LowRankDense(nnx.Module):
  """Drop-in ``nnx.Linear`` whose kernel is ``a @ b`` of rank ``rank``.

  Parameters: ``a: (in_features, rank)``, ``b: (rank, out_features)``, ``bias: (out_features,)``.
  With the default LeCun-normal inits (``a`` over fan-in ``in_features``, ``b`` over fan-in
  ``rank``) the kernel entries have variance ``1 / in_features``, like ``nnx.Linear``.

  Example:
    >>> from flax import nnx; import jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.nnx.LowRankDense(16, 8, rank=2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 16))).shape
    (4, 8)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      use_bias: bool = True,
      dtype: Optional[jnp.dtype] = None,
      param_dtype: jnp.dtype = jnp.float32,
      a_init: nnx.Initializer = default_a_init,
      b_init: nnx.Initializer = default_b_init,
      bias_init: nnx.Initializer = nnx.initializers.zeros_init(),
      rngs: nnx.Rngs,
  ):
    in_features = _validation.check_positive_int("in_features", in_features)
    out_features = _validation.check_positive_int("out_features", out_features)
    rank = _validation.check_positive_int("rank", rank)
    if rank > min(in_features, out_features):
      raise ValueError(f"`rank` must be at most min(in_features, out_features) = {min(in_features, out_features)}, got {rank}.")
    self.in_features, self.out_features, self.rank = in_features, out_features, rank
    self.dtype, self.param_dtype = dtype, param_dtype
    self.a = nnx.Param(a_init(rngs.params(), (in_features, rank), param_dtype))
    self.b = nnx.Param(b_init(rngs.params(), (rank, out_features), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

  def _promoted(self, x: Array):
    bias = self.bias[...] if self.bias is not None else None
    return nnx.nn.dtypes.promote_dtype((x, self.a[...], self.b[...], bias), dtype=self.dtype)

  def __call__(self, x: Array) -> Array:
    x, a, b, bias = self._promoted(x)
    return matrices.lowrank_dense(x, a, b, bias)


class SineLowRankDense(LowRankDense):
  """Drop-in ``nnx.Linear`` whose kernel is ``sin(omega a @ b) / gain`` (Ji et al., eq. 3).

  Defaults follow the paper and its reference code: both factors start from
  :func:`spectral_peft.sine_lowrank_factor_init` (PyTorch's Kaiming uniform with ``a = sqrt(5)``,
  ``U(+-1/sqrt(fan_in))``) and ``omega = 100`` (the low end of the paper's 100-1400), which puts the
  sine outside its linear regime at init (Remark 2). Before 0.2 the factors used LeCun normal (an
  effective omega 3x larger) and ``omega`` had no default.

  Takes the arguments of :class:`LowRankDense` and:

  Args:
    omega: fixed frequency; ``gain``: fixed divisor (``None``: ``sqrt(in_features)``).
    memory_lean: compute ``x @ kernel`` in column blocks with rematerialisation
      (:func:`spectral_peft.sine_lowrank_matmul`) so the ``(in, out)`` kernel is never held.
    block_size: column block for ``memory_lean``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      omega: float = matrices.DEFAULT_SINE_OMEGA,
      gain: Optional[float] = None,
      memory_lean: bool = False,
      block_size: Optional[int] = None,
      rngs: nnx.Rngs,
      **kwargs,
  ):
    self.omega = _validation.check_positive_float("omega", omega)
    self.gain = None if gain is None else _validation.check_positive_float("gain", gain)
    self.memory_lean = bool(memory_lean)
    self.block_size = None if block_size is None else _validation.check_positive_int("block_size", block_size)
    kwargs.setdefault("a_init", matrices.sine_lowrank_factor_init())
    kwargs.setdefault("b_init", matrices.sine_lowrank_factor_init())
    super().__init__(in_features, out_features, rank=rank, rngs=rngs, **kwargs)

  def __call__(self, x: Array) -> Array:
    x, a, b, bias = self._promoted(x)
    return matrices.sine_lowrank_dense(
        x, a, b, bias, omega=self.omega, gain=self.gain, memory_lean=self.memory_lean, block_size=self.block_size
    )
