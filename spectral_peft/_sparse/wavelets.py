"""2-D wavelet synthesis and analysis of coefficient matrices, periodised, in the PyWavelets layout.

Convention. A matrix ``(m, n)`` is zero-padded at the bottom and right to ``(M, N)``, the smallest
multiples of ``2**level`` (:func:`wavelet_coefficient_shape`), and transformed with PyWavelets'
``mode="periodization"``. Every level then halves its block exactly, so the coefficient matrix is
``(M, N)`` and is packed as ``pywt.coeffs_to_array`` packs ``pywt.wavedec2`` (approximation in the
top-left corner, at each level the ``(cH, cV, cD)`` details below, right of and diagonal to the
coarser block). Hence, for ``X`` of shape ``(m, n)``::

  dwt2(X, w, L)  == pywt.coeffs_to_array(pywt.wavedec2(pad(X), w, "periodization", level=L))[0]
  idwt2(C, w, L, shape=(m, n)) == pywt.waverec2(array_to_coeffs(C), w, "periodization")[:m, :n]

For orthogonal wavelets (haar, db*, sym*, coif*) the padded transform is an orthogonal matrix, so
``dwt2`` is exactly the adjoint of ``idwt2`` (``<idwt2(C), X> = <C, dwt2(X)>``) and
``idwt2(dwt2(X)) == X``; ``dwt2(idwt2(C)) == C`` also holds when no padding is needed. For
biorthogonal wavelets the pair is still a perfect reconstruction, but not an adjoint pair.

Implementation. jaxwt's convolutions pad with ``reflect``/``symmetric``/``zero`` boundaries, whose
coefficient arrays are larger than the input, so they cannot hold exactly ``m * n`` coefficients nor
invert exactly after cropping. We therefore take the filter bank from ``pywt.Wavelet`` (the one
jaxwt uses) and apply the periodised two-channel filter bank along each axis in plain JAX, as
``K`` circular shifts of the signal (``K`` the filter length): ``O(K m n)`` work per level, no
``(m, m)`` matrices, differentiable, ``jit``/``vmap`` friendly.

References:
  Mallat, "A Wavelet Tour of Signal Processing", 3rd ed., Sec. 7.5 (periodic wavelet bases).
  Lee et al., "PyWavelets: A Python package for wavelet analysis", JOSS 2019.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation

Array = jax.Array


# -- checks -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _discrete_wavelets() -> tuple[str, ...]:
  import pywt  # Imported where used (filter banks only): `import spectral_peft` stays light.

  return tuple(pywt.wavelist(kind="discrete"))


@functools.lru_cache(maxsize=None)
def _filters(wavelet: str) -> tuple[tuple[float, ...], ...]:
  import pywt

  w = pywt.Wavelet(wavelet)
  return tuple(tuple(float(v) for v in f) for f in (w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi))


def check_wavelet(wavelet: Any) -> str:
  """Returns the name of a discrete PyWavelets wavelet, or raises ``ValueError``/``TypeError``."""
  if not isinstance(wavelet, str):
    raise TypeError(f"`wavelet` must be the name of a discrete PyWavelets wavelet (e.g. 'haar', 'db2'), got {wavelet!r}.")
  if wavelet not in _discrete_wavelets():
    import pywt

    families = ", ".join(f"{f}*" for f in pywt.families(short=True) if pywt.wavelist(f, kind="discrete"))
    raise ValueError(
        f"`wavelet` must be a discrete PyWavelets wavelet such as 'haar', 'db2', 'sym3', 'coif1' "
        f"(families: {families}), got {wavelet!r}."
    )
  return wavelet


def filter_length(wavelet: str) -> int:
  """Length ``K`` of the (padded) filters of ``wavelet``."""
  return len(_filters(check_wavelet(wavelet))[0])


def max_level(shape: Sequence[int], wavelet: str = "haar") -> int:
  """Deepest level PyWavelets allows for ``shape``: ``pywt.dwt_max_level(min(shape), K)``."""
  import pywt

  return int(pywt.dwt_max_level(int(min(shape)), filter_length(wavelet)))


def check_level(shape: Sequence[int], wavelet: str, level: Any) -> int:
  """Checks ``1 <= level <= max_level(shape, wavelet)`` and returns it as an ``int``."""
  level = _validation.check_positive_int("level", level)
  deepest = max_level(shape, wavelet)
  if level > deepest:
    raise ValueError(
        f"`level` {level} is too deep for a matrix of shape {tuple(int(d) for d in shape)} with wavelet "
        f"{wavelet!r} (filter length {filter_length(wavelet)}): PyWavelets allows at most level {deepest} "
        f"(pywt.dwt_max_level(min(shape), filter_length))."
    )
  return level


def _check_shape(name: str, shape: Any) -> tuple[int, int]:
  if (not isinstance(shape, (tuple, list)) or len(shape) != 2
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0 for d in shape)):
    raise ValueError(f"`{name}` must be a pair of positive ints (m, n), got {shape!r}.")
  return int(shape[0]), int(shape[1])


def wavelet_coefficient_shape(shape: Sequence[int], *, wavelet: str = "haar", level: int = 1) -> tuple[int, int]:
  """Shape ``(M, N)`` of the coefficient matrix of an ``(m, n)`` matrix: ``m, n`` rounded up to ``2**level``.

  Args:
    shape: ``(m, n)``.
    wavelet: discrete PyWavelets name (checked, and used to check ``level``).
    level: decomposition depth, ``1 <= level <= pywt.dwt_max_level(min(m, n), K)``.

  Returns:
    ``(M, N)`` with ``M = ceil(m / 2**level) * 2**level`` (likewise ``N``).

  Raises:
    ValueError: for an unknown wavelet or a level too deep for the shape.

  Example:
    >>> import spectral_peft as sp
    >>> sp.wavelet_coefficient_shape((30, 17), wavelet="db2", level=2)
    (32, 20)
  """
  m, n = _check_shape("shape", tuple(shape))
  check_wavelet(wavelet)
  level = check_level((m, n), wavelet, level)
  step = 2**level
  return -(-m // step) * step, -(-n // step) * step


# -- 1-D periodised filter bank along the last axis --------------------------------------------
# With K taps and N even, PyWavelets' periodization mode computes
#   lo[k] = sum_j dec_lo[j] x[(2k + K/2 - j) mod N]        (hi likewise with dec_hi)
#   x[(2k + 1 - K/2 + j) mod N] += lo[k] rec_lo[j] + hi[k] rec_hi[j].
def _analysis_last(x: Array, wavelet: str) -> Array:
  """``[lo, hi]`` along the last axis (even length ``N``)."""
  dec_lo, dec_hi, _, _ = _filters(wavelet)
  k_len = len(dec_lo)
  lo = hi = None
  for j in range(k_len):
    xs = jnp.roll(x, -(k_len // 2 - j), axis=-1)[..., ::2]
    lo = dec_lo[j] * xs if lo is None else lo + dec_lo[j] * xs
    hi = dec_hi[j] * xs if hi is None else hi + dec_hi[j] * xs
  assert lo is not None and hi is not None  # every wavelet has at least two taps
  return jnp.concatenate([lo, hi], axis=-1)


def _upsample(c: Array) -> Array:
  """``c[k]`` at position ``2k`` of a signal twice as long (zeros between)."""
  return jnp.stack([c, jnp.zeros_like(c)], axis=-1).reshape(c.shape[:-1] + (2 * c.shape[-1],))


def _synthesis_last(c: Array, wavelet: str) -> Array:
  """Inverse of :func:`_analysis_last`: ``[lo, hi]`` (length ``N``) to the signal (length ``N``)."""
  return _synthesis_axis(c, wavelet, -1)


def _synthesis_axis(c: Array, wavelet: str, axis: int) -> Array:
  """Periodised synthesis along ``axis`` in polyphase form: ``[lo, hi]`` (length ``N``) to the signal.

  Output sample ``2 i + r`` only meets the filter taps ``j`` with ``s_j = 1 - K // 2 + j`` of the
  parity of ``r`` (the upsampled signal is zero elsewhere), at ``lo[i + (r - s_j) / 2]``: each phase is
  a sum of rolled half-length ``lo``/``hi``, and the phases are interleaved. No upsampled ``N``-length
  intermediate is formed, and no transpose for ``axis != -1``.
  """
  _, _, rec_lo, rec_hi = _filters(wavelet)
  k_len = len(rec_lo)
  axis = axis % c.ndim
  half = c.shape[axis] // 2
  lo = jax.lax.slice_in_dim(c, 0, half, axis=axis)
  hi = jax.lax.slice_in_dim(c, half, 2 * half, axis=axis)
  phases = []
  for r in (0, 1):
    out = None
    for j in range(k_len):
      shift = 1 - k_len // 2 + j
      if (r - shift) % 2:
        continue
      term = jnp.roll(rec_lo[j] * lo + rec_hi[j] * hi, (shift - r) // 2, axis=axis)
      out = term if out is None else out + term
    phases.append(jnp.zeros_like(lo) if out is None else out)
  interleaved = jnp.stack(phases, axis=axis + 1)
  return interleaved.reshape(c.shape[:axis] + (2 * half,) + c.shape[axis + 1:])


def _synthesis_adjoint_last(y: Array, wavelet: str) -> Array:
  """Transpose of :func:`_synthesis_last` (equal to :func:`_analysis_last` for orthogonal wavelets)."""
  return synthesis_adjoint_axis(y, wavelet, -1)


def synthesis_adjoint_axis(y: Array, wavelet: str, axis: int) -> Array:
  """Transpose of the periodised one-level synthesis along ``axis`` (even length): ``[lo, hi]`` along it.

  Along the first axis of a ``(length, B)`` array the result is already in the row layout a sampled
  product gathers from (no transposed copy of a ``(B, length)`` result).
  """
  _, _, rec_lo, rec_hi = _filters(wavelet)
  k_len = len(rec_lo)
  axis = axis % y.ndim
  lo = hi = None
  for j in range(k_len):
    rolled = jnp.roll(y, -(1 - k_len // 2 + j), axis=axis)
    ys = jax.lax.slice_in_dim(rolled, 0, y.shape[axis], 2, axis=axis)
    lo = rec_lo[j] * ys if lo is None else lo + rec_lo[j] * ys
    hi = rec_hi[j] * ys if hi is None else hi + rec_hi[j] * ys
  assert lo is not None and hi is not None  # every wavelet has at least two taps
  return jnp.concatenate([lo, hi], axis=axis)


def _along(fn, x: Array, axis: int, wavelet: str) -> Array:
  return jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1), wavelet), -1, axis)


# -- 2-D transforms ----------------------------------------------------------------------------
def dwt2(matrix: Array, wavelet: str = "haar", level: int = 1) -> Array:
  """2-D periodised wavelet analysis of ``matrix``, packed as ``pywt.coeffs_to_array``.

  References:
    Mallat, "A Wavelet Tour of Signal Processing", Sec. 7.7 (separable 2-D bases).

  Args:
    matrix: ``(..., m, n)`` floating (or complex) array; leading axes are batch axes.
    wavelet: any discrete PyWavelets wavelet name (``"haar"``, ``"db2"``, ``"sym3"``, ``"coif1"``...).
    level: number of levels, ``1 <= level <= pywt.dwt_max_level(min(m, n), filter_length)``.

  Returns:
    ``(..., M, N)`` coefficients, ``(M, N) = wavelet_coefficient_shape((m, n), ...)``: the matrix is
    zero-padded to ``(M, N)`` and decomposed with ``mode="periodization"`` (see the module docstring).

  Raises:
    ValueError: unknown wavelet, level too deep for ``(m, n)``, fewer than 2 axes.
    TypeError: non-floating ``matrix``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> c = sp.dwt2(jnp.ones((4, 6)), "haar")
    >>> c.shape, round(float(c[0, 0]), 4)
    ((4, 6), 2.0)
  """
  matrix = jnp.asarray(matrix)
  if matrix.ndim < 2:
    raise ValueError(f"`matrix` must have at least 2 axes (..., m, n), got shape {matrix.shape}.")
  _validation.check_floating("matrix", matrix)
  _validation.check_nonempty("matrix", matrix)
  m, n = matrix.shape[-2:]
  big_m, big_n = wavelet_coefficient_shape((m, n), wavelet=wavelet, level=level)
  pad = [(0, 0)] * (matrix.ndim - 2) + [(0, big_m - m), (0, big_n - n)]
  coeffs = jnp.pad(matrix, pad)
  for lev in range(level):
    rows, cols = big_m >> lev, big_n >> lev
    block = coeffs[..., :rows, :cols]
    block = _along(_analysis_last, block, -2, wavelet)
    block = _analysis_last(block, wavelet)
    coeffs = coeffs.at[..., :rows, :cols].set(block)
  return coeffs


def idwt2(coeffs: Array, wavelet: str = "haar", level: int = 1, *, shape: Optional[Sequence[int]] = None) -> Array:
  """2-D periodised wavelet synthesis of a coefficient matrix in the ``pywt.coeffs_to_array`` layout.

  References:
    Mallat, "A Wavelet Tour of Signal Processing", Sec. 7.7; "Exploring sparsity for PEFT using wavelets for vision" (WaveFT), Sec. 3.

  Args:
    coeffs: ``(..., M, N)`` floating (or complex) coefficients; leading axes are batch axes.
    wavelet: any discrete PyWavelets wavelet name.
    level: number of levels; ``M`` and ``N`` must be multiples of ``2**level``.
    shape: ``(m, n)`` of the output: the reconstruction is cropped to its top-left ``(m, n)``
      corner; ``wavelet_coefficient_shape(shape)`` must equal ``(M, N)``. ``None``: ``(M, N)``.

  Returns:
    ``(..., m, n)``, equal to ``pywt.waverec2(..., mode="periodization")[:m, :n]``.

  Raises:
    ValueError: unknown wavelet, level too deep, coefficient shape not matching ``shape``.
    TypeError: non-floating ``coeffs``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> x = jnp.arange(63.0).reshape(7, 9)
    >>> bool(jnp.allclose(sp.idwt2(sp.dwt2(x, "db2"), "db2", shape=(7, 9)), x, atol=1e-4))
    True
  """
  coeffs = jnp.asarray(coeffs)
  if coeffs.ndim < 2:
    raise ValueError(f"`coeffs` must have at least 2 axes (..., M, N), got shape {coeffs.shape}.")
  _validation.check_floating("coeffs", coeffs)
  _validation.check_nonempty("coeffs", coeffs)
  big = tuple(coeffs.shape[-2:])
  out_shape = big if shape is None else _check_shape("shape", tuple(shape))
  expected = wavelet_coefficient_shape(out_shape, wavelet=wavelet, level=level)
  if expected != big:
    raise ValueError(
        f"`coeffs` of shape (..., {big[0]}, {big[1]}) do not match `shape` {out_shape} at level {level}: "
        f"expected coefficients (..., {expected[0]}, {expected[1]}) (each side rounded up to a multiple of 2**level)."
    )
  big_m, big_n = big
  out = coeffs
  for lev in reversed(range(level)):
    rows, cols = big_m >> lev, big_n >> lev
    block = out[..., :rows, :cols]
    block = _synthesis_axis(block, wavelet, -1)
    block = _synthesis_axis(block, wavelet, -2)
    out = block if (rows, cols) == (big_m, big_n) else out.at[..., :rows, :cols].set(block)
  return out[..., : out_shape[0], : out_shape[1]]


# -- factored sparse product -------------------------------------------------------------------
def coefficient_levels(rows: Array, cols: Array, coeff_shape: tuple[int, int], level: int) -> Array:
  """0-based level of each coefficient (0: finest details; ``level - 1``: coarsest, approximation included)."""
  big_m, big_n = coeff_shape
  depth = jnp.zeros(jnp.shape(rows), jnp.int32)
  for lev in range(1, level):
    depth = depth + ((rows < (big_m >> lev)) & (cols < (big_n >> lev))).astype(jnp.int32)
  return depth


def sparse_idwt2_matmul(
    x: Array, values: Array, rows: Array, cols: Array, shape: tuple[int, int], *, wavelet: str, level: int
) -> Array:
  """``x @ idwt2(C, shape=shape)`` for sparse ``C`` without forming the ``(m, n)`` matrix.

  With ``X_l = S_l B_l S_l'^T`` at each level (``S`` the 1-D synthesis along an axis, ``B_l`` the
  level's block of ``C`` with the coarser reconstruction in its corner), ``x @ X`` is: the adjoint
  1-D synthesis of ``x`` at every level (a 1-D wavelet cascade, ``O(K M)`` per row), one gather and
  scatter-add over the ``p`` coefficients, and the 1-D synthesis cascade over the ``n`` axis.

  Args:
    x: ``(..., m)``.
    values: ``(p,)`` coefficients; rows, cols: ``(p,)`` int positions in the ``(M, N)`` grid.
    shape: ``(m, n)``; wavelet, level: as in :func:`idwt2` (already checked by the caller).

  Returns:
    ``(..., n)``.
  """
  m, n = shape
  big_m, big_n = wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
  dtype = jnp.result_type(x, values)
  u = jnp.pad(x.astype(dtype), [(0, 0)] * (x.ndim - 1) + [(0, big_m - m)])
  analysed = []
  for lev in range(level):
    v = _synthesis_adjoint_last(u, wavelet)
    analysed.append(v)
    u = v[..., : (big_m >> lev) // 2]
  row_sizes = [big_m >> lev for lev in range(level)]
  col_sizes = [big_n >> lev for lev in range(level)]
  row_offsets = jnp.asarray(np.cumsum([0] + row_sizes[:-1]), jnp.int32)
  col_offsets = jnp.asarray(np.cumsum([0] + col_sizes[:-1]), jnp.int32)
  levels = coefficient_levels(rows, cols, (big_m, big_n), level)
  flat_rows = row_offsets[levels] + rows
  flat_cols = col_offsets[levels] + cols
  stacked = jnp.concatenate(analysed, axis=-1) if level > 1 else analysed[0]
  gathered = jnp.take(stacked, flat_rows, axis=-1, mode="fill", fill_value=0) * values.astype(dtype)
  w = jnp.zeros(x.shape[:-1] + (sum(col_sizes),), dtype).at[..., flat_cols].add(gathered)
  out = None
  for lev in reversed(range(level)):
    start = sum(col_sizes[:lev])
    block = w[..., start : start + col_sizes[lev]]
    if out is not None:
      block = block.at[..., : out.shape[-1]].add(out)
    out = _synthesis_last(block, wavelet)
  assert out is not None  # level >= 1
  return out[..., :n]


def receptive_field_1d(wavelet: str, level: int) -> int:
  """Support length of a level-``level`` wavelet (or scaling) function: ``(K - 1)(2**level - 1) + 1``."""
  k_len = filter_length(wavelet)
  level = _validation.check_positive_int("level", level)
  return (k_len - 1) * (2**level - 1) + 1


# -- zero boundary (PEFT's WaveFT convention), through jaxwt -------------------------------------
def zero_boundary_coefficient_shape(shape: Sequence[int], *, wavelet: str = "haar") -> tuple[int, int]:
  """``(M, N)`` grid of one-level zero-boundary synthesis for an ``(m, n)`` output.

  The grid is the output grown by ``K - 2`` (``K`` the filter length) and rounded up to even, as
  PEFT's WaveFT (``WAVELET_REDUCTIONS``): one-level zero-boundary synthesis of an ``(M/2, N/2)``
  sub-band quadruple gives ``(M - K + 2, N - K + 2)`` samples, which are cropped to ``(m, n)``.

  Args:
    shape: ``(m, n)``.
    wavelet: a discrete PyWavelets wavelet name.

  Returns:
    ``(M, N)`` with ``M = m + K - 2`` rounded up to even (likewise ``N``).

  Raises:
    ValueError: unknown wavelet or bad ``shape``.

  Example:
    >>> import spectral_peft._sparse.wavelets as w
    >>> w.zero_boundary_coefficient_shape((5, 8), wavelet="db2")
    (8, 10)
  """
  m, n = _check_shape("shape", tuple(shape))
  grow = filter_length(wavelet) - 2
  return m + grow + (m + grow) % 2, n + grow + (n + grow) % 2


def idwt2_zero(coeffs: Array, wavelet: str = "haar", *, shape: Optional[Sequence[int]] = None) -> Array:
  """One-level 2-D wavelet synthesis with zero boundaries (``jaxwt.waverec2``), cropped to ``shape``.

  ``coeffs`` holds the four sub-bands in the ``pywt.coeffs_to_array`` layout (``cA`` top-left,
  ``cH`` bottom-left, ``cV`` top-right, ``cD`` bottom-right, each ``(M/2, N/2)``), so::

    idwt2_zero(C, w, shape=(m, n)) == pywt.waverec2((cA, (cH, cV, cD)), w, mode="zero")[:m, :n]

  This is the synthesis of PEFT's WaveFT up to a relabelling of positions (PEFT stores the torch
  ``(out, in)`` weight with ``cH`` top-right and ``cV`` bottom-left); :func:`sp.peft.import_peft`
  does the relabelling.

  References:
    Wolter et al., "Wavelet-packet powered deepfake image detection" (jaxwt/ptwt), 2022;
    PEFT's WaveFT (``peft.tuners.waveft``).

  Args:
    coeffs: ``(..., M, N)`` floating coefficients, ``M`` and ``N`` even.
    wavelet: a discrete PyWavelets wavelet name.
    shape: ``(m, n)`` crop of the ``(M - K + 2, N - K + 2)`` reconstruction (``None``: no crop).

  Returns:
    ``(..., m, n)``.

  Raises:
    ValueError: odd ``M`` or ``N``, fewer than 2 axes, ``shape`` larger than the reconstruction.

  Example:
    >>> import jax.numpy as jnp, spectral_peft._sparse.wavelets as w
    >>> w.idwt2_zero(jnp.ones((8, 10)), "db2", shape=(5, 8)).shape
    (5, 8)
  """
  import jaxwt  # Local import: jaxwt's start-up cost is paid only by zero-boundary users.

  coeffs = jnp.asarray(coeffs)
  if coeffs.ndim < 2:
    raise ValueError(f"`coeffs` must have at least 2 axes (..., M, N), got shape {coeffs.shape}.")
  _validation.check_floating("coeffs", coeffs)
  check_wavelet(wavelet)
  big_m, big_n = coeffs.shape[-2:]
  if big_m % 2 or big_n % 2:
    raise ValueError(f"`coeffs` must have even sides (..., M, N), got shape {coeffs.shape}.")
  full = (big_m - filter_length(wavelet) + 2, big_n - filter_length(wavelet) + 2)
  out_shape = full if shape is None else _check_shape("shape", tuple(shape))
  if out_shape[0] > full[0] or out_shape[1] > full[1]:
    raise ValueError(
        f"`shape` {out_shape} is larger than the {full} zero-boundary reconstruction of coefficients "
        f"{(big_m, big_n)} with {wavelet!r}; use zero_boundary_coefficient_shape(shape) for the grid."
    )
  batch = coeffs.shape[:-2]
  flat = coeffs.reshape((-1, big_m, big_n))
  hm, hn = big_m // 2, big_n // 2
  approx, horizontal = flat[:, :hm, :hn], flat[:, hm:, :hn]
  vertical, diagonal = flat[:, :hm, hn:], flat[:, hm:, hn:]
  out = jaxwt.waverec2([approx, (horizontal, vertical, diagonal)], wavelet)
  out = out[:, : out_shape[0], : out_shape[1]]
  return out.reshape(batch + tuple(out_shape))


# With K taps, one level of zero-boundary synthesis of [lo, hi] (each of length h) is the full
# transposed convolution  full[t] = sum_k lo[k] rec_lo[t - 2k] + hi[k] rec_hi[t - 2k]  (length
# 2h + K - 2) with K - 2 samples cropped at each end (jaxwt/ptwt), i.e. pywt.idwt(..., mode="zero").
def _zero_synthesis_last(c: Array, wavelet: str, out_len: int) -> Array:
  """``[lo, hi]`` (length ``M``) -> the first ``out_len`` samples of the zero-boundary synthesis."""
  _, _, rec_lo, rec_hi = _filters(wavelet)
  k_len = len(rec_lo)
  half = c.shape[-1] // 2
  up_lo, up_hi = _upsample(c[..., :half]), _upsample(c[..., half:])
  full_len = 2 * half + k_len - 2
  pad = [(0, 0)] * (c.ndim - 1)
  full = None
  for j in range(k_len):
    term = jnp.pad(rec_lo[j] * up_lo + rec_hi[j] * up_hi, pad + [(j, k_len - 1 - j)])[..., :full_len]
    full = term if full is None else full + term
  assert full is not None  # every wavelet has at least two taps
  return full[..., k_len - 2 : k_len - 2 + out_len]


def _zero_synthesis_adjoint_last(y: Array, wavelet: str, coeff_len: int) -> Array:
  """Transpose of :func:`_zero_synthesis_last`: ``(..., out_len)`` -> ``(..., M)`` (``[lo, hi]``)."""
  _, _, rec_lo, rec_hi = _filters(wavelet)
  k_len = len(rec_lo)
  half = coeff_len // 2
  padded_len = 2 * half + 2 * k_len
  full = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(k_len - 2, padded_len - (k_len - 2) - y.shape[-1])])
  lo = hi = None
  for j in range(k_len):
    ys = full[..., j : j + 2 * half : 2]
    lo = rec_lo[j] * ys if lo is None else lo + rec_lo[j] * ys
    hi = rec_hi[j] * ys if hi is None else hi + rec_hi[j] * ys
  assert lo is not None and hi is not None  # every wavelet has at least two taps
  return jnp.concatenate([lo, hi], axis=-1)


def sparse_idwt2_zero_matmul(
    x: Array, values: Array, rows: Array, cols: Array, shape: tuple[int, int], *, wavelet: str
) -> Array:
  """``x @ idwt2_zero(C, shape=shape)`` for sparse ``C`` without forming an ``(m, n)`` matrix.

  ``idwt2_zero(C)[:m, :n] = S_m C S_n^T`` with ``S`` the cropped 1-D zero-boundary synthesis of
  ``[lo, hi]`` columns, so ``x @ Delta W = ((x S_m) C) S_n^T``: the adjoint 1-D synthesis of ``x``
  (``O(K M)`` per row), a gather/scatter over the ``p`` coefficients, and the 1-D synthesis along
  ``n``.

  Args:
    x: ``(..., m)``.
    values: ``(p,)``; rows, cols: ``(p,)`` int positions in the ``(M, N)`` grid of
      :func:`zero_boundary_coefficient_shape`.
    shape: ``(m, n)``; wavelet: a discrete PyWavelets name (checked by the caller).

  Returns:
    ``(..., n)``.
  """
  m, n = shape
  big_m, big_n = zero_boundary_coefficient_shape(shape, wavelet=wavelet)
  dtype = jnp.result_type(x, values)
  u = _zero_synthesis_adjoint_last(x.astype(dtype), wavelet, big_m)
  gathered = jnp.take(u, rows, axis=-1) * values.astype(dtype)
  z = jnp.zeros(x.shape[:-1] + (big_n,), dtype).at[..., cols].add(gathered)
  return _zero_synthesis_last(z, wavelet, n)
