"""Flax NNX Dense layers with a sparse/spectral adapter (WaveFT, SHiRA, FourierFT, LFMA), thin over the core.

Each layer holds the base ``kernel: (in_features, out_features)`` and ``bias`` (``nnx.Param``, to
be frozen by the caller's optimizer filter, e.g. ``nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param,
nnx.PathContains("values")))``), the trainable coefficients ``values: (p,)`` (``nnx.Param``; for LFMA
``(k, 2)`` float32, the (real, imaginary) pairs of its ``k`` Fourier coefficients) and their
positions ``indices: (p,)`` (LFMA: ``(k,)``) int32 (:class:`AdapterIndices`, not a ``Param``).
The forward pass is the adapter runtime's per-layer product (:mod:`spectral_peft.peft`): ``x @ (W0 +
Delta W)`` with ``Delta W`` built for this layer and rebuilt in the backward pass, or the method's
factored product when its spec asks for it (``path="factored"``). ``base_module=`` wraps an existing
``nnx.Linear`` (its kernel and bias variables are shared, not copied).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_peft import _validation
from spectral_peft.peft._runtime import core as _runtime
from spectral_peft.peft._methods import spectral as methods
from spectral_peft.peft._methods.base import Adapter

Array = jax.Array


class AdapterIndices(nnx.Variable):
  """Frozen integer positions of a sparse or spectral adapter (never trained, saved with the model)."""


class _AdaptedDense(nnx.Module):
  """Shared body: base kernel and bias, one adapter spec, its values and indices."""

  def _build(self, in_features, out_features, method, *, use_bias, dtype, param_dtype, kernel_init, bias_init,
             base_module, rngs):
    _validation.check_float_dtype("param_dtype", param_dtype, allow_none=False)
    in_features = _validation.check_positive_int("in_features", in_features)
    out_features = _validation.check_positive_int("out_features", out_features)
    method.check_shape((in_features, out_features))
    self.in_features, self.out_features, self.method = in_features, out_features, method
    self.dtype, self.param_dtype = dtype, param_dtype
    if base_module is not None:  # Wrap an existing (pretrained) layer: share its kernel and bias variables.
      if not isinstance(base_module, nnx.Linear):
        raise TypeError(f"`base_module` must be an nnx.Linear, got {type(base_module).__name__}.")
      if (base_module.in_features, base_module.out_features) != (in_features, out_features):
        raise ValueError(f"`base_module` maps {base_module.in_features} -> {base_module.out_features} features, but "
                         f"the layer was asked for {in_features} -> {out_features}.")
      self.kernel, self.bias = base_module.kernel, base_module.bias
    else:
      self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
    params, frozen = method.init_both(rngs.params(), rngs.params(), self.kernel[...])
    self.values = nnx.Param(params["values"])
    self.indices = AdapterIndices(frozen["indices"])

  def delta(self) -> Array:
    """``Delta W: (in_features, out_features)``."""
    return self.method.delta({"values": self.values[...]}, self.kernel[...], {"indices": self.indices[...]})

  def __call__(self, x: Array) -> Array:
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    adapter = _runtime.LayerAdapter({"values": self.values[...]}, {"indices": self.indices[...]},
                                    Adapter({}, {}, self.method, tuple(kernel.shape), str(kernel.dtype), 1), "kernel")
    if _runtime.uses_factored_product(adapter):
      y = adapter.apply(x, kernel).astype(x.dtype)
    else:  # The adapter runtime's product: Delta W built for this layer and rebuilt in the backward pass.
      y = _runtime.merged_call({"kernel": (adapter, kernel)}, lambda merged, ops: ops[0] @ merged["kernel"], (x,))
    return y if bias is None else y + bias


_DEFAULTS = dict(kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init())


class WaveFTDense(_AdaptedDense):
  """``nnx.Linear`` plus a WaveFT adapter: ``y = x (W0 + scale IDWT2(C)) + b`` (see :class:`sp.peft.WaveFT`).

  Example:
    >>> from flax import nnx; import jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.nnx.WaveFTDense(16, 8, n_params=12, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 16))).shape, layer.values[...].shape
    ((4, 8), (12,))
  """

  def __init__(self, in_features: int, out_features: int, *, n_params: int, scale: float = 25.0,
               wavelet: str = "haar", level: int = 1, value_init: str = "zeros", path: str = "auto",
               use_bias: bool = True, dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
               kernel_init: nnx.Initializer = _DEFAULTS["kernel_init"],
               bias_init: nnx.Initializer = _DEFAULTS["bias_init"], base_module: Optional[nnx.Linear] = None,
               rngs: nnx.Rngs):
    method = methods.WaveFT(n_params, scale=scale, wavelet=wavelet, level=level, value_init=value_init, path=path)
    self._build(in_features, out_features, method, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, base_module=base_module, rngs=rngs)


class SHiRADense(_AdaptedDense):
  """``nnx.Linear`` plus a SHiRA adapter: ``y = x (W0 + scale C) + b`` with sparse ``C``."""

  def __init__(self, in_features: int, out_features: int, *, n_params: int, scale: float = 1.0,
               value_init: str = "zeros", path: str = "auto", use_bias: bool = True,
               dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
               kernel_init: nnx.Initializer = _DEFAULTS["kernel_init"],
               bias_init: nnx.Initializer = _DEFAULTS["bias_init"], base_module: Optional[nnx.Linear] = None,
               rngs: nnx.Rngs):
    method = methods.SHiRA(n_params, scale=scale, value_init=value_init, path=path)
    self._build(in_features, out_features, method, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, base_module=base_module, rngs=rngs)


class FourierFTDense(_AdaptedDense):
  """``nnx.Linear`` plus a FourierFT adapter: ``y = x (W0 + scale Re(ifft2(C))) + b``."""

  def __init__(self, in_features: int, out_features: int, *, n_frequency: int = 1000, scale: float = 150.0,
               value_init: str = "zeros", path: str = "auto", use_bias: bool = True,
               dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
               kernel_init: nnx.Initializer = _DEFAULTS["kernel_init"],
               bias_init: nnx.Initializer = _DEFAULTS["bias_init"], base_module: Optional[nnx.Linear] = None,
               rngs: nnx.Rngs):
    method = methods.FourierFT(n_frequency, scale=scale, value_init=value_init, path=path)
    self._build(in_features, out_features, method, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, base_module=base_module, rngs=rngs)


class LFMADense(_AdaptedDense):
  """``nnx.Linear`` plus an LFMA adapter: ``y = x (W0 + alpha Re(ifft2(F))) + b``, ``F`` on a top-k mask.

  ``delta_init`` is ``"random"`` or ``"weight"`` (the layer's own initial kernel); for given or
  gradient masks use :func:`sp.peft.init_lfma_adapters` on a model's parameters.

  The layer holds ``values: (k, 2)`` (``nnx.Param``, ``param_dtype``, float32 by default): the real
  and imaginary parts of the ``k = floor(top_k_ratio * in_features * out_features)`` trainable
  Fourier coefficients, stored as real pairs (optax would step complex parameters along the
  conjugate direction), and ``indices: (k,)`` int32, their flat positions in the
  ``(in_features, out_features)`` spectrum (:class:`AdapterIndices`).
  """

  def __init__(self, in_features: int, out_features: int, *, top_k_ratio: float, alpha: float = 120.0,
               delta_init: str = "random", value_init: str = "zeros", path: str = "auto",
               use_bias: bool = True, dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
               kernel_init: nnx.Initializer = _DEFAULTS["kernel_init"],
               bias_init: nnx.Initializer = _DEFAULTS["bias_init"], base_module: Optional[nnx.Linear] = None,
               rngs: nnx.Rngs):
    if delta_init not in ("random", "weight"):
      raise ValueError(f"`delta_init` of LFMADense must be 'random' or 'weight', got {delta_init!r}.")
    method = methods.LFMA(top_k_ratio, alpha, delta_init=delta_init, value_init=value_init, path=path)
    self._build(in_features, out_features, method, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, base_module=base_module, rngs=rngs)
