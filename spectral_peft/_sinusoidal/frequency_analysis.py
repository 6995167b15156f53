"""Frequency analysis of periodic sinusoidal networks: Bessel expansion, amplitude bound, sub-periods.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024), Thm. 1, Thm. 2 (after Novello et al., "Understanding sinusoidal neural
  networks"), and sec. 5.3 (sub-periods).

Theorem 1 (Jacobi-Anger): a hidden neuron ``h_j(x) = sin(sum_i A_ij sin(theta_i(x)) + b_j)``, with
``theta_i(x) = <omega_i, x> + phi_i``, equals ``sum_{k in Z^m} alpha_k(A_j) sin(<k, theta(x)> + b_j)`` with
``alpha_k(A_j) = prod_i J_{k_i}(A_ij)``. The generated frequencies are the integer combinations
``sum_i k_i omega_i``; Theorem 2 bounds ``|alpha_k(a)| <= prod_i (|a_i| / 2)^{|k_i|} / |k_i|!``.
Layout as in :mod:`spectral_peft._sinusoidal.siren`: ``A`` is ``(m, n)``, so neuron ``j`` is ``A[:, j]``.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft._sinusoidal import siren
from spectral_peft import _validation

Array = jax.Array
Params = dict[str, Any]


def bessel_j(order: Any, x: Any, *, num_points: int = 128) -> Array:
  """Bessel function of the first kind ``J_n(x)`` for integer orders (negative ones included).

  Uses Bessel's integral ``J_n(x) = (1 / 2 pi) int_0^{2 pi} cos(n t - x sin t) dt`` with the trapezoid rule,
  which is exponentially accurate for a periodic integrand: the error is of the size of
  ``J_{num_points - |n|}(x)``, negligible for ``|n| + |x| < num_points - 30``. Differentiable in ``x``.
  (``jax.scipy.special.bessel_jn`` returns NaN for negative arguments in float32, hence this routine.)

  Args:
    order: integer order(s) ``n``, broadcastable with ``x``.
    x: real argument(s).
    num_points: quadrature nodes.

  Returns:
    ``J_n(x)`` with the broadcast shape, in the floating dtype of ``x``.

  Example:
    >>> import spectral_peft as sp
    >>> round(float(sp.bessel_j(1, 1.0)), 6)  # scipy.special.jv(1, 1.0) = 0.440051
    0.440051
  """
  num_points = _validation.check_positive_int("num_points", num_points)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  n = jnp.asarray(order).astype(x.dtype)
  t = jnp.arange(num_points, dtype=x.dtype) * (2.0 * math.pi / num_points)
  return jnp.mean(jnp.cos(n[..., None] * t - x[..., None] * jnp.sin(t)), axis=-1)


def multi_indices(m: int, order: int, *, norm: str = "l1") -> np.ndarray:
  """All ``k in Z^m`` with ``||k||_1 <= order`` (``norm="l1"``) or ``||k||_inf <= order`` (``"linf"``).

  Args:
    m: number of input frequencies.
    order: the truncation order ``K`` (non-negative int).
    norm: ``"l1"`` (total order; polynomial count) or ``"linf"`` (the paper's order; ``(2K + 1)^m`` terms).

  Returns:
    ``(T, m)`` int64 array, the zero vector first.

  Raises:
    ValueError: on a bad norm or a negative order.

  Example:
    >>> import spectral_peft as sp
    >>> sp.multi_indices(2, 1).tolist()
    [[0, 0], [-1, 0], [0, -1], [0, 1], [1, 0]]
  """
  m = _validation.check_positive_int("m", m)
  if isinstance(order, bool) or int(order) != order or order < 0:
    raise ValueError(f"`order` must be a non-negative int, got {order!r}.")
  if norm not in ("l1", "linf"):
    raise ValueError(f"`norm` must be 'l1' or 'linf', got {norm!r}.")
  order = int(order)
  if norm == "linf":
    axis = np.arange(-order, order + 1)
    grid = np.stack(np.meshgrid(*([axis] * m), indexing="ij"), axis=-1).reshape(-1, m)
  else:
    # Build coordinate by coordinate; each state is (prefix, remaining budget).
    prefixes = np.zeros((1, 0), np.int64)
    budget = np.array([order])
    for _ in range(m):
      new_prefixes, new_budget = [], []
      for v in range(-order, order + 1):
        ok = budget >= abs(v)
        new_prefixes.append(np.concatenate([prefixes[ok], np.full((ok.sum(), 1), v)], axis=1))
        new_budget.append(budget[ok] - abs(v))
      prefixes, budget = np.concatenate(new_prefixes), np.concatenate(new_budget)
    grid = prefixes
  key = np.abs(grid).sum(axis=1) if norm == "l1" else np.abs(grid).max(axis=1)
  order_idx = np.lexsort(grid.T[::-1])
  grid = grid[order_idx]
  grid = grid[np.argsort(key[order_idx], kind="stable")]
  return grid.astype(np.int64)


class HarmonicExpansion(NamedTuple):
  """A truncated Theorem-1 expansion of the first hidden layer.

  Attributes:
    k: ``(T, m)`` int64 multi-indices.
    frequencies: ``(T, dim)`` generated frequencies ``sum_i k_i omega_i`` (angular, as ``omega``).
    amplitudes: ``(T, n)`` ``alpha_k(A_j) = prod_i J_{k_i}(A_ij)`` for every neuron ``j``.
    phases: ``(T, n)`` ``<k, phi> + b_j``.
  """

  k: np.ndarray
  frequencies: Array
  amplitudes: Array
  phases: Array


def harmonic_expansion(params: Params, *, order: int, norm: str = "l1", max_terms: int = 500_000) -> HarmonicExpansion:
  """Generated frequencies and amplitudes of the first hidden layer, truncated at ``order`` (Thm. 1).

  References:
    Aldana, Novello, Velho, TR-24-02, Theorem 1 (eq. 2).

  Args:
    params: a periodic SIREN dict (only ``omega``, ``phi`` and the first hidden layer are used).
    order: truncation order ``K`` of the multi-indices.
    norm: ``"l1"`` or ``"linf"`` truncation (see :func:`multi_indices`).
    max_terms: refuse expansions with more terms than this.

  Returns:
    :class:`HarmonicExpansion`.

  Raises:
    ValueError: if the expansion would exceed ``max_terms``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 3, 2), 2, 1)
    >>> p = sp.bound_params(p, 0.5)
    >>> e = sp.harmonic_expansion(p, order=8)
    >>> x = jnp.array([[0.2, -0.4]])
    >>> bool(jnp.allclose(sp.expansion_apply(e, x), sp.hidden_neurons(p, x), atol=1e-5))
    True
  """
  siren._check_params(params)
  omega, phi = params["omega"], params["phi"]
  a, b = params["hidden"][0]["kernel"], params["hidden"][0]["bias"]
  m = omega.shape[1]
  if norm == "linf" and (2 * int(order) + 1) ** m > max_terms:
    raise ValueError(f"`order`={order} with norm 'linf' and m={m} gives {(2 * int(order) + 1) ** m} terms > max_terms={max_terms}.")
  k = multi_indices(m, order, norm=norm)
  if k.shape[0] > max_terms:
    raise ValueError(f"the expansion has {k.shape[0]} terms > max_terms={max_terms}; lower `order`.")
  orders = jnp.arange(-order, order + 1)
  table = bessel_j(orders[:, None, None], a[None])  # (2K + 1, m, n)
  picked = table[k + order, jnp.arange(m)[None, :], :]  # (T, m, n)
  amplitudes = jnp.prod(picked, axis=1)
  kf = jnp.asarray(k, omega.dtype)
  frequencies = kf @ omega.T
  phases = (kf @ phi)[:, None] + b[None, :]
  return HarmonicExpansion(k, frequencies, amplitudes, phases)


def expansion_apply(expansion: HarmonicExpansion, x: Array) -> Array:
  """Rebuilds the hidden neurons from a truncated expansion: ``sum_k alpha_k sin(<k, theta(x)> + b)``.

  Args:
    expansion: from :func:`harmonic_expansion`.
    x: ``(..., dim)`` coordinates.

  Returns:
    ``(..., n)`` approximations of :func:`hidden_neurons`; exact as the order grows when ``||A||_inf < 1``
    (and for any ``A``, more slowly).
  """
  arg = jnp.matmul(x, expansion.frequencies.T)[..., :, None] + expansion.phases  # (..., T, n)
  return jnp.sum(expansion.amplitudes * jnp.sin(arg), axis=-2)


def hidden_neurons(params: Params, x: Array) -> Array:
  """The exact first hidden layer ``sin(H(x) @ A + b)``, shape ``(..., n)``."""
  h = siren.periodic_siren_first_layer(params, x)
  layer = params["hidden"][0]
  return jnp.sin(jnp.matmul(h, layer["kernel"]) + layer["bias"])


def amplitude_bound(a: Array, k: Any) -> Array:
  """Theorem 2: ``|alpha_k(a)| <= prod_i (|a_i| / 2)^{|k_i|} / |k_i|!`` for every neuron column.

  References:
    Aldana, Novello, Velho, TR-24-02, Theorem 2 and eq. 9.

  Args:
    a: ``(m, n)`` hidden matrix (neuron ``j`` is ``a[:, j]``).
    k: ``(T, m)`` integer multi-indices.

  Returns:
    ``(T, n)`` bounds, comparable with ``harmonic_expansion(...).amplitudes``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.amplitude_bound(jnp.array([[0.5], [1.0]]), [[1, 2]]).tolist()  # (0.25 / 1) * (0.5^2 / 2)
    [[0.03125]]
  """
  _validation.check_ndim("a", a, 2)
  k = np.abs(np.asarray(k, np.int64))
  if k.ndim != 2 or k.shape[1] != a.shape[0]:
    raise ValueError(f"`k` must have shape (T, {a.shape[0]}) to match a {tuple(a.shape)}, got {k.shape}.")
  log_fact = jnp.asarray([math.lgamma(v + 1.0) for v in range(int(k.max(initial=0)) + 1)], a.dtype)
  half = jnp.abs(a) / 2.0  # (m, n)
  kf = jnp.asarray(k, a.dtype)[:, :, None]  # (T, m, 1)
  powers = jnp.where(kf == 0, 1.0, half[None] ** kf)
  return jnp.prod(powers * jnp.exp(-log_fact[k])[:, :, None], axis=1)


def generated_frequencies(omega: Any, *, order: int, period: float = 2.0, norm: str = "l1") -> np.ndarray:
  """The distinct integer frequencies ``sum_i k_i k(omega_i)`` reachable with multi-indices of ``order``.

  Args:
    omega: ``(dim, m)`` integer first layer (multiples of ``2 pi / period``).
    order: truncation order.
    period: the network period.
    norm: ``"l1"`` or ``"linf"``.

  Returns:
    ``(U, dim)`` int64 array of distinct integer frequency vectors (both signs), sorted.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.generated_frequencies(jnp.pi * jnp.array([[1.0]]), order=2).ravel().tolist()
    [-2, -1, 0, 1, 2]
  """
  kw = siren.frequencies_as_integers(omega, period=period)  # (dim, m)
  k = multi_indices(kw.shape[1], order, norm=norm)
  return np.unique(k @ kw.T, axis=0)


class SubPeriod(NamedTuple):
  """Result of :func:`detect_sub_period`.

  Attributes:
    has_sub_period: ``True`` if the network can repeat with a shift smaller than its period.
    index: ``[Z^dim : L]`` for the lattice ``L`` spanned by the integer frequencies: the number of distinct
      shifts (including 0) in one period cell that leave every generated harmonic unchanged; ``None``
      when the frequencies do not span ``R^dim`` (the network is then constant along a direction).
    rank: rank of the integer frequency matrix.
    shifts: generators of the group of invariant shifts, in units of the period, each coordinate in
      ``[0, 1)``; empty when ``index`` is 1 or ``None``.
    axis_periods: the smallest period along each axis (``period / gcd`` of that coordinate of every
      frequency; 0.0 when the network is constant along that axis).
  """

  has_sub_period: bool
  index: Optional[int]  # type: ignore[assignment]  # the field shadows tuple.index, as the paper's name
  rank: int
  shifts: tuple[tuple[float, ...], ...]
  axis_periods: tuple[float, ...]


def _integer_row_echelon(vectors: np.ndarray) -> list[list[int]]:
  """Row echelon (Hermite-like) basis of the integer lattice spanned by the rows of ``vectors``."""
  rows = [[int(v) for v in row] for row in vectors if any(int(v) for v in row)]
  dim = vectors.shape[1]
  basis: list[list[int]] = []
  for c in range(dim):
    while True:
      nz = [r for r in rows if r[c] != 0]
      if not nz:
        break
      pivot = min(nz, key=lambda r: abs(r[c]))
      rest = []
      for r in rows:
        if r is pivot:
          continue
        if r[c] != 0:
          q = r[c] // pivot[c]
          r = [ri - q * pi for ri, pi in zip(r, pivot)]
        if any(r):
          rest.append(r)
      if all(r[c] == 0 for r in rest):
        basis.append(pivot if pivot[c] > 0 else [-v for v in pivot])
        rows = rest
        break
      rows = rest + [pivot]
  return basis


def _invert_fraction_matrix(b: list[list[int]]) -> list[list[fractions.Fraction]]:
  n = len(b)
  aug = [[fractions.Fraction(v) for v in row] + [fractions.Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(b)]
  for c in range(n):
    p = next(r for r in range(c, n) if aug[r][c] != 0)
    aug[c], aug[p] = aug[p], aug[c]
    pivot = aug[c][c]
    aug[c] = [v / pivot for v in aug[c]]
    for r in range(n):
      if r != c and aug[r][c] != 0:
        f = aug[r][c]
        aug[r] = [vr - f * vc for vr, vc in zip(aug[r], aug[c])]
  return [row[n:] for row in aug]


def detect_sub_period(omega: Any, *, period: float = 2.0) -> SubPeriod:
  """Flags input frequencies that make a periodic network repeat with a smaller period (sec. 5.3).

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 5.3 and Fig. 7-8: the network has the sub-period shift ``t``
    (in units of ``p``) when ``<k, t> in Z`` for every input integer frequency ``k``, e.g. all-odd
    frequencies (shift ``(1/2, 1/2)``, a diagonal repetition), all-even ones (``p / 2`` on each axis) or
    ``{(k, l) : k, l in {1, 10, 100}}`` (all congruent mod 9).

  The invariant shifts form the dual of the lattice ``L`` spanned by the integer frequencies; there is no
  sub-period exactly when ``L = Z^dim``. Adding one frequency outside ``L`` removes the problem.

  Args:
    omega: ``(dim, m)`` integer first layer (multiples of ``2 pi / period``).
    period: the network period.

  Returns:
    :class:`SubPeriod`.

  Raises:
    ValueError: if ``omega`` is not integer (see :func:`spectral_peft.frequencies_as_integers`).

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> odd = sp.symmetric_frequencies((1, 3, 5))
    >>> r = sp.detect_sub_period(odd)
    >>> r.has_sub_period, r.index, r.shifts
    (True, 2, ((0.5, 0.5),))
  """
  k = siren.frequencies_as_integers(omega, period=period)  # (dim, m)
  dim = k.shape[0]
  basis = _integer_row_echelon(k.T)
  rank = len(basis)
  gcds = [math.gcd(*[int(v) for v in k[d]]) if k.shape[1] else 0 for d in range(dim)]
  axis_periods = tuple(float(period / g) if g else 0.0 for g in gcds)
  if rank < dim:
    return SubPeriod(True, None, rank, (), axis_periods)
  index = abs(math.prod(basis[i][i] for i in range(dim)))
  shifts: list[tuple[float, ...]] = []
  if index > 1:
    inverse = _invert_fraction_matrix(basis)  # Columns generate the dual lattice.
    for j in range(dim):
      col = tuple(inverse[i][j] % 1 for i in range(dim))
      if any(col):
        shifts.append(tuple(float(v) for v in col))
  return SubPeriod(index > 1, index, rank, tuple(shifts), axis_periods)
