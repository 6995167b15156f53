"""Low-rank and sine-activated low-rank matrices, and a memory-lean sine low-rank product.

References:
  Ji, Saratchandran, Gordon, Zhang, Lucey. "Efficient Learning with Sine-Activated Low-Rank
  Matrices" (eq. 3, Theorem 1, App. A.2).

Layout. Every matrix here uses the Flax kernel layout ``(in_features, out_features)``: a layer
computes ``y = x @ W`` with ``x: (..., m)`` and ``W: (m, n)``. The paper writes ``y = W x`` with
``W`` of shape ``(out, in)``, i.e. our ``W`` transposed; its ``U`` is our ``b.T`` and its ``V`` is our
``a`` (up to naming), so ``sin(omega U V^T)`` of the paper is ``sin(omega a @ b).T`` here.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from spectral_peft import _validation

Array = jax.Array


def lowrank(a: Array, b: Array) -> Array:
  """Dense low-rank matrix ``a @ b``.

  Args:
    a: ``(m, k)`` left factor; for a Flax kernel ``m = in_features``.
    b: ``(k, n)`` right factor; for a Flax kernel ``n = out_features``.

  Returns:
    ``(m, n)`` matrix of rank at most ``k``, in the promoted dtype of ``a`` and ``b``.

  Raises:
    ValueError: if the factors are not matrices or their rank axes differ.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.lowrank(jnp.ones((4, 2)), jnp.ones((2, 3))).shape
    (4, 3)
  """
  _validation.check_lowrank_factors(a, b)
  return jnp.matmul(a, b)


def default_sine_gain(in_features: int) -> float:
  """The paper's gain ``g = sqrt(n)``, where ``n`` is the layer's fan-in.

  The paper (App. A.2) picks ``g`` like a Kaiming scale. In its notation ``y = W x`` with
  ``W: (m, n)``, ``n`` is the input dimension; the authors' reference code uses
  ``sqrt(in_features)``. For a Flax kernel ``(in_features, out_features)`` built as ``a @ b`` with
  ``a: (m, k)``, this is ``sqrt(m) = sqrt(a.shape[0])``.

  Args:
    in_features: the number of inputs of the layer (``a.shape[0]``).

  Returns:
    ``sqrt(in_features)`` as a Python float.
  """
  _validation.check_positive_int("in_features", in_features)
  return math.sqrt(in_features)


DEFAULT_SINE_OMEGA = 100.0
"""Default frequency of the from-scratch sine low-rank layers: the low end of the paper's range.

