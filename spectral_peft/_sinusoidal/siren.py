"""Periodic sinusoidal networks: integer input frequencies, SIREN initialisation, init and apply.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024), sec. 3.1, 5, 6.1 (Fig. 14). Sitzmann et al., "Implicit Neural
  Representations with Periodic Activation Functions" (NeurIPS 2020) for the SIREN initialisation.

Layout. Every matrix uses the Flax kernel layout ``(in_features, out_features)``. The paper writes
``f(x) = C sin(A sin(omega x + phi) + b) + d`` with ``omega: (m, dim)``, ``A: (n, m)``,
``C: (out, n)``; here ``omega: (dim, m)``, ``A: (m, n)`` and ``C: (n, out)`` are their transposes.
So the paper's *columns* of ``A`` (one per input frequency) are the rows ``A[i, :]`` here and are
called *frequency groups*; the paper's *rows* of ``A`` (one per hidden neuron) are the columns
``A[:, j]`` here and are called *neuron groups*.

Network parameters are a plain dict (a pytree)::

  {"omega": (dim, m), "phi": (m,),                       # first layer H(x) = sin(x @ omega + phi)
   "hidden": ({"kernel": (m, n1), "bias": (n1,)}, ...),  # S(h) = sin(h @ kernel + bias)
   "output": {"kernel": (n_L, out), "bias": (out,)}}     # C h + d

``omega`` is frozen: :func:`periodic_siren_apply` stops its gradient, which keeps the network
``period``-periodic when ``omega`` lies in ``(2 pi / period) Z^dim``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation

Array = jax.Array
Params = dict[str, Any]


def _check_period(period: Any) -> float:
  return _validation.check_positive_float("period", period)


def _host_choice(key: Array, population: int, n: int) -> np.ndarray:
  """``n`` distinct draws from ``range(population)``, seeded by ``key`` (on the host: no per-shape compile)."""
  seed = np.asarray(jax.random.bits(key, (2,), jnp.uint32)).astype(np.uint64)
  return np.random.default_rng(seed).choice(population, size=n, replace=False).astype(np.int64)


def integer_frequencies(
    key: Array,
    n: int,
    bandwidth: int,
    *,
    dim: int = 2,
    period: float = 2.0,
    half_space: bool = True,
    dtype: Any = jnp.float32,
) -> Array:
  """Distinct integer input frequencies ``(2 pi / period) k``, ``k`` in ``[-bandwidth, bandwidth]^dim`` minus 0.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 3.1: ``omega in ((2 pi / p) Z^2 - {0})^{n_0}`` within
    ``[-w_0, w_0]^2`` makes ``f`` ``p``-periodic.

  The ``n`` integer vectors are drawn uniformly without replacement. With ``half_space=True`` (the
  default) ``k`` and ``-k`` are never both drawn: ``sin(-k x + phi) = -sin(k x - phi)`` spans the same
  harmonics, so a pair would waste a column of ``A``; the draw is then from the vectors whose first
  non-zero coordinate is positive (``((2 w_0 + 1)^dim - 1) / 2`` of them).

  Args:
    key: a ``jax.random`` key.
    n: number of input frequencies ``m`` (a positive int).
    bandwidth: ``w_0``, the largest integer frequency per axis (a positive int; for an image with
      ``N`` pixels per side spanning one period, the Nyquist limit is ``N / 2``).
    dim: input dimension (2 for images).
    period: the period ``p`` of the network (2.0 for coordinates in ``[-1, 1]``).
    half_space: exclude ``-k`` when ``k`` is drawn (see above).
    dtype: floating dtype of the result.

  Returns:
    ``(dim, n)`` array ``omega`` (the first layer kernel), entries in ``(2 pi / period) Z``.

  Raises:
    ValueError: if ``bandwidth < 1``, ``n < 1`` or ``n`` exceeds the number of vectors in the band.

  Example:
    >>> import jax, spectral_peft as sp
    >>> omega = sp.integer_frequencies(jax.random.key(0), 8, 4)
    >>> omega.shape
    (2, 8)
    >>> bool((sp.frequencies_as_integers(omega) != 0).any(axis=0).all())
    True
  """
  n = _validation.check_positive_int("n", n)
  bandwidth = _validation.check_positive_int("bandwidth", bandwidth)
  dim = _validation.check_positive_int("dim", dim)
  period = _check_period(period)
  side = 2 * bandwidth + 1
  total = side**dim
  center = (total - 1) // 2  # The index of k = 0 in lexicographic order.
  available = center if half_space else total - 1
  if n > available:
    what = "vectors distinct up to sign" if half_space else "non-zero vectors"
    raise ValueError(
        f"`n` must be at most the number of frequencies in the band: [-{bandwidth}, {bandwidth}]^{dim} "
        f"holds {available} {what}, got n={n}."
    )
  idx = _host_choice(key, available, n)
  idx = idx + center + 1 if half_space else idx + (idx >= center)
  digits = []
  for _ in range(dim):
    digits.append(idx % side)
    idx = idx // side
  k = jnp.stack(digits[::-1], axis=0) - bandwidth  # (dim, n); axis 0 is the most significant digit.
  return jnp.asarray((2.0 * math.pi / period) * k, dtype)


def symmetric_frequencies(
    values: Sequence[int],
    *,
    dim: int = 2,
    period: float = 2.0,
    half_space: bool = False,
    dtype: Any = jnp.float32,
) -> Array:
  """Hand-picked symmetric layout ``{(2 pi / period) (i, j) : i, j in {+-v for v in values}}``.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 6.1 and Fig. 14, which uses ``values = (1, 3, 10, 50)``.

  Args:
    values: distinct positive integers.
    dim: input dimension.
    period: the period of the network.
    half_space: keep only one of ``k`` and ``-k`` (the lexicographically positive one).
    dtype: floating dtype of the result.

  Returns:
    ``(dim, (2 len(values))^dim)`` array (half of it with ``half_space=True``), in lexicographic order.

  Raises:
    ValueError: if ``values`` is empty or holds a non-positive or repeated entry.

  Example:
    >>> import spectral_peft as sp
    >>> sp.symmetric_frequencies((1, 3, 10, 50)).shape
    (2, 64)
  """
  dim = _validation.check_positive_int("dim", dim)
  period = _check_period(period)
  values = [_validation.check_positive_int("values", v) for v in values]
  if not values or len(set(values)) != len(values):
    raise ValueError(f"`values` must be a non-empty sequence of distinct positive ints, got {values}.")
  signed = sorted({s * v for v in values for s in (-1, 1)})
  grid = np.stack(np.meshgrid(*([signed] * dim), indexing="ij"), axis=0).reshape(dim, -1)
  if half_space:
    first_nonzero = grid[np.argmax(grid != 0, axis=0), np.arange(grid.shape[1])]
    grid = grid[:, first_nonzero > 0]
  return jnp.asarray((2.0 * math.pi / period) * grid, dtype=dtype)


def siren_frequencies(key: Array, n: int, *, dim: int = 2, omega_0: float = 30.0, dtype: Any = jnp.float32) -> Array:
  """The SIREN first layer: ``omega ~ omega_0 * U(-1 / dim, 1 / dim)``, real-valued (not periodic).

  References:
    Sitzmann et al. (2020), sec. 3.2; Aldana, Novello, Velho, TR-24-02, sec. 4 (after Thm. 2).

  Args:
    key: a ``jax.random`` key.
    n: number of input frequencies ``m``.
    dim: input dimension (the fan-in of the first layer).
    omega_0: SIREN's frequency scale (30 in the SIREN paper).
    dtype: floating dtype of the result.

  Returns:
    ``(dim, n)`` array ``omega``.

  Raises:
    ValueError: on a non-positive ``n``, ``dim`` or ``omega_0``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> sp.siren_frequencies(jax.random.key(0), 16).shape
    (2, 16)
  """
  n = _validation.check_positive_int("n", n)
  dim = _validation.check_positive_int("dim", dim)
  omega_0 = _validation.check_positive_float("omega_0", omega_0)
  return omega_0 * jax.random.uniform(key, (dim, n), dtype, -1.0 / dim, 1.0 / dim)


def frequencies_as_integers(omega: Any, *, period: float = 2.0, atol: float = 1e-3) -> np.ndarray:
  """The integer vectors ``k = omega * period / (2 pi)`` of a periodic first layer.

  Args:
    omega: ``(dim, m)`` first layer kernel.
    period: the period the frequencies were built for.
    atol: how far (in integer units) an entry may sit from an integer.

  Returns:
    ``(dim, m)`` numpy ``int64`` array.

  Raises:
    ValueError: if some entry is not within ``atol`` of an integer multiple of ``2 pi / period``
      (for instance a SIREN initialisation).

  Example:
    >>> import jax, spectral_peft as sp
    >>> sp.frequencies_as_integers(sp.symmetric_frequencies((1,), dim=1)).tolist()
    [[-1, 1]]
  """
  _validation.check_ndim("omega", omega, 2)
  period = _check_period(period)
  scaled = np.asarray(omega, np.float64) * period / (2.0 * math.pi)
  k = np.rint(scaled)
  worst = float(np.max(np.abs(scaled - k))) if scaled.size else 0.0
  if worst > atol:
    raise ValueError(
        f"`omega` must hold integer multiples of 2 pi / period = {2 * math.pi / period:.6g}; an entry is "
        f"{worst:.3g} away from one (a SIREN-style real initialisation is not periodic)."
    )
  return k.astype(np.int64)


def _uniform(key: Array, shape: tuple[int, ...], limit: float, dtype: Any) -> Array:
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def periodic_siren_init(
    key: Array,
    omega: Array,
    hidden_features: Union[int, Sequence[int]],
    out_features: int,
    *,
    dtype: Any = jnp.float32,
) -> Params:
  """Parameters of ``f(x) = C S_{A,b}(H(x)) + d`` (and deeper) around a given first layer.

  References:
    Aldana, Novello, Velho, TR-24-02, eq. 1 and sec. 3.1; hidden inits follow SIREN
    (``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``, sec. 4 of the report).

  The shifts ``phi`` are drawn from ``U(-pi, pi)``, hidden and output kernels from
  ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``, biases from ``U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))``.

  Args:
    key: a ``jax.random`` key.
    omega: ``(dim, m)`` frozen input frequencies, e.g. from :func:`integer_frequencies` or
      :func:`siren_frequencies`.
    hidden_features: width ``n`` of the hidden sinusoidal layer, or a sequence of widths for a
      deeper network (``A`` is always the first hidden kernel).
    out_features: output channels (1 for a grey image, 3 for RGB).
    dtype: floating dtype of the trainable parameters.

  Returns:
    The parameter dict described in the module docstring.

  Raises:
    ValueError: on a non-positive width or a malformed ``omega``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> omega = sp.integer_frequencies(jax.random.key(0), 16, 8)
    >>> params = sp.periodic_siren_init(jax.random.key(1), omega, 32, 1)
    >>> params["hidden"][0]["kernel"].shape
    (16, 32)
  """
  _validation.check_ndim("omega", omega, 2)
  _validation.check_floating("omega", omega)
  widths = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
  if not widths:
    raise ValueError("`hidden_features` must name at least one hidden width, got an empty sequence.")
  widths = [_validation.check_positive_int("hidden_features", w) for w in widths]
  out_features = _validation.check_positive_int("out_features", out_features)
  m = omega.shape[1]
  keys = jax.random.split(key, 2 * len(widths) + 3)
  params: Params = {"omega": jnp.asarray(omega, dtype), "phi": _uniform(keys[0], (m,), math.pi, dtype)}
  hidden = []
  fan_in = m
  for i, width in enumerate(widths):
    hidden.append({
        "kernel": _uniform(keys[2 * i + 1], (fan_in, width), math.sqrt(6.0 / fan_in), dtype),
        "bias": _uniform(keys[2 * i + 2], (width,), 1.0 / math.sqrt(fan_in), dtype),
    })
    fan_in = width
  params["hidden"] = tuple(hidden)
  params["output"] = {
      "kernel": _uniform(keys[-2], (fan_in, out_features), math.sqrt(6.0 / fan_in), dtype),
      "bias": _uniform(keys[-1], (out_features,), 1.0 / math.sqrt(fan_in), dtype),
  }
  return params


def _check_params(params: Params) -> None:
  if not isinstance(params, dict) or not {"omega", "phi", "hidden", "output"} <= set(params):
    raise ValueError(
        "`params` must be a periodic SIREN parameter dict with keys 'omega', 'phi', 'hidden', 'output', "
        f"got {type(params).__name__} with keys {sorted(params) if isinstance(params, dict) else None}."
    )


def periodic_siren_first_layer(params: Params, x: Array) -> Array:
  """The frozen harmonic layer ``H(x) = sin(x @ omega + phi)``, shape ``(..., m)``."""
  omega = jax.lax.stop_gradient(params["omega"])
  return jnp.sin(jnp.matmul(x, omega) + params["phi"])


def periodic_siren_apply(params: Params, x: Array) -> Array:
  """Evaluates ``f(x) = C S(...S(H(x))) + d``; the first layer ``omega`` receives no gradient.

  References:
    Aldana, Novello, Velho, TR-24-02, eq. 1.

  Args:
    params: the dict from :func:`periodic_siren_init`.
    x: ``(..., dim)`` coordinates (``[-1, 1]^dim`` spans one period when ``period = 2``).

  Returns:
    ``(..., out_features)`` array in the promoted dtype of ``x`` and ``params``.

  Raises:
    ValueError: if ``params`` is not a periodic SIREN dict or ``x`` has the wrong last axis.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> omega = sp.integer_frequencies(jax.random.key(0), 16, 8)
    >>> params = sp.periodic_siren_init(jax.random.key(1), omega, 32, 1)
    >>> x = jnp.array([[0.3, -0.2]])
    >>> bool(jnp.allclose(sp.periodic_siren_apply(params, x), sp.periodic_siren_apply(params, x + 2.0), atol=1e-4))
    True
  """
  _check_params(params)
  dim = params["omega"].shape[0]
  if getattr(x, "ndim", 0) < 1 or x.shape[-1] != dim:
    raise ValueError(f"`x` must have shape (..., {dim}) to match omega {tuple(params['omega'].shape)}, got {getattr(x, 'shape', None)}.")
  h = periodic_siren_first_layer(params, x)
  for layer in params["hidden"]:
    h = jnp.sin(jnp.matmul(h, layer["kernel"]) + layer["bias"])
  return jnp.matmul(h, params["output"]["kernel"]) + params["output"]["bias"]


def periodic_siren_num_parameters(params: Params, *, include_frequencies: bool = False) -> int:
  """Number of parameters; the frozen ``omega`` is left out unless ``include_frequencies``.

  Args:
    params: the dict from :func:`periodic_siren_init` (or a shrunk one).
    include_frequencies: also count the ``dim * m`` entries of ``omega``.

  Returns:
    The count as a Python int.

  Example:
    >>> import jax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> sp.periodic_siren_num_parameters(p)  # phi 4 + A 12 + b 3 + C 3 + d 1
    23
  """
  _check_params(params)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
  if not include_frequencies:
    count -= int(np.prod(params["omega"].shape))
  return count
