"""Sparse coefficient matrices and their wavelet / Fourier syntheses, dense and factored.

Positions of sparse coefficients are flat, row-major indices into a coefficient grid (``i * N + j``
for row ``i`` and column ``j`` of an ``(M, N)`` grid), or ``(p, 2)`` ``(row, col)`` pairs. The
grid is ``(m, n)`` for the identity (SHiRA) and the DFT (FourierFT, LFMA), and the padded wavelet
grid :func:`spectral_peft.wavelet_coefficient_shape` for WaveFT.

Each synthesis has a product ``x @ Delta W`` that never forms ``Delta W``:

* identity (SHiRA): a gather and scatter-add over the ``p`` entries, ``O(B p)``;
* wavelets (WaveFT): separable 1-D synthesis along each axis (see
  :func:`spectral_peft._sparse.wavelets.sparse_idwt2_matmul`), ``O(B (K (m + n) + p))``;
* Fourier (FourierFT, LFMA): ``x @ Re(ifft2(F)) = Re(ifft_n(T))`` with
  ``T[v] = sum_{t: v_t = v} c_t ifft_m(x)[u_t]``, i.e. the ``p``-term factorisation
  ``sum_t c_t (x . e_{u_t}) e_{v_t}^T`` evaluated with one 1-D FFT per side,
  ``O(B (m log m + n log n + p))``.

``path="auto"`` picks the cheaper of the dense and the factored product from a flop model of one
training step (forward and backward): the dense path forms ``Delta W`` and pays a full
``(m, n)`` weight-gradient matmul ``x^T g``; the factored path pays per input row. Both paths agree
in value and gradient to rounding.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from spectral_peft import _validation
from spectral_peft._sparse import theory, wavelets

Array = jax.Array

PATHS = ("auto", "dense", "factored")


# -- checks -------------------------------------------------------------------------------------
def _check_shape(name: str, shape: Any) -> tuple[int, int]:
  if (not isinstance(shape, (tuple, list)) or len(shape) != 2
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0 for d in shape)):
    raise ValueError(f"`{name}` must be a pair of positive ints (m, n), got {shape!r}.")
  return int(shape[0]), int(shape[1])


def check_path(path: Any) -> str:
  """Checks ``path`` is one of ``"auto"``, ``"dense"``, ``"factored"``."""
  if path not in PATHS:
    raise ValueError(f"`path` must be one of {PATHS}, got {path!r}.")
  return path


def _check_values(values: Any, *, real: bool) -> Array:
  values = jnp.asarray(values)
  _validation.check_ndim("values", values, 1)
  if real and jnp.issubdtype(values.dtype, jnp.complexfloating):
    raise TypeError(
        f"`values` must be real here (the wavelet/identity coefficients of WaveFT and SHiRA are real), got {values.dtype}; "
        "pass jnp.real(values) or use fourier_delta for complex spectra."
    )
  _validation.check_floating("values", values)
  return values


def flat_indices(indices: Any, grid: tuple[int, int], p: int) -> Array:
  """``(p,)`` int32 flat row-major indices from ``(p,)`` flat indices or ``(p, 2)`` pairs.

  Concrete positions outside the grid raise ``ValueError``. Traced ones (under ``jit``) cannot be
  checked: each position outside the grid (a negative one, a flat index ``>= M * N``, a row or
  column out of range) is mapped to ``M * N``, one past the end, so the syntheses and products
  drop it (it contributes nothing) instead of wrapping around or landing on another entry.
  """
  _validation.check_positions("indices", indices, grid)
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"`indices` must be an integer array, got {indices.dtype}.")
  big_m, big_n = grid
  if indices.ndim == 2 and indices.shape[1] == 2:
    rows, cols = indices[:, 0], indices[:, 1]
    inside = (rows >= 0) & (rows < big_m) & (cols >= 0) & (cols < big_n)
    indices = rows * big_n + cols
  else:
    inside = (indices >= 0) & (indices < big_m * big_n)
  if indices.shape != (p,):
    raise ValueError(
        f"`indices` must be (p,) flat positions or (p, 2) (row, col) pairs with p = len(values) = {p}, "
        f"got shape {indices.shape}."
    )
  return jnp.where(inside, indices, big_m * big_n).astype(jnp.int32)


# -- scatter and syntheses ---------------------------------------------------------------------
def scatter_coefficients(values: Array, indices: Array, shape: Sequence[int]) -> Array:
  """Dense ``(M, N)`` matrix with ``values`` at ``indices`` and zeros elsewhere (repeats add up).

  Args:
    values: ``(p,)`` real or complex coefficients.
    indices: ``(p,)`` int flat row-major positions in ``[0, M * N)`` or ``(p, 2)`` ``(row, col)``.
    shape: ``(M, N)``, the grid.

  Returns:
    ``(M, N)`` array of the dtype of ``values``.

  Raises:
    ValueError: bad ``shape`` or ``indices`` shape, or concrete ``indices`` outside the grid (under
      ``jit`` such positions are dropped: they add nothing); TypeError: non-integer ``indices``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.scatter_coefficients(jnp.array([1.0, 2.0]), jnp.array([0, 5]), (2, 3)).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
  """
  grid = _check_shape("shape", tuple(shape))
  values = jnp.asarray(values)
  _validation.check_ndim("values", values, 1)
  flat = flat_indices(indices, grid, values.shape[0])
  return scatter_add(jnp.broadcast_to(zero_from(values), grid), flat, values)


def scatter_add(target: Array, flat: Array, values: Array) -> Array:
  """``target`` (``(M, N)``) with ``values`` added at the flat row-major positions ``flat``.

  A 2-D scatter, not a flat one reshaped: XLA's SPMD partitioner then adds into each shard of a
  sharded ``target`` locally, where the flat form gathers the whole array. Positions ``>= M * N``
  (the markers of dropped positions) fall on row ``M`` or beyond and are dropped.
  """
  n = target.shape[1]
  return target.at[flat // n, flat % n].add(values, mode="drop")


def _zeros_after(values: Array, size: int) -> Array:
  """``zeros(size)`` computed from ``values`` (exactly zero), so XLA cannot make it a constant.

  A constant zero buffer would be copied for the in-place scatter, and XLA's CPU scheduler hoists
  such copies to the start of the program: with one per adapted layer, every layer's ``(m, n)``
  buffer would be alive at once. Deriving it from the data keeps each buffer in its layer.
  """
  return jnp.broadcast_to(zero_from(values), (size,))


def zero_from(values: Array) -> Array:
  """A scalar ``0`` of ``values``' dtype computed from ``values`` (never a compile-time constant).

  Adding it to an array makes that array's copy depend on ``values``: XLA then builds it where it is
  used instead of hoisting it (with every other layer's) to the start of the program.
  """
  if values.size == 0:
    return jnp.zeros((), values.dtype)
  first = values[(0,) * values.ndim]  # One element (by indexing: a sharded array is not gathered).
  return jnp.where(jnp.isfinite(first), first, jnp.zeros((), first.dtype)) * 0


def waveft_delta(values: Array, indices: Array, shape: Sequence[int], *, wavelet: str = "haar", level: int = 1) -> Array:
  """WaveFT update ``IDWT2(C)`` of a sparse wavelet coefficient matrix ``C``, cropped to ``shape``.

  References:
    "Exploring sparsity for PEFT using wavelets for vision" (WaveFT), Sec. 3, eq. for
    ``Delta W_WaveFT = IDWT(C)``.

  Args:
    values: ``(p,)`` real coefficients.
    indices: ``(p,)`` flat positions (or ``(p, 2)`` pairs) in the coefficient grid
      ``(M, N) = wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)``.
    shape: ``(m, n)`` of ``Delta W``.
    wavelet, level: as in :func:`spectral_peft.idwt2` (periodised, PyWavelets layout).

  Returns:
    ``(m, n)`` array of the dtype of ``values``.

  Raises:
    TypeError: complex ``values``; ValueError: unknown wavelet, level too deep, bad shapes,
    concrete ``indices`` outside the grid (under ``jit`` they are dropped, as in
    :func:`scatter_coefficients`).

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.waveft_delta(jnp.array([2.0]), jnp.array([0]), (2, 2)).round(4).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
  """
  shape = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=True)
  grid = wavelets.wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
  if level == 1:
    return _waveft_delta_one_level(values, indices, shape, wavelet)
  coeffs = scatter_coefficients(values, indices, grid)
  return wavelets.idwt2(coeffs, wavelet, level, shape=shape)


def _synthesis_spread(index: Array, length: int, wavelet: str) -> tuple[Array, Array]:
  """Where one level of periodised 1-D synthesis sends coefficient ``index`` (``[lo, hi]`` layout).

  ``lo[i]`` (``hi[i]``) adds ``rec_lo[j]`` (``rec_hi[j]``) to output sample ``(2 i + s_j) mod length``,
  ``s_j = 1 - K // 2 + j`` (see :func:`spectral_peft._sparse.wavelets._synthesis_axis`).

  Returns:
    ``(positions, weights)``, each ``(p, K)``.
  """
  _, _, rec_lo, rec_hi = wavelets._filters(wavelet)
  k_len = len(rec_lo)
  half = length // 2
  high = index >= half
  i = jnp.where(high, index - half, index)
  shifts = jnp.arange(k_len) + 1 - k_len // 2
  positions = (2 * i[:, None] + shifts[None, :]) % length
  weights = jnp.where(high[:, None], jnp.asarray(rec_hi)[None, :], jnp.asarray(rec_lo)[None, :])
  return positions, weights


def waveft_terms(values: Array, indices: Array, shape: Sequence[int], *, wavelet: str = "haar") -> tuple[Array, Array]:
  """One-level periodised ``IDWT2`` of a sparse coefficient matrix as ``p K^2`` weighted entries.

  The synthesis is separable, so coefficient ``(u, v)`` adds ``c * r_a * c_b`` at ``(a, b)`` for the
  ``K`` rows ``a`` and ``K`` columns ``b`` it reaches along each axis:
  ``waveft_delta(values, indices, shape, wavelet=w, level=1)`` is the scatter-add of ``terms`` at the
  flat positions ``positions`` of the ``(m, n)`` output (positions ``m * n`` are cropped away).

  Args:
    values: ``(p,)`` real coefficients; indices: positions in the padded grid
      ``wavelet_coefficient_shape(shape, wavelet=wavelet, level=1)``.
    shape: ``(m, n)``; wavelet: a discrete PyWavelets wavelet of filter length ``K``.

  Returns:
    ``(positions, terms)``: ``(p K^2,)`` int32 flat positions in ``[0, m n]`` and ``(p K^2,)`` values.
  """
  m, n = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=True)
  big_m, big_n = wavelets.wavelet_coefficient_shape((m, n), wavelet=wavelet, level=1)
  flat = flat_indices(indices, (big_m, big_n), values.shape[0])
  rows, cols = flat // big_n, flat % big_n
  row_pos, row_w = _synthesis_spread(rows, big_m, wavelet)
  col_pos, col_w = _synthesis_spread(cols, big_n, wavelet)
  inside = (flat < big_m * big_n)[:, None, None] & (row_pos < m)[:, :, None] & (col_pos < n)[:, None, :]
  positions = jnp.where(inside, row_pos[:, :, None] * n + col_pos[:, None, :], m * n).reshape(-1)
  terms = (values[:, None, None] * (row_w[:, :, None] * col_w[:, None, :]).astype(values.dtype)).reshape(-1)
  return positions.astype(jnp.int32), terms


def waveft_sampled_cotangent(x: Array, g: Array, indices: Array, shape: Sequence[int], *, wavelet: str = "haar") -> Array:
  """The cotangent of one-level periodised WaveFT coefficients, ``(p,)``, from the activations alone.

  With ``Delta W = crop(S_0 C S_1^T)`` (``S`` the 1-D synthesis along an axis, the crop to ``(m, n)``)
  and ``y = x (W0 + Delta W)``, the coefficient cotangent is
  ``dC = S_0^T pad(x)^T pad(g) S_1 = X^T G`` with ``X = S_0^T pad(x)`` and ``G = S_1^T pad(g)`` row by
  row (the adjoint synthesis, a 1-D wavelet analysis for orthogonal wavelets, ``O(B K (M + N))``):
  ``dC`` at the ``p`` positions is one sampled product, ``O(B p)``, where sampling the ``p K^2``
  scattered terms of :func:`waveft_terms` costs ``K^2`` times more.

  Args:
    x: ``(B, m)`` inputs; g: ``(B, n)`` output cotangents.
    indices: ``(p,)`` flat positions (or ``(p, 2)`` pairs) in the padded grid
      ``wavelet_coefficient_shape(shape, wavelet=wavelet, level=1)``.
    shape: ``(m, n)``; wavelet: a discrete PyWavelets wavelet.

  Returns:
    ``(p,)`` in ``promote_types(x, g, float32)``: ``sum_b X[b, u] G[b, v]`` at each position ``(u, v)``.
  """
  m, n = _check_shape("shape", tuple(shape))
  big_m, big_n = wavelets.wavelet_coefficient_shape((m, n), wavelet=wavelet, level=1)
  dtype = jnp.promote_types(jnp.result_type(x, g), jnp.float32)
  # Tied to g: the analysis of x runs in the backward pass, not hoisted into the forward as a residual.
  x = x.astype(dtype) + zero_from(g).astype(dtype)
  # Analysed along the first axis of x^T and g^T: the (M, B) and (N, B) rows the sampled product reads.
  x_rows = wavelets.synthesis_adjoint_axis(jnp.pad(x.T, ((0, big_m - m), (0, 0))), wavelet, 0)
  g_rows = wavelets.synthesis_adjoint_axis(jnp.pad(g.astype(dtype).T, ((0, big_n - n), (0, 0))), wavelet, 0)
  p = indices.shape[0]
  return sampled_rows(x_rows, g_rows, flat_indices(indices, (big_m, big_n), p), big_n)


def _waveft_delta_one_level(values: Array, indices: Array, shape: tuple[int, int], wavelet: str) -> Array:
  """``waveft_delta`` at level 1 as one scatter (no coefficient grid, no intermediate ``(m, n)`` passes)."""
  m, n = shape
  positions, terms = waveft_terms(values, indices, shape, wavelet=wavelet)
  return _zeros_after(terms, m * n).at[positions].add(terms, mode="drop").reshape(m, n)


def fourier_delta(values: Array, indices: Array, shape: Sequence[int]) -> Array:
  """``Re(ifft2(F))`` of a sparse spectrum ``F`` (FourierFT and LFMA, before their scale).

  ``ifft2`` is numpy's: ``(1 / (m n)) sum_{u, v} F[u, v] exp(2 pi i (u a / m + v b / n))``.

  References:
    Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (FourierFT),
    ICML 2024; LFMA, eq. (2).

  Args:
    values: ``(p,)`` real or complex spectral coefficients.
    indices: ``(p,)`` flat positions (or ``(p, 2)`` pairs) in the ``(m, n)`` frequency grid.
    shape: ``(m, n)``.

  Returns:
    ``(m, n)`` real array (float32 for float32/complex64 values, float64 for 64-bit ones).

  Raises:
    ValueError: bad shapes, or concrete ``indices`` outside the ``(m, n)`` grid (a negative or
      too large frequency; under ``jit`` such positions are dropped, as in :func:`scatter_coefficients`).

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.fourier_delta(jnp.array([4.0]), jnp.array([0]), (2, 2)).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
  """
  shape = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=False)
  m, n = shape
  complex_dtype = jnp.result_type(values.dtype, jnp.complex64)
  values = values.astype(complex_dtype)
  flat = flat_indices(indices, shape, values.shape[0])
  # Re(ifft2(S)) = ifft2(H) with the Hermitian H = (S + conj(S[-u, -v])) / 2, and a Hermitian spectrum
  # is synthesised from its half (columns 0..n//2) by irfft2: half the complex memory and work.
  rows, cols = flat // n, flat % n
  mirror_rows, mirror_cols = (-rows) % m, (-cols) % n
  half = n // 2 + 1
  valid = flat < m * n  # flat_indices marks positions outside the grid (under jit) with m * n: drop them
  keep = valid & (cols < half)
  keep_mirror = valid & (mirror_cols < half)
  positions = jnp.concatenate([jnp.where(keep, rows * half + cols, m * half),
                               jnp.where(keep_mirror, mirror_rows * half + mirror_cols, m * half)])
  contributions = 0.5 * jnp.concatenate([values, jnp.conj(values)])
  spectrum = _zeros_after(contributions, m * half).at[positions].add(contributions, mode="drop")
  return _row_major(jnp.fft.irfft2(spectrum.reshape(m, half), s=(m, n)))


def _row_major(x: Array) -> Array:
  """``x`` through a flat reshape, which pins XLA's layout of ``x`` (an FFT's result) to row-major.

  XLA:CPU's FFT runs only on row-major operands, yet its layout assignment may give the FFT of a
  merged kernel the column-major layout a consumer prefers (a kernel split on its output axis, as
  under FSDP ``P(None, "data")``), and the compiled step then stops at run time in ``fft_thunk``.
  """
  return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def topk_count(shape: Sequence[int], ratio: Any) -> int:
  """``k = floor(m * n * ratio)`` after checking ``0 < ratio <= 1`` and ``k >= 1``."""
  m, n = _check_shape("shape", tuple(shape))
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
    raise TypeError(f"`ratio` must be a real number in (0, 1], got {ratio!r}.")
  if not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"`ratio` must be in (0, 1], got {ratio}.")
  k = int(math.floor(m * n * float(ratio)))
  if k < 1:
    raise ValueError(
        f"`ratio` {ratio} keeps floor(m * n * ratio) = 0 entries of a {m} x {n} spectrum; use ratio >= 1 / {m * n}."
    )
  return k


def topk_spectral_mask(delta_init: Array, ratio: float) -> Array:
  """Positions of the ``k = floor(m * n * ratio)`` largest ``|fft2(delta_init)|`` (LFMA's mask).

  References:
    LFMA, Sec. 3.1 and Algorithm 1 (``torch.topk(|fft2(Delta W_init)|.view(-1), k)``).

  Args:
    delta_init: ``(m, n)`` real or complex matrix whose spectrum ranks the frequencies.
    ratio: fraction of the ``m * n`` frequencies kept, in ``(0, 1]``.

  Returns:
    ``(k,)`` int32 flat row-major positions in the ``(m, n)`` grid, largest magnitude first
    (``jax.lax.top_k`` order; exact ties, such as the conjugate pairs of a real matrix, are
    broken towards the lower position up to rounding of the FFT).

  Raises:
    ValueError: ``ratio`` outside ``(0, 1]`` or too small to keep one entry, ``delta_init`` not 2-D,
      or concrete ``delta_init`` with NaN or inf entries (they would rank first; under ``jit`` the
      values cannot be checked).

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.topk_spectral_mask(jnp.ones((4, 4)), 1 / 16).tolist()
    [0]
  """
  delta_init = jnp.asarray(delta_init)
  _validation.check_ndim("delta_init", delta_init, 2)
  _validation.check_floating("delta_init", delta_init)
  _validation.check_finite("delta_init", delta_init)
  k = topk_count(delta_init.shape, ratio)
  delta_init = delta_init.astype(jnp.promote_types(delta_init.dtype, jnp.float32))  # fft2 needs 32 bits.
  magnitude = jnp.abs(jnp.fft.fft2(delta_init)).reshape(-1)
  _, idx = jax.lax.top_k(magnitude, k)
  return idx.astype(jnp.int32)


def _pair_representatives(pair: Array, shape: tuple[int, int]) -> tuple[Array, Array]:
  """Flat positions ``(f, conj(f))`` of conjugate pairs ``0 <= pair < P`` of an ``(m, n)`` spectrum.

  The representatives ``f < conj(f)`` are, in this order: row 0 at columns ``1 .. (n - 1) // 2``;
  for even ``m`` row ``m / 2`` at the same columns; every column of rows ``1 .. (m - 1) // 2``.
  """
  m, n = shape
  half = (n - 1) // 2
  self_rows = 2 if m % 2 == 0 else 1
  in_self_row = pair < self_rows * half
  u_self = jnp.where(pair < half, 0, m // 2)
  v_self = 1 + pair % max(half, 1)
  rest = jnp.maximum(pair - self_rows * half, 0)
  u = jnp.where(in_self_row, u_self, 1 + rest // n)
  v = jnp.where(in_self_row, v_self, rest % n)
  return u * n + v, ((m - u) % m) * n + (n - v) % n


def random_topk_spectrum(key: Array, shape: Sequence[int], k: int, *, std: float = 1.0) -> tuple[Array, Array]:
  """The ``k`` largest-magnitude entries of ``fft2(D)`` for a random ``D``, drawn in ``O(k)`` without ``D``.

  ``D`` is ``(m, n)`` with i.i.d. ``N(0, std^2)`` entries. The result has the law of
  ``mask = topk_spectral_mask(D, k / (m n))`` and ``fft2(D).ravel()[mask]`` for one draw of ``D``,
  but costs ``O(k log k)`` instead of an ``(m, n)`` draw, FFT and top-k (a 4096 x 11008 weight: ``k``
  numbers instead of 45 million). The law it samples (``sigma^2 = m n std^2``):

  * ``F = fft2(D)`` is Hermitian. Its self-conjugate bins (``2u = 0 mod m`` and ``2v = 0 mod n``:
    1, 2 or 4 of them) are real ``N(0, sigma^2)``; the other bins form ``P`` conjugate pairs, one
    complex ``N(0, sigma^2)`` per pair (independent real and imaginary parts of variance
    ``sigma^2 / 2``), independent of each other and of the real bins.
  * So ``|F|^2 / sigma^2`` is ``Exp(1)`` on each pair and ``chi^2_1`` on each real bin. The largest
    ``J = ceil(k / 2)`` of the ``P`` exponentials are drawn in descending order from the order
    statistics of uniforms (``V_j = V_{j-1} U_j^(1 / (P - j + 1))``, ``E_(j) = -log(1 - V_j)``),
    the pairs holding them are ``J`` distinct pairs in uniformly random order (the draw of
    :func:`sparse_positions`, unsorted), and the phases are uniform.
  * The entries are merged in descending magnitude, each pair giving its two positions (the lower
    flat position first, as ``jax.lax.top_k`` breaks exact ties), and cut after ``k``.

  Which particular mask a key gives differs from ranking an explicit draw of ``D`` with the same
  key; the distribution is the same (tested against explicit draws). Grids above ``2**16``
  positions draw the pairs with :func:`sparse_positions`' pseudorandom permutation.

  Args:
    key: a ``jax.random`` key.
    shape: ``(m, n)``, ``m n < 2**31``.
    k: number of entries, ``1 <= k <= m n``.
    std: standard deviation of ``D``'s entries, positive.

  Returns:
    ``(indices, values)``: ``(k,)`` int32 flat row-major positions, largest magnitude first, and
    ``(k,)`` complex64 spectrum values at them.

  Raises:
    ValueError: a bad ``shape``, ``k`` outside ``[1, m n]``, a grid of ``2**31`` entries or more,
      or ``std`` not positive.

  Example:
    >>> import jax, spectral_peft as sp
    >>> indices, values = sp.random_topk_spectrum(jax.random.key(0), (64, 96), 10)
    >>> indices.shape, values.dtype
    ((10,), dtype('complex64'))
  """
  m, n = _check_shape("shape", tuple(shape))
  size = m * n
  k = _validation.check_positive_int("k", k)
  if k > size:
    raise ValueError(f"`k` must be at most the {m} x {n} = {size} spectrum entries, got {k}.")
  if size >= 2**31:
    raise ValueError(f"`shape` must have fewer than 2**31 entries (int32 flat positions), got {m} x {n} = {size}.")
  std = _validation.check_positive_float("std", std)
  return _random_topk_spectrum(key, (m, n), k, std)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_topk_spectrum(key: Array, shape: tuple[int, int], k: int, std: float) -> tuple[Array, Array]:
  m, n = shape
  size = m * n
  self_positions = [u * n + v for u in sorted({0, m // 2} if m % 2 == 0 else {0})
                    for v in sorted({0, n // 2} if n % 2 == 0 else {0})]
  num_pairs = (size - len(self_positions)) // 2
  num_drawn = min(num_pairs, (k + 1) // 2)
  pair_key, uniform_key = jax.random.split(key)
  # One draw of uniforms in [tiny, 1) (every log finite): magnitudes and phases of the pairs, and a
  # Box-Muller pair for each real bin.
  num_real = len(self_positions)
  uniform = jax.random.uniform(uniform_key, (2 * num_drawn + 2 * num_real,), jnp.float32,
                               minval=jnp.finfo(jnp.float32).tiny)
  radius, angle = uniform[2 * num_drawn:2 * num_drawn + num_real], uniform[2 * num_drawn + num_real:]
  real_values = jnp.sqrt(-2.0 * jnp.log(radius)) * jnp.cos(2 * math.pi * angle)
  if num_drawn:
    # Descending order statistics of num_pairs uniforms, as logarithms.
    log_v = jnp.cumsum(jnp.log(uniform[:num_drawn]) / (num_pairs - jnp.arange(num_drawn, dtype=jnp.float32)))
    pair_power = -jnp.log(-jnp.expm1(log_v))
    chosen = theory.distinct_draw(pair_key, num_pairs, num_drawn).astype(jnp.int32)
    lower, upper = _pair_representatives(chosen, (m, n))
    pair_value = jnp.sqrt(pair_power) * jnp.exp(2j * math.pi * uniform[num_drawn:2 * num_drawn])
  else:
    pair_power = jnp.zeros((0,), jnp.float32)
    lower = upper = jnp.zeros((0,), jnp.int32)
    pair_value = jnp.zeros((0,), jnp.complex64)

  # Merge the descending pair powers with the (at most 4) real bins: a pair takes two slots (the lower
  # position first), a real bin one. Real bin r goes after the first c_r pairs, c_r = #(pair powers >=
  # its power), and the slots are computed from the c_r alone, so rounding in the powers can reorder
  # nothing into a collision.
  real_power = jnp.square(real_values)
  reals = jnp.arange(len(self_positions))
  after = jnp.sum(pair_power[None, :] >= real_power[:, None], axis=1)
  same, higher = after[None, :] == after[:, None], real_power[None, :] > real_power[:, None]
  tie = (real_power[None, :] == real_power[:, None]) & (reals[None, :] < reals[:, None])
  real_slot = 2 * after + jnp.sum((after[None, :] < after[:, None]) | (same & (higher | tie)), axis=1)
  pair_slot = 2 * jnp.arange(num_drawn) + jnp.sum(after[None, :] <= jnp.arange(num_drawn)[:, None], axis=1)
  total = 2 * num_drawn + len(self_positions)
  slots = (jnp.zeros((total,), jnp.int32).at[pair_slot].set(lower).at[pair_slot + 1].set(upper)
           .at[real_slot].set(jnp.asarray(self_positions, jnp.int32)))
  values = (jnp.zeros((total,), jnp.complex64).at[pair_slot].set(pair_value).at[pair_slot + 1].set(jnp.conj(pair_value))
            .at[real_slot].set(real_values.astype(jnp.complex64)))
  return slots[:k], values[:k] * jnp.float32(std * math.sqrt(size))


# -- products x @ Delta W ----------------------------------------------------------------------
def _batch(x: Array) -> int:
  return max(1, math.prod(x.shape[:-1]))


def _check_x(x: Array, m: int) -> Array:
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != m:
    raise ValueError(f"`x` must have shape (..., m) with m = {m}, got {x.shape}.")
  _validation.check_floating("x", x)
  return x


def matmul_costs(kind: str, batch: int, shape: tuple[int, int], p: int, *, filter_length: int = 2, level: int = 1) -> dict[str, float]:
  """Flop model of one training step of ``x @ Delta W`` by each path (used by ``path="auto"``).

  Args:
    kind: ``"sparse"`` (identity), ``"wavelet"`` or ``"fourier"``.
    batch: number of input rows ``B``; shape: ``(m, n)``; p: number of coefficients.
    filter_length, level: wavelet filter length ``K`` and depth (``"wavelet"`` only).

  Returns:
    ``{"dense": flops, "factored": flops}`` counting only what differs from the base ``x @ W0``:
    the dense path forms ``Delta W`` (and its adjoint in the backward pass) and pays the
    ``x^T g`` weight gradient ``2 B m n``; the factored path pays its per-row work three times
    (forward, input gradient, coefficient gradient).
  """
  m, n = shape
  if kind == "sparse":
    dense = 2.0 * m * n + 2.0 * batch * m * n
    factored = 3.0 * batch * 2.0 * p
  elif kind == "wavelet":
    synth = 2.0 * 2.0 * filter_length * m * n * 4.0 / 3.0  # both axes, all levels (<= 4/3 of level 1)
    dense = 2.0 * synth + 2.0 * batch * m * n
    factored = 3.0 * batch * (2.0 * 2.0 * filter_length * (m + n) + 2.0 * p)
  elif kind == "fourier":
    fft2 = 5.0 * m * n * math.log2(max(m * n, 2))
    dense = 2.0 * fft2 + 2.0 * batch * m * n
    factored = 3.0 * batch * (5.0 * m * math.log2(max(m, 2)) + 5.0 * n * math.log2(max(n, 2)) + 8.0 * p)
  else:
    raise ValueError(f"`kind` must be 'sparse', 'wavelet' or 'fourier', got {kind!r}.")
  return {"dense": dense, "factored": factored}


# Gathers, scatters and small FFTs run far below matmul throughput: the factored path must save this
# factor in flops before "auto" takes it. Calibrated with experiments/bench_spectral_step.py on CPU, where
# a factored path with ~5x fewer flops than the dense one was still 1.5-2.5x slower.
FACTORED_FLOP_ADVANTAGE = 8.0


def _resolve(path: str, costs_fn) -> str:
  check_path(path)
  if path != "auto":
    return path
  costs = costs_fn()
  return "factored" if FACTORED_FLOP_ADVANTAGE * costs["factored"] < costs["dense"] else "dense"


# Elements of one chunk's gathered rows (``chunk x B``) in :func:`sampled_product`.
_SAMPLED_CHUNK_ELEMENTS = 2**20


def sampled_product(x: Array, g: Array, flat: Array, n: int) -> Array:
  """``(x^T g)`` at flat positions, ``(q,)``, without the ``(m, n)`` product (a sampled dense-dense matmul).

  The coefficient gradient of a scatter-synthesised update: for ``y = x (W0 + scatter(t))`` and
  output cotangent ``g``, the cotangent of the terms ``t`` is ``(x^T g)[rows, cols]``. It costs
  ``O(B q)`` instead of the ``2 B m n`` of ``x^T g``, and runs in chunks of positions (a
  ``lax.map``), so the gathered ``(chunk, B)`` rows stay small: XLA does not fuse a gather into a
  reduction, and gathering all ``q`` rows at once would hold ``B q`` elements.

  Args:
    x: ``(B, m)`` inputs; g: ``(B, n)`` output cotangents.
    flat: ``(q,)`` int32 row-major positions in ``(m, n)``; positions ``>= m n`` (dropped entries)
      give 0.
    n: the number of columns.

  Returns:
    ``(q,)`` in ``promote_types(x, g, float32)``.
  """
  return sampled_rows(x.T, g.T, flat, n)  # Rows of B contiguous values: each position gathers two of them.


def sampled_rows(x_rows: Array, g_rows: Array, flat: Array, n: int) -> Array:
  """:func:`sampled_product` from ``x^T`` ``(m, B)`` and ``g^T`` ``(n, B)`` (real or complex), ``(q,)``."""
  m, batch = x_rows.shape
  dtype = jnp.promote_types(jnp.result_type(x_rows, g_rows), jnp.float32)
  return _over_positions(lambda r, c: jnp.sum(x_rows[r].astype(dtype) * g_rows[c].astype(dtype), axis=1),
                         flat, (m, n), batch, dtype)


def _over_positions(products: Any, flat: Array, shape: tuple[int, int], batch: int, dtype: Any) -> Array:
  """``products(rows, cols)`` over the flat positions, ``(q,)``, in chunks (a ``lax.map``) of about
  ``_SAMPLED_CHUNK_ELEMENTS / batch`` positions; positions ``>= m n`` (dropped entries) give 0."""
  m, n = shape
  q = flat.shape[0]
  if q == 0:
    return jnp.zeros((0,), dtype)
  chunk = max(1, min(q, _SAMPLED_CHUNK_ELEMENTS // max(batch, 1)))
  padded = -(-q // chunk) * chunk
  flat = jnp.concatenate([flat, jnp.full((padded - q,), m * n, flat.dtype)])
  inside = flat < m * n
  rows, cols = jnp.where(inside, flat // n, 0), jnp.where(inside, flat % n, 0)

  def one(chunk_positions):
    r, c, keep = chunk_positions
    return jnp.where(keep, products(r, c), 0).astype(dtype)

  out = jax.lax.map(one, (rows.reshape(-1, chunk), cols.reshape(-1, chunk), inside.reshape(-1, chunk)))
  return out.reshape(-1)[:q]


def sampled_spectra(x: Array, g: Array, flat: Array, shape: tuple[int, int]) -> Array:
  """``sum_b X[b, u] G[b, v]`` at flat positions ``(u, v)``, ``X = m ifft_m(x)``, ``G = n ifft_n(g)``: ``(q,)`` complex.

  The Fourier coefficients' sampled gradient, from real ``x: (B, m)`` and ``g: (B, n)``. Their spectra
  are kept as halves, ``R = rfft`` along the contiguous axis, as rows of ``B``: ``X[:, u]`` is
  ``conj(R[u])`` up to ``m // 2`` and ``R[m - u]`` above (likewise ``G``). Each position gathers two half
  rows, conjugated where needed, and sums their product.
  """
  m, n = shape
  dtype = jnp.promote_types(jnp.result_type(x, g), jnp.complex64)
  real = jnp.finfo(dtype).dtype
  x_half = jnp.fft.rfft(x.astype(real), axis=1).T  # (m // 2 + 1, B)
  g_half = jnp.fft.rfft(g.astype(real), axis=1).T  # (n // 2 + 1, B)

  def half_rows(half, index, size):
    low = index <= size // 2
    picked = half[jnp.where(low, index, size - index)]
    return jax.lax.complex(jnp.real(picked), jnp.where(low[:, None], -1, 1) * jnp.imag(picked))

  return _over_positions(lambda r, c: jnp.sum(half_rows(x_half, r, m) * half_rows(g_half, c, n), axis=1),
                         flat, (m, n), x.shape[0], dtype)


def sparse_matmul(x: Array, values: Array, indices: Array, shape: Sequence[int], *, path: str = "auto") -> Array:
  """``x @ scatter_coefficients(values, indices, shape)`` (SHiRA's product).

  Args:
    x: ``(..., m)``; values: ``(p,)`` real; indices: ``(p,)`` flat or ``(p, 2)`` in ``(m, n)``.
    shape: ``(m, n)``.
    path: ``"dense"`` (scatter, then matmul), ``"factored"`` (gather ``x[..., rows]``, scale,
      scatter-add into ``(..., n)``) or ``"auto"`` (:func:`matmul_costs`).

  Returns:
    ``(..., n)``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.sparse_matmul(jnp.ones((1, 2)), jnp.array([3.0]), jnp.array([1]), (2, 2)).tolist()
    [[0.0, 3.0]]
  """
  m, n = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=True)
  x = _check_x(x, m)
  flat = flat_indices(indices, (m, n), values.shape[0])
  chosen = _resolve(path, lambda: matmul_costs("sparse", _batch(x), (m, n), values.shape[0]))
  dtype = jnp.result_type(x, values)
  if chosen == "dense":
    return jnp.matmul(x.astype(dtype), scatter_coefficients(values.astype(dtype), flat, (m, n)))
  # Dropped positions (flat == m * n under jit) gather row m: filled with 0, they add nothing.
  gathered = jnp.take(x.astype(dtype), flat // n, axis=-1, mode="fill", fill_value=0) * values.astype(dtype)
  return jnp.zeros(x.shape[:-1] + (n,), dtype).at[..., flat % n].add(gathered)


def waveft_matmul(
    x: Array, values: Array, indices: Array, shape: Sequence[int], *, wavelet: str = "haar", level: int = 1,
    path: str = "auto",
) -> Array:
  """``x @ waveft_delta(values, indices, shape, ...)``, factored or dense.

  Args:
    x: ``(..., m)``; values: ``(p,)`` real; indices: positions in the padded wavelet grid.
    shape: ``(m, n)``; wavelet, level: as in :func:`waveft_delta`.
    path: ``"dense"`` (form ``Delta W``), ``"factored"`` (1-D wavelet cascades along each axis,
      never an ``(m, n)`` array) or ``"auto"``.

  Returns:
    ``(..., n)``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> y = sp.waveft_matmul(jnp.ones((1, 4)), jnp.array([1.0]), jnp.array([0]), (4, 4), path="factored")
    >>> y.shape
    (1, 4)
  """
  shape = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=True)
  x = _check_x(x, shape[0])
  grid = wavelets.wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
  flat = flat_indices(indices, grid, values.shape[0])
  k_len = wavelets.filter_length(wavelet)
  chosen = _resolve(
      path, lambda: matmul_costs("wavelet", _batch(x), grid, values.shape[0], filter_length=k_len, level=level)
  )
  dtype = jnp.result_type(x, values)
  if chosen == "dense":
    return jnp.matmul(x.astype(dtype), waveft_delta(values.astype(dtype), flat, shape, wavelet=wavelet, level=level))
  return wavelets.sparse_idwt2_matmul(
      x.astype(dtype), values.astype(dtype), flat // grid[1], flat % grid[1], shape, wavelet=wavelet, level=level
  )


def fourier_matmul(x: Array, values: Array, indices: Array, shape: Sequence[int], *, path: str = "auto") -> Array:
  """``x @ fourier_delta(values, indices, shape)`` for real ``x``, factored or dense.

  The factored path uses ``x @ Re(ifft2(F)) = Re(ifft(T))`` along the output axis with
  ``T[v] = sum_{t: v_t = v} c_t ifft(x)[u_t]``: one FFT of each input row, a gather of the ``p``
  frequencies and one inverse FFT per output row.

  Args:
    x: ``(..., m)`` real; values: ``(p,)`` real or complex; indices: positions in ``(m, n)``.
    shape: ``(m, n)``; path: ``"dense"``, ``"factored"`` or ``"auto"``.

  Returns:
    ``(..., n)`` real.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.fourier_matmul(jnp.ones((1, 2)), jnp.array([4.0]), jnp.array([0]), (2, 2)).tolist()
    [[2.0, 2.0]]
  """
  m, n = _check_shape("shape", tuple(shape))
  values = _check_values(values, real=False)
  x = _check_x(x, m)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"`x` must be real, got {x.dtype}.")
  flat = flat_indices(indices, (m, n), values.shape[0])
  chosen = _resolve(path, lambda: matmul_costs("fourier", _batch(x), (m, n), values.shape[0]))
  real_dtype = jnp.result_type(x, jnp.real(values))
  if chosen == "dense":
    return jnp.matmul(x.astype(real_dtype), fourier_delta(values, flat, (m, n)).astype(real_dtype))
  complex_dtype = jnp.result_type(real_dtype, jnp.complex64)
  spectrum_x = jnp.fft.ifft(x.astype(complex_dtype), axis=-1)
  gathered = jnp.take(spectrum_x, flat // n, axis=-1, mode="fill", fill_value=0) * values.astype(complex_dtype)
  t = jnp.zeros(x.shape[:-1] + (n,), complex_dtype).at[..., flat % n].add(gathered)
  return jnp.real(jnp.fft.ifft(t, axis=-1)).astype(real_dtype)