The sine low-rank paper (Ji et al.) uses omega = 100 to 1400 (Tab. 5, 8, 9: ViT-Small 300-500, ViT-Base 150-1000, LLM
fine-tuning 100-1400) and 20-200 for the occupancy MLP (Tab. 13). With
:func:`sine_lowrank_factor_init` the entries of ``a @ b`` have standard deviation
``1 / (3 sqrt(in_features))``, so omega = 100 puts ``omega a @ b`` at about ``33 / sqrt(in)``
radians (2 for in = 256): outside the sine's linear regime, where the rank gain appears (Remark 2).
"""


def sine_lowrank_factor_init() -> jax.nn.initializers.Initializer:
  """The reference code's factor initialiser: PyTorch's ``kaiming_uniform_(a=sqrt(5))``, ``U(+-1/sqrt(fan_in))``.

  The authors' code keeps ``nn.Linear``'s default init for both factors, Kaiming uniform with
  ``a = sqrt(5)``: bound ``gain * sqrt(3 / fan_in)`` with ``gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)``,
  i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance ``1 / (3 fan_in)``. With Flax's fan-in axis
  (``-2``) that is ``fan_in = in_features`` for ``a: (in, k)`` and ``fan_in = k`` for ``b: (k, out)``,
  the same fan-ins as the torch factors. Compared with LeCun normal (variance ``1 / fan_in``) each
  factor is ``sqrt 3`` smaller, so ``a @ b`` and hence the effective omega are 3x smaller.

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", App. A.2 and the public
    code (factors initialised like ``torch.nn.Linear``).

  Returns:
    A ``jax.nn.initializers`` initializer ``(key, shape, dtype) -> array``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> a = sp.sine_lowrank_factor_init()(jax.random.key(0), (256, 4))
    >>> bool(abs(a).max() <= 1 / 16)
    True
  """
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _resolve_gain(gain: Optional[float], in_features: int) -> float:
  if gain is None:
    return default_sine_gain(in_features)
  return _validation.check_positive_float("gain", gain)


def sine_lowrank(a: Array, b: Array, *, omega: float, gain: Optional[float] = None) -> Array:
  """Sine-activated low-rank matrix ``sin(omega * a @ b) / gain``.

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", eq. 3.

  The elementwise sine raises the rank of the rank-``k`` product ``a @ b`` without adding
  parameters (Theorem 1); ``omega`` and ``gain`` are fixed hyperparameters, not learned.

  Args:
    a: ``(m, k)`` left factor; for a Flax kernel ``m = in_features``.
    b: ``(k, n)`` right factor; for a Flax kernel ``n = out_features``.
    omega: frequency, a positive float (the paper uses 100 to 1400 for fine-tuning).
    gain: positive divisor. ``None`` uses the paper's ``sqrt(n)`` for its fan-in ``n``, which is
      ``sqrt(m) = sqrt(in_features)`` in our ``(in_features, out_features)`` layout.

  Returns:
    ``(m, n)`` matrix in the promoted dtype of ``a`` and ``b``.

  Raises:
    ValueError: if ``omega`` or ``gain`` is not positive or overflows the dtype (``1e39`` is inf in
      float32), the factors do not fit, or an axis has size 0.

  Example:
    >>> import jax, spectral_peft as sp
    >>> ka, kb = jax.random.split(jax.random.key(0))
    >>> a = jax.random.normal(ka, (64, 2)); b = jax.random.normal(kb, (2, 32))
    >>> int(sp.numerical_rank(sp.sine_lowrank(a, b, omega=30.0))) > 2
    True
  """
  m, _, _ = _validation.check_lowrank_factors(a, b)
  omega = _validation.check_positive_float("omega", omega)
  gain = _resolve_gain(gain, m)
  _validation.check_fits_dtype("sine_lowrank", {"omega": omega, "gain": gain}, jnp.result_type(a, b))
  return jnp.sin(omega * jnp.matmul(a, b)) / gain


def default_block_size(in_features: int, out_features: int) -> int:
  """Column block used by :func:`sine_lowrank_matmul` when ``block_size=None``.

  Chosen so one ``(in_features, block)`` block holds about 2**19 elements (2 MiB in float32),
  with at least 128 columns (a multiple of the TPU lane width) and at most ``out_features``.
  """
  target = max(128, (1 << 19) // max(in_features, 1))
  target = (target // 128) * 128 or 128
  return int(min(out_features, target))


def sine_lowrank_matmul(
    x: Array,
    a: Array,
    b: Array,
    *,
    omega: float,
    gain: Optional[float] = None,
    block_size: Optional[int] = None,
) -> Array:
  """Memory-lean ``x @ sine_lowrank(a, b, omega=omega, gain=gain)``.

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", eq. 3; Table 6 reports
    +31% training memory for sine LoRA because the ``(m, n)`` matrix is materialised.

  The ``n`` output columns are processed in blocks of ``block_size`` by a ``lax.scan`` whose body
  is rematerialised (``jax.checkpoint``): the forward pass builds one ``(m, block_size)`` block of
  ``sin(omega a @ b_j) / gain`` at a time and saves only the block of ``b``; the backward pass
  rebuilds each block (and its cosine) when it needs it. Neither pass ever holds the full ``(m, n)``
  matrix. Values and gradients equal the dense form up to floating-point summation order, and
  the function composes with ``jit``, ``vmap``, ``grad`` and ``jvp``.

  Args:
    x: ``(..., m)`` inputs.
    a: ``(m, k)`` left factor; ``m = in_features``.
    b: ``(k, n)`` right factor; ``n = out_features``.
    omega: positive frequency.
    gain: positive divisor; ``None`` means ``sqrt(m)`` (see :func:`sine_lowrank`).
    block_size: columns per block; ``None`` picks :func:`default_block_size`. ``n`` need not be a
      multiple of it: ``b`` is zero-padded (``sin(0) = 0``) and the output cropped.

  Returns:
    ``(..., n)`` array, ``x @ (sin(omega * a @ b) / gain)``.

  Raises:
    ValueError: on non-positive ``omega``, ``gain`` or ``block_size``, or mismatched shapes.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> a = jax.random.normal(jax.random.key(0), (16, 2)); b = jnp.ones((2, 40)) * 0.1
    >>> x = jnp.ones((3, 16))
    >>> dense = x @ sp.sine_lowrank(a, b, omega=5.0)
    >>> lean = sp.sine_lowrank_matmul(x, a, b, omega=5.0, block_size=16)
    >>> bool(jnp.allclose(dense, lean, atol=1e-5))
    True
  """
  m, k, n = _validation.check_lowrank_factors(a, b)
  _check_input(x, m)
  omega = _validation.check_positive_float("omega", omega)
  gain = _resolve_gain(gain, m)
  _validation.check_fits_dtype("sine_lowrank_matmul", {"omega": omega, "gain": gain}, jnp.result_type(x, a, b))
  if block_size is None:
    block_size = default_block_size(m, n)
  block_size = min(_validation.check_positive_int("block_size", block_size), n)

  batch_shape = x.shape[:-1]
  x2 = x.reshape((-1, m))
  num_blocks = -(-n // block_size)
  padded = num_blocks * block_size
  if padded != n:
    b = jnp.pad(b, ((0, 0), (0, padded - n)))

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(b_j: Array) -> Array:
    w_j = jnp.sin(omega * jnp.matmul(a, b_j)) / gain  # (m, block_size), never all n columns.
    return jnp.matmul(x2, w_j)  # (batch, block_size)

  def step(y: Array, j: Array) -> tuple[Array, None]:
    b_j = jax.lax.dynamic_slice_in_dim(b, j * block_size, block_size, axis=1)
    # Writing each block in place (rather than stacking scan outputs and transposing) keeps one
    # (batch, n) buffer alive in the forward pass and one cotangent buffer in the backward pass.
    return jax.lax.dynamic_update_slice_in_dim(y, block(b_j), j * block_size, axis=1), None

  out_dtype = jnp.result_type(x2, a, b)
  y0 = jnp.zeros((x2.shape[0], padded), out_dtype)
  y, _ = jax.lax.scan(step, y0, jnp.arange(num_blocks))
  return y[:, :n].reshape(batch_shape + (n,))


def lowrank_dense(x: Array, a: Array, b: Array, bias: Optional[Array] = None) -> Array:
  """Dense layer with a low-rank kernel: ``x @ a @ b + bias``, computed as ``(x @ a) @ b``.

  Args:
    x: ``(..., m)`` inputs.
    a: ``(m, k)``; ``b``: ``(k, n)``.
    bias: optional ``(n,)``.

  Returns:
    ``(..., n)``.
  """
  m, _, n = _validation.check_lowrank_factors(a, b)
  _check_input(x, m)
  _check_bias(bias, n)
  y = jnp.matmul(jnp.matmul(x, a), b)
  return y if bias is None else y + bias


def sine_lowrank_dense(
    x: Array,
    a: Array,
    b: Array,
    bias: Optional[Array] = None,
    *,
    omega: float,
    gain: Optional[float] = None,
    memory_lean: bool = False,
    block_size: Optional[int] = None,
) -> Array:
  """Dense layer with a sine low-rank kernel: ``x @ (sin(omega a @ b) / gain) + bias`` (eq. 3).

  Args:
    x: ``(..., m)`` inputs.
    a: ``(m, k)``; ``b``: ``(k, n)``.
    bias: optional ``(n,)``.
    omega: positive frequency; ``gain``: positive divisor (``None``: ``sqrt(m)``).
    memory_lean: use :func:`sine_lowrank_matmul` (never holds the ``(m, n)`` kernel) instead of
      forming the kernel.
    block_size: column block of the memory-lean product.

  Returns:
    ``(..., n)``.
  """
  m, _, n = _validation.check_lowrank_factors(a, b)
  _check_input(x, m)
  _check_bias(bias, n)
  if memory_lean:
    y = sine_lowrank_matmul(x, a, b, omega=omega, gain=gain, block_size=block_size)
  else:
    y = jnp.matmul(x, sine_lowrank(a, b, omega=omega, gain=gain))
  return y if bias is None else y + bias


def _check_input(x: Array, m: int) -> None:
  if getattr(x, "ndim", 0) < 1 or x.shape[-1] != m:
    raise ValueError(
        f"`x` must have shape (..., m) with m = a.shape[0] = {m}, got shape {getattr(x, 'shape', None)}."
    )


def _check_bias(bias: Optional[Array], n: int) -> None:
  if bias is not None and tuple(bias.shape) != (n,):
    raise ValueError(f"`bias` must have shape (n,) = ({n},), got {tuple(bias.shape)}.")
