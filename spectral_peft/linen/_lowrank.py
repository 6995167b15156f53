"""Flax Linen low-rank and sine low-rank Dense layers (thin wrappers over the core functions)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_peft._lowrank import matrices

Array = jax.Array
Initializer = Callable[..., Array]


class LowRankDense(nn.Module):
  """Drop-in ``nn.Dense`` whose kernel is ``a @ b`` of rank ``rank``.

  Parameters: ``a: (in_features, rank)``, ``b: (rank, features)``, ``bias: (features,)``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.linen.LowRankDense(features=8, rank=2)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 16)))
    >>> layer.apply(variables, jnp.ones((4, 16))).shape
    (4, 8)
  """

  features: int
  rank: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  a_init: Initializer = nn.initializers.lecun_normal()
  b_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def _params(self, x: Array):
    in_features = x.shape[-1]
    if self.rank > min(in_features, self.features):
      raise ValueError(f"`rank` must be at most min(in_features, features) = {min(in_features, self.features)}, got {self.rank}.")
    a = self.param("a", self.a_init, (in_features, self.rank), self.param_dtype)
    b = self.param("b", self.b_init, (self.rank, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    return nn.dtypes.promote_dtype(x, a, b, bias, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, a, b, bias = self._params(x)
    return matrices.lowrank_dense(x, a, b, bias)


class SineLowRankDense(LowRankDense):
  """Drop-in ``nn.Dense`` whose kernel is ``sin(omega a @ b) / gain`` (Ji et al., eq. 3).

  Defaults follow the paper and its reference code: both factors start from
  :func:`spectral_peft.sine_lowrank_factor_init` (PyTorch's Kaiming uniform with ``a = sqrt(5)``) and
  ``omega = 100`` (:data:`DEFAULT_SINE_OMEGA`, the low end of the paper's 100-1400), which puts the
  sine outside its linear regime at init (Remark 2: a small omega only rescales ``a @ b`` and adds no
  rank). Before 0.2 the defaults were LeCun normal and ``omega = 1.0`` (a near-linear layer).

  Attributes:
    omega: fixed frequency; ``gain``: fixed divisor (``None``: ``sqrt(in_features)``).
    memory_lean: use the blocked, rematerialised product that never holds the kernel.
    block_size: column block for ``memory_lean``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.linen.SineLowRankDense(features=64, rank=2)
    >>> p = layer.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    >>> int(sp.numerical_rank(sp.sine_lowrank(p["a"], p["b"], omega=layer.omega))) > 2
    True
  """

  a_init: Initializer = matrices.sine_lowrank_factor_init()
  b_init: Initializer = matrices.sine_lowrank_factor_init()
  omega: float = matrices.DEFAULT_SINE_OMEGA
  gain: Optional[float] = None
  memory_lean: bool = False
  block_size: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, a, b, bias = self._params(x)
    return matrices.sine_lowrank_dense(
        x, a, b, bias, omega=self.omega, gain=self.gain, memory_lean=self.memory_lean, block_size=self.block_size
    )
