"""PEFT's adapter positions, drawn exactly as PEFT draws them (no torch needed).

PEFT's FourierFT and WaveFT store no positions: they are drawn again when an adapter loads, as the
first ``p`` entries of ``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))``.
:func:`torch_randperm_prefix` reproduces that draw in numpy in ``O(p)`` time and memory (torch's CPU
generator is MT19937, its ``randperm`` a forward Fisher-Yates shuffle drawing ``random() % (n - i)``),
and :func:`peft_positions` maps it to flat positions of our Flax-layout grids. The method specs
(``random_loc_seed=``) and the PEFT file formats both use it.

References:
  Matsumoto and Nishimura, "Mersenne Twister" (1998) (torch's CPU generator).
  Mangrulkar et al., "PEFT" (HuggingFace, 2022-), ``peft.tuners.{fourierft,waveft}`` (version 0.21).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

# torch's randperm switches to a 64-bit inside-out shuffle from this size on (ATen randperm_cpu).
_RANDPERM_SMALL_LIMIT = (2**32 - 1) // 20


# -- torch's CPU random permutation, in numpy -------------------------------------------------------
def _mt19937_key(seed: int) -> np.ndarray:
  """MT19937 state of ``init_genrand(seed mod 2**32)``: what ``torch.Generator().manual_seed(seed)`` sets."""
  key = np.empty(624, np.uint32)
  s = int(seed) & 0xFFFFFFFF
  key[0] = s
  for i in range(1, 624):
    s = (1812433253 * (s ^ (s >> 30)) + i) & 0xFFFFFFFF
    key[i] = s
  return key


def torch_randperm_prefix(n: int, k: int, seed: int) -> np.ndarray:
  """The first ``k`` entries of ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``.

  torch's CPU ``randperm`` (for ``n < (2**32 - 1) // 20``) starts from ``0..n-1`` and, for
  ``i = 0, ..., n - 2``, swaps entry ``i`` with entry ``i + random() % (n - i)``, ``random()`` the
  next 32-bit output of MT19937 seeded by ``init_genrand(seed mod 2**32)``. Entry ``i`` is final
  after step ``i``, so ``k`` steps over a sparse record of the swapped entries give the prefix in
  ``O(k)`` time and memory, whatever ``n``. The 32-bit outputs come from numpy's MT19937 set to
  that state.

  Args:
    n: permutation size, ``1 <= n < 214748364``.
    k: prefix length, ``1 <= k <= n``.
    seed: the generator seed (any Python int; torch keeps its low 32 bits).

  Returns:
    ``(k,)`` int64.

  Raises:
    ValueError: ``n`` at or above torch's 64-bit limit (another algorithm, needing an ``O(n)`` pass),
      or ``k`` out of range.

  Example:
    >>> from spectral_peft.peft._methods.positions import torch_randperm_prefix
    >>> torch_randperm_prefix(10, 3, 777).shape
    (3,)
  """
  return _randperm_prefix_cached(int(n), int(k), int(seed)).copy()


@functools.lru_cache(maxsize=64)  # Every PEFT layer shares one seed; layers of one shape share the draw.
def _randperm_prefix_cached(n: int, k: int, seed: int) -> np.ndarray:
  if not 1 <= n < _RANDPERM_SMALL_LIMIT:
    raise ValueError(
        f"PEFT positions can be reproduced exactly for weights with fewer than {_RANDPERM_SMALL_LIMIT} "
        f"entries (torch.randperm's 32-bit path), got {n} entries."
    )
  if not 1 <= k <= n:
    raise ValueError(f"The number of positions must be in [1, {n}], got {k}.")
  bit_generator = np.random.MT19937()
  bit_generator.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(seed), "pos": 624}}
  draws = bit_generator.random_raw(min(k, n - 1)) if n > 1 else np.zeros((0,), np.uint64)
  swapped: dict[int, int] = {}
  out = np.empty(k, np.int64)
  for i in range(k):
    if i < n - 1:
      z = i + int(draws[i]) % (n - i)
      out[i] = swapped.get(z, z)
      swapped[z] = swapped.get(i, i)
    else:
      out[i] = swapped.get(i, i)
  return out


def _waveft_relabel(rows_t: np.ndarray, cols_t: np.ndarray, shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
  """PEFT WaveFT positions ``(r, c)`` of the ``(out, in)`` weight -> flat positions of our ``(M, N)`` grid.

  PEFT puts ``(r, c)`` at ``(r + (N - out) // 2, c + (M - in) // 2)`` of its ``(N, M)`` spectrum with
  ``cH`` top-right and ``cV`` bottom-left. Transposing to the Flax layout swaps the roles of the two
  axes, so in the transposed ``(M, N)`` grid the horizontal detail sits top-right; our
  ``pywt.coeffs_to_array`` layout has it bottom-left, hence the swap of those two quadrants.
  """
  m, n = shape
  big_m, big_n = grid
  i = cols_t + (big_m - m) // 2
  j = rows_t + (big_n - n) // 2
  hm, hn = big_m // 2, big_n // 2
  top_right = (i < hm) & (j >= hn)
  bottom_left = (i >= hm) & (j < hn)
  i2 = np.where(top_right, i + hm, np.where(bottom_left, i - hm, i))
  j2 = np.where(top_right, j - hn, np.where(bottom_left, j + hn, j))
  return i2 * big_n + j2


def peft_positions(kind: str, shape: tuple[int, int], k: int, seed: int, grid: Optional[tuple[int, int]] = None) -> np.ndarray:
  """PEFT's ``k`` positions for a FourierFT/WaveFT layer, as flat positions of our grid, in PEFT's order.

  Args:
    kind: ``"fourierft"`` or ``"waveft"``.
    shape: ``(m, n) = (in_features, out_features)``, the Flax kernel's matrix shape.
    k: ``n_frequency``.
    seed: ``random_loc_seed``.
    grid: WaveFT's coefficient grid ``(M, N)`` (``WaveFT.grid(shape)``); unused for FourierFT.

  Returns:
    ``(k,)`` int64 flat row-major positions: the ``i``-th is where PEFT's ``spectrum[i]`` sits.
  """
  m, n = shape
  perm = torch_randperm_prefix(m * n, k, seed)
  rows_t, cols_t = perm // m, perm % m  # In torch's (out, in) weight.
  if kind == "fourierft":
    return cols_t * n + rows_t
  if kind == "waveft":
    assert grid is not None  # WaveFT positions live in its coefficient grid
    return _waveft_relabel(rows_t, cols_t, (m, n), (int(grid[0]), int(grid[1])))
  raise ValueError(f"`kind` must be 'fourierft' or 'waveft', got {kind!r}.")
