"""Forward-mode Laplacians and the 2-D Poisson benchmark of the LRNN paper (App. G).

References:
  "Deep learning with learnable product-structured activations" (LRNNs), App. G and Table 11;
  the benchmark comes from Liu et al. (2025), "KAN: Kolmogorov-Arnold Networks".

The Poisson problem ``u_xx + u_yy = f`` on ``[-1, 1]^2`` with ``u = 0`` on the boundary. We use
the frequency-``n`` family

  ``u_n(x, y) = sin(n pi x) sin(n pi y^2)``,
  ``f_n(x, y) = -n^2 pi^2 (1 + 4 y^2) sin(n pi x) sin(n pi y^2) + 2 n pi sin(n pi x) cos(n pi y^2)``,

which is App. G's exact solution and source term at ``n = 1`` (and satisfies the zero boundary
condition for every integer ``n``: ``sin(+-n pi) = 0`` and ``y^2 = 1`` on ``y = +-1``).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spectral_peft import _validation

Array = jax.Array
PointFunction = Callable[[Array], Array]


def _values(fn: PointFunction, x: Array) -> Array:
  y = fn(x)
  if y.shape == x.shape[:-1] + (1,):
    y = y[..., 0]
  if y.shape != x.shape[:-1]:
    raise ValueError(
        f"`fn` must map points (..., n) = {tuple(x.shape)} to scalars (...,) or (..., 1), got shape {tuple(y.shape)}."
    )
  return y


def laplacian(fn: PointFunction, x: Array) -> Array:
  """Laplacian ``sum_i d^2 fn / dx_i^2`` of a scalar field by forward-mode AD (jvp of jvp).

  References:
    LRNN paper, App. G: forward-mode AD keeps the memory of the Laplacian of an LRNN small.

  For every coordinate ``i`` the second directional derivative along ``e_i`` is one
  ``jvp(jvp(fn))`` of the batched function with the tangent ``e_i`` in every row; the ``n`` of them
  are traced one after another and summed (XLA merges their common primal computation; a ``vmap``
  over the directions instead puts a reduction over the direction axis into every step of a
  gradient of the result, several times slower on CPU). No Hessian is formed and no reverse pass
  is stored.

  Args:
    fn: maps points ``(..., n)`` to values ``(...,)`` or ``(..., 1)``; each row's value must
      depend only on that row (true of pointwise networks such as :func:`lrnn_apply`).
    x: ``(..., n)`` points, floating.

  Returns:
    ``(...,)`` Laplacian at every point, dtype of ``fn``'s output.

  Raises:
    ValueError: if ``x`` has no coordinate axis or ``fn`` does not return one value per point.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.laplacian(lambda p: jnp.sum(p**2, -1), jnp.ones((4, 3)))
    Array([6., 6., 6., 6.], dtype=float32)
  """
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] < 1:
    raise ValueError(f"`x` must have shape (..., n) with n >= 1, got {shape}.")
  _validation.check_floating("x", x)
  n = shape[-1]
  scalar_fn = lambda p: _values(fn, p)  # noqa: E731

  def second_derivative(i: int) -> Array:
    tangent = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype)[i], x.shape)
    first = lambda p: jax.jvp(scalar_fn, (p,), (tangent,))[1]  # noqa: E731
    return jax.jvp(first, (x,), (tangent,))[1]

  return functools.reduce(operator.add, [second_derivative(i) for i in range(n)])


def _check_points(xy: Any) -> None:
  shape = getattr(xy, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] != 2:
    raise ValueError(f"`xy` must have shape (..., 2), got {shape}.")


def poisson_exact_solution(xy: Array, *, frequency: int = 1) -> Array:
  """``u_n(x, y) = sin(n pi x) sin(n pi y^2)`` (App. G at ``n = 1``).

  Args:
    xy: ``(..., 2)`` points in ``[-1, 1]^2``.
    frequency: the integer ``n >= 1``.

  Returns:
    ``(...,)`` values.
  """
  _check_points(xy)
  n = _validation.check_positive_int("frequency", frequency)
  x, y = xy[..., 0], xy[..., 1]
  return jnp.sin(n * jnp.pi * x) * jnp.sin(n * jnp.pi * y**2)


def poisson_source(xy: Array, *, frequency: int = 1) -> Array:
  """Source ``f_n = -n^2 pi^2 (1 + 4y^2) sin(n pi x) sin(n pi y^2) + 2 n pi sin(n pi x) cos(n pi y^2)``.

  This is ``Laplacian(u_n)`` (App. G's ``f`` at ``n = 1``).

  Args:
    xy: ``(..., 2)`` points; ``frequency``: the integer ``n >= 1``.

  Returns:
    ``(...,)`` values.
  """
  _check_points(xy)
  n = _validation.check_positive_int("frequency", frequency)
  x, y = xy[..., 0], xy[..., 1]
  k = n * jnp.pi
  sx = jnp.sin(k * x)
  return -(k**2) * (1.0 + 4.0 * y**2) * sx * jnp.sin(k * y**2) + 2.0 * k * sx * jnp.cos(k * y**2)


def poisson_grid(size: int = 41, *, dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """The ``size x size`` uniform collocation grid on ``[-1, 1]^2``, split into interior and boundary.

  Args:
    size: points per side (App. G: 41).
    dtype: floating dtype of the points.

  Returns:
    ``(interior, boundary)``: ``((size-2)^2, 2)`` and ``(4 (size-1), 2)`` points.

  Raises:
    ValueError: if ``size < 3``.
  """
  size = _validation.check_positive_int("size", size)
  if size < 3:
    raise ValueError(f"`size` must be at least 3 (one interior point), got {size}.")
  t = jnp.linspace(-1.0, 1.0, size, dtype=dtype)
  xx, yy = jnp.meshgrid(t, t, indexing="ij")
  points = jnp.stack([xx.ravel(), yy.ravel()], axis=-1)
  edge = ((xx == -1) | (xx == 1) | (yy == -1) | (yy == 1)).ravel()
  return points[~edge], points[edge]


def poisson_residual(fn: PointFunction, xy: Array, *, frequency: int = 1) -> Array:
  """PDE residual ``Laplacian(fn)(xy) - f_n(xy)`` at interior points, by forward-mode AD.

  Args:
    fn: the network, points ``(..., 2)`` to values ``(...,)`` or ``(..., 1)``.
    xy: ``(..., 2)`` interior points; ``frequency``: ``n``.

  Returns:
    ``(...,)`` residuals.
  """
  _check_points(xy)
  return laplacian(fn, xy) - poisson_source(xy, frequency=frequency)


def poisson_loss(
    fn: PointFunction,
    interior: Array,
    boundary: Array,
    *,
    frequency: int = 1,
    alpha: float = 0.01,
) -> tuple[Array, dict[str, Array]]:
  """App. G's loss ``alpha * L_int + L_bdry``.

  ``L_int = mean |u_xx + u_yy - f|^2`` over the interior points and ``L_bdry = mean u^2`` over the
  boundary points (zero Dirichlet data); ``alpha = 0.01`` following Liu et al. (2025).

  Args:
    fn: the network, points ``(..., 2)`` to values ``(...,)`` or ``(..., 1)``.
    interior: ``(N_i, 2)`` interior collocation points.
    boundary: ``(N_b, 2)`` boundary points.
    frequency: ``n`` of the problem family.
    alpha: weight of the interior residual.

  Returns:
    ``(loss, {"interior": L_int, "boundary": L_bdry})``, scalars.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> interior, boundary = sp.poisson_grid(11)
    >>> exact = lambda p: sp.poisson_exact_solution(p, frequency=2)
    >>> loss, parts = sp.poisson_loss(exact, interior, boundary, frequency=2)
    >>> bool(loss < 1e-6)
    True
  """
  _check_points(interior)
  _check_points(boundary)
  alpha = _validation.check_positive_float("alpha", alpha)
  interior_loss = jnp.mean(jnp.square(poisson_residual(fn, interior, frequency=frequency)))
  boundary_loss = jnp.mean(jnp.square(_values(fn, boundary)))
  return alpha * interior_loss + boundary_loss, {"interior": interior_loss, "boundary": boundary_loss}


def relative_l2_error(prediction: Array, target: Array) -> Array:
  """``||prediction - target||_2 / ||target||_2`` over all entries (the l2 error we report).

  Args:
    prediction, target: arrays of the same shape.

  Returns:
    A scalar.
  """
  if tuple(prediction.shape) != tuple(target.shape):
    raise ValueError(f"`prediction` and `target` must have the same shape, got {tuple(prediction.shape)} and {tuple(target.shape)}.")
  return jnp.linalg.norm((prediction - target).ravel()) / jnp.linalg.norm(target.ravel())
