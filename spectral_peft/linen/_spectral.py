"""Flax Linen Dense layers with a sparse/spectral adapter (WaveFT, SHiRA, FourierFT, LFMA), thin over the core.

Variables: ``params/kernel: (in, features)`` and ``params/bias`` (the base layer; freeze them in the
optimizer), ``params/values: (p,)`` (the adapter's trainable coefficients; for LFMA ``(k, 2)`` float32
(real, imaginary) pairs) and
``adapter/indices: (p,)`` int32 (their positions, in the ``"adapter"`` collection: pass it to
``apply`` with the params, never to the optimizer). The forward pass is the method's ``apply``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_peft.peft._methods import spectral as methods

Array = jax.Array
Initializer = Callable[..., Array]


class _AdaptedDense(nn.Module):
  """Shared body; subclasses define :meth:`spec`."""

  def spec(self):
    raise NotImplementedError

  def _forward(self, x: Array) -> Array:
    method = self.spec()
    in_features = x.shape[-1]
    method.check_shape((in_features, self.features))
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    # One key for both, so LFMA's mask and values come from the same Delta W_init (Flax also
    # evaluates the init functions abstractly in `apply`, hence the placeholder key there).
    key = self.make_rng("params") if self.is_initializing() else jax.random.key(0)

    def pair():
      return method.init_both(*jax.random.split(key), kernel)

    values = self.param("values", lambda _: pair()[0]["values"])
    indices = self.variable("adapter", "indices", lambda: pair()[1]["indices"])
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = method.apply({"values": values}, x, kernel, {"indices": indices.value}).astype(x.dtype)
    return y if bias is None else y + bias


class WaveFTDense(_AdaptedDense):
  """``nn.Dense`` plus a WaveFT adapter: ``y = x (W0 + scale IDWT2(C)) + b`` (see :class:`sp.peft.WaveFT`).

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.linen.WaveFTDense(features=8, n_params=12)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 16)))
    >>> layer.apply(variables, jnp.ones((4, 16))).shape, variables["adapter"]["indices"].shape
    ((4, 8), (12,))
  """

  features: int
  n_params: int
  scale: float = 25.0
  wavelet: str = "haar"
  level: int = 1
  value_init: str = "zeros"
  path: str = "auto"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def spec(self):
    return methods.WaveFT(self.n_params, scale=self.scale, wavelet=self.wavelet, level=self.level,
                          value_init=self.value_init, path=self.path)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._forward(x)


class SHiRADense(_AdaptedDense):
  """``nn.Dense`` plus a SHiRA adapter: ``y = x (W0 + scale C) + b`` with sparse ``C``."""

  features: int
  n_params: int
  scale: float = 1.0
  value_init: str = "zeros"
  path: str = "auto"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def spec(self):
    return methods.SHiRA(self.n_params, scale=self.scale, value_init=self.value_init, path=self.path)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._forward(x)


class FourierFTDense(_AdaptedDense):
  """``nn.Dense`` plus a FourierFT adapter: ``y = x (W0 + scale Re(ifft2(C))) + b``."""

  features: int
  n_frequency: int = 1000
  scale: float = 150.0
  value_init: str = "zeros"
  path: str = "auto"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def spec(self):
    return methods.FourierFT(self.n_frequency, scale=self.scale, value_init=self.value_init, path=self.path)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._forward(x)


class LFMADense(_AdaptedDense):
  """``nn.Dense`` plus an LFMA adapter: ``y = x (W0 + alpha Re(ifft2(F))) + b`` (``delta_init``: "random" or "weight")."""

  features: int
  top_k_ratio: float
  alpha: float = 120.0
  delta_init: str = "random"
  value_init: str = "zeros"
  path: str = "auto"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def spec(self):
    if self.delta_init not in ("random", "weight"):
      raise ValueError(f"`delta_init` of LFMADense must be 'random' or 'weight', got {self.delta_init!r}.")
    return methods.LFMA(self.top_k_ratio, self.alpha, delta_init=self.delta_init, value_init=self.value_init,
                        path=self.path)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self._forward(x)
