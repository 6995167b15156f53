"""Structured pruning: selecting groups, masking them, a real shrink and the pruning loop.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): Def. 3.4 (structured pruning), sec. 3.2.2 (the criterion), sec. 7.1 and 7.2.4 (the loop).

Layout and groups as in :mod:`spectral_peft._sinusoidal.hidden`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sinusoidal import fitting
from spectral_peft._sinusoidal import hidden
from spectral_peft._sinusoidal import weight_decay

if TYPE_CHECKING:
  import optax  # Imported where used: `import spectral_peft` stays free of optax's start-up cost.

Array = jax.Array
Params = dict[str, Any]


def pruning_selection(
    a: Array, threshold: float, groups: str = "frequencies", *, max_groups: Optional[int] = None
) -> np.ndarray:
  """The largest set of groups holding less than a fraction ``T_p`` of ``A``'s total L1 (sec. 7.1, step 2).

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 3.2.2 (the pruning criterion: the least-informative
    rows/columns "such that their added information constitutes less or equal to P% of the total
    information") and sec. 7.1 (``T_p in [0, 1]``, the greatest ``I`` with
    ``sum_{i in I} ||A^i||_1 < T_p``). The largest such set takes the groups in increasing order of norm.

  ``threshold`` is a fraction of the total ``||A||_1``, as in the paper. (Before 0.2 it was an
  absolute L1 budget; values outside ``[0, 1]`` now raise.)

  Args:
    a: ``(m, n)`` hidden matrix.
    threshold: ``T_p`` in ``[0, 1]``: the selection's summed L1 norm stays below ``T_p * ||A||_1``.
      ``1`` selects every group but the largest (and every group only if ``max_groups`` caps first).
    groups: ``"frequencies"`` (the paper's columns) or ``"neurons"`` (rows).
    max_groups: optional cap on the size of the set (the smallest-norm groups are kept first).

  Returns:
    Host boolean mask ``(m,)`` or ``(n,)``, ``True`` for the selected (to be pruned) groups.

  Raises:
    ValueError: on a threshold outside ``[0, 1]`` or a negative ``max_groups``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> a = jnp.array([[0.1, 0.0], [3.0, 1.0], [0.2, 0.2], [0.5, 0.0]])
    >>> sp.pruning_selection(a, 0.2).tolist()  # norms 0.1, 4, 0.4, 0.5 (total 5): 0.1 + 0.4 < 1, + 0.5 is not
    [True, False, True, False]
  """
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"`threshold` (T_p) must be a fraction of the total L1 norm in [0, 1], got {threshold}.")
  norms = np.asarray(weight_decay.group_l1_norms(a, groups), np.float64)
  order = np.argsort(norms, kind="stable")
  cumulative = np.cumsum(norms[order])
  count = int(np.sum(cumulative < threshold * norms.sum()))
  if max_groups is not None:
    if isinstance(max_groups, bool) or int(max_groups) != max_groups or max_groups < 0:
      raise ValueError(f"`max_groups` must be a non-negative int or None, got {max_groups!r}.")
    count = min(count, int(max_groups))
  mask = np.zeros(norms.shape, bool)
  mask[order[:count]] = True
  return mask


def prune_params(params: Params, pruned: Any, groups: str = "frequencies") -> Params:
  """Structured pruning (Def. 3.4): zeros the selected groups of ``A`` (the *masked* network).

  Args:
    params: a periodic SIREN dict.
    pruned: boolean mask over the groups, ``True`` = zero it.
    groups: ``"frequencies"`` or ``"neurons"``.

  Returns:
    ``params`` with the pruned rows/columns of ``A`` set to zero; shapes unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> float(abs(sp.prune_params(p, jnp.array([True, False, False, False]))["hidden"][0]["kernel"][0]).sum())
    0.0
  """
  a = hidden.matrix(params)
  groups = hidden.check_groups(groups)
  size = a.shape[0] if groups == "frequencies" else a.shape[1]
  if np.shape(pruned) != (size,):
    raise ValueError(f"`pruned` must be a boolean mask of shape ({size},) over the {groups}, got {np.shape(pruned)}.")
  keep = ~jnp.asarray(pruned, bool)
  keep = keep[:, None] if groups == "frequencies" else keep[None, :]
  return hidden.with_matrix(params, jnp.where(keep, a, jnp.zeros_like(a)))


def shrink_params(
    params: Params,
    *,
    keep_frequencies: Optional[Any] = None,
    keep_neurons: Optional[Any] = None,
    drop_zero_frequencies: bool = True,
) -> Params:
  """Removes pruned groups for real, so that parameter counts are real (sec. 3.2.2, Fig. 1).

  A removed frequency row drops ``A[i, :]``, ``omega[:, i]`` and ``phi[i]``; this is exact when the row
  was zero (pruned). A removed neuron column ``j`` drops ``A[:, j]``, ``b[j]`` and row ``j`` of the next
  kernel; if ``A[:, j]`` was zero the neuron was the constant ``sin(b_j)``, whose contribution
  ``sin(b_j) K_next[j, :]`` is folded into the next bias, so the shrunk network equals the masked one.

  Args:
    params: a periodic SIREN dict.
    keep_frequencies: boolean ``(m,)`` mask of frequency rows to keep (default: all).
    keep_neurons: boolean ``(n,)`` mask of first-layer neurons to keep (default: all).
    drop_zero_frequencies: also drop every frequency row of ``A`` that is exactly zero (an unused
      input frequency).

  Returns:
    A smaller parameter dict with the same structure.

  Raises:
    ValueError: on masks of the wrong shape, or masks that keep no frequency or no neuron.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> masked = sp.prune_params(p, jnp.array([True, False, True, False]))
    >>> small = sp.shrink_params(masked)
    >>> small["omega"].shape, small["hidden"][0]["kernel"].shape
    ((2, 2), (2, 3))
    >>> x = jnp.array([[0.1, 0.4]])
    >>> bool(jnp.allclose(sp.periodic_siren_apply(small, x), sp.periodic_siren_apply(masked, x), atol=1e-5))
    True
  """
  a = np.asarray(hidden.matrix(params))
  m, n = a.shape
  keep_f = np.ones(m, bool) if keep_frequencies is None else np.asarray(keep_frequencies, bool)
  keep_n = np.ones(n, bool) if keep_neurons is None else np.asarray(keep_neurons, bool)
  if keep_f.shape != (m,):
    raise ValueError(f"`keep_frequencies` must be a boolean mask of shape ({m},), got {keep_f.shape}.")
  if keep_n.shape != (n,):
    raise ValueError(f"`keep_neurons` must be a boolean mask of shape ({n},), got {keep_n.shape}.")
  if drop_zero_frequencies:
    keep_f = keep_f & np.any(a != 0, axis=1)
  if not keep_f.any() or not keep_n.any():
    raise ValueError(f"shrinking must keep at least one frequency and one neuron, got {keep_f.sum()} and {keep_n.sum()}.")
  fi, ni = np.flatnonzero(keep_f), np.flatnonzero(keep_n)
  layers = [dict(layer) for layer in params["hidden"]]
  first = layers[0]
  kernel_full = jnp.asarray(first["kernel"])
  dropped = np.flatnonzero(~keep_n)
  # Columns dropped from A: the neuron is sin(A[:, j] . H + b_j); exact fold only if A[:, j] == 0.
  constant = jnp.sin(first["bias"][dropped]) * jnp.all(kernel_full[:, dropped] == 0, axis=0)
  layers[0] = {"kernel": kernel_full[fi][:, ni], "bias": first["bias"][ni]}
  if len(layers) > 1:
    nxt = layers[1]
    layers[1] = {"kernel": nxt["kernel"][ni], "bias": nxt["bias"] + constant @ nxt["kernel"][dropped]}
    output = params["output"]
  else:
    out = params["output"]
    output = {"kernel": out["kernel"][ni], "bias": out["bias"] + constant @ out["kernel"][dropped]}
  return {
      **params,
      "omega": params["omega"][:, fi],
      "phi": params["phi"][fi],
      "hidden": tuple(layers),
      "output": output,
  }


class PruningRound(NamedTuple):
  """One round of the pruning loop.

  Attributes:
    selected: groups in ``I`` (step 2).
    pruned: groups removed (step 4: the selected ones whose norm fell below ``T_n``).
    remaining: groups left after the round.
    mse: full-data MSE after fine-tuning (step 5).
    targeted_steps: targeted-decay steps run (step 3 stops once the selection is near zero).
    decayed_fraction: ``max_{i in I} ||A^i||_1 / ||A^i||_1(selection)`` after step 3 (the largest norm
      left on a selected group, relative to its norm when selected; ``<= T_n`` means all were pruned).
    steps: all optimiser steps of the round (decay, targeted decay, fine-tuning).
  """

  selected: int
  pruned: int
  remaining: int
  mse: float
  targeted_steps: int = 0
  decayed_fraction: float = float("nan")
  steps: int = 0


def structured_pruning(
    params: Params,
    x: Array,
    y: Array,
    optimizer: optax.GradientTransformation,
    *,
    threshold: float,
    groups: str = "frequencies",
    decay_steps: int,
    targeted_steps: int,
    finetune_steps: int,
    prune_below: float = 0.05,
    alpha_scale: float = 1e-6,
    targeted_alpha: float = 1e-2,
    check_every: int = 25,
    max_groups_per_round: Optional[int] = None,
    target_pruned: Optional[int] = None,
    max_rounds: int = 100,
    bound: Any = None,
    batch_size: Optional[int] = None,
    key: Optional[Array] = None,
    progress: Optional[Callable[[Any], Any]] = None,
) -> tuple[Params, list[PruningRound]]:
  """The pruning loop of sec. 7.2.4 (targeted weight decay, then prune, then fine-tune), with a real shrink.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 3.2.2, 7.1 and 7.2.4: (1) train ``e_wd`` steps with
    ``(1 - alpha) MSE + alpha ||A||_1`` (alpha from :func:`alpha_schedule`); (2) select the largest set
    ``I`` of groups whose summed L1 norm is below a fraction ``T_p in [0, 1]`` of ``||A||_1``;
    (3) targeted weight decay ``(1 - alpha) MSE + alpha sum_{i in I} ||A^i||_1`` over ``I``; (4) prune the
    groups whose norm fell below ``T_n``; (5) fine-tune with the MSE ``e_rec`` steps; repeat until ``I`` is
    empty, nothing was pruned, ``max_rounds`` or ``target_pruned`` groups are reached.

  Step 3 runs until every selected group is near zero (its L1 norm below ``T_n`` times its norm when
  selected, checked every ``check_every`` steps) or ``targeted_steps`` steps have run, so pruning removes
  groups that carry almost nothing rather than cutting live ones. Step 4 is a real guard: a selected group
  the MSE keeps alive (its norm stays above ``T_n`` of where it started) is an essential one and is not
  pruned. Pruned groups are removed with :func:`shrink_params` (with ``groups="frequencies"``, the input
  frequencies go too), so the returned network is genuinely smaller. The optimizer restarts each phase.

  Changed semantics (0.2): ``threshold`` is the paper's fraction ``T_p`` (it was an absolute L1 budget),
  ``prune_below`` is ``T_n`` relative to each group's norm at selection (it was an absolute norm that
  defaulted to infinity, which pruned every selected group), and targeted decay stops early once the
  selection is near zero.

  Args:
    params: a trained periodic SIREN dict.
    x, y: training data, ``(N, dim)`` and ``(N, out)``.
    optimizer: the optax transformation used in every phase.
    threshold: ``T_p in [0, 1]``, the fraction of ``||A||_1`` a round may remove.
    groups: ``"frequencies"`` (the paper's columns) or ``"neurons"`` (rows).
    decay_steps: ``e_wd`` (0 skips step 1).
    targeted_steps: the most steps of targeted decay per round (``e_twd``).
    finetune_steps: ``e_rec``.
    prune_below: ``T_n`` in ``[0, 1]``: a selected group is pruned once its L1 norm is at most ``T_n``
      times its norm at selection. ``1`` prunes every selected group (an abrupt cut, no decay needed),
      ``0`` only groups decayed exactly to zero.
    alpha_scale: ``alpha_s`` of the weight decay phase.
    targeted_alpha: the constant ``alpha`` of the targeted decay phase, in ``[0, 1]``.
    check_every: how often step 3 checks whether the selection is near zero.
    max_groups_per_round: cap on ``|I|`` per round.
    target_pruned: stop once this many groups are removed in total (caps the last selection).
    max_rounds: at most this many rounds.
    bound: optional bounding applied throughout (scalar only, as the rows change).
    batch_size, key: minibatch training (see :func:`fit_periodic_siren`); the key is split per phase.
    progress: optional wrapper of each phase's step iterable.

  Returns:
    ``(shrunk_params, rounds)``; ``rounds[i].mse`` is the full-data MSE after round ``i``.

  Raises:
    ValueError: on bad ``groups``, a ``threshold`` or ``prune_below`` outside ``[0, 1]``, or a
      per-frequency (vector) ``bound``.

  Example:
    >>> import jax, optax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 8, 3), 10, 1)
    >>> x = jax.random.uniform(jax.random.key(2), (48, 2), minval=-1, maxval=1)
    >>> small, rounds = sp.structured_pruning(p, x, x[:, :1] ** 2, optax.adam(1e-2), threshold=0.3,
    ...     decay_steps=4, targeted_steps=40, finetune_steps=4, prune_below=1.0, max_rounds=1)
    >>> small["omega"].shape[1] == 8 - rounds[0].pruned
    True
  """
  groups = hidden.check_groups(groups)
  if bound is not None and np.shape(bound) != ():
    raise ValueError(f"`bound` must be a scalar here (groups are removed between rounds), got shape {np.shape(bound)}.")
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"`threshold` (T_p) must be a fraction of the total L1 norm in [0, 1], got {threshold}.")
  prune_below = float(prune_below)
  if not 0.0 <= prune_below <= 1.0:
    raise ValueError(f"`prune_below` (T_n, relative to each group's norm at selection) must lie in [0, 1], got {prune_below}.")
  max_rounds = _validation.check_positive_int("max_rounds", max_rounds)
  rounds: list[PruningRound] = []
  total = 0
  key = jax.random.key(0) if key is None else key
  fit_kw = dict(bound=bound, batch_size=batch_size, progress=progress)
  for _ in range(max_rounds):
    key, k_decay, k_targeted, k_finetune = jax.random.split(key, 4)
    steps = 0
    if decay_steps:
      params = fitting.fit_periodic_siren(
          params, x, y, optimizer, decay_steps,
          alpha=lambda t: weight_decay.alpha_schedule(t, decay_steps, scale=alpha_scale), key=k_decay, **fit_kw,
      ).params
      steps += decay_steps
    cap = max_groups_per_round
    if target_pruned is not None:
      cap = target_pruned - total if cap is None else min(cap, target_pruned - total)
    a = hidden.matrix(params)
    size = a.shape[0] if groups == "frequencies" else a.shape[1]
    cap = size - 1 if cap is None else min(cap, size - 1)
    selected = pruning_selection(a, threshold, groups, max_groups=cap)
    if not selected.any():
      break
    start_norms = np.asarray(weight_decay.group_l1_norms(a, groups), np.float64)
    scale = np.where(selected, np.maximum(start_norms, np.finfo(np.float32).tiny), 1.0)

    def relative_norms(p, scale=scale):
      return np.asarray(weight_decay.group_l1_norms(hidden.matrix(p), groups), np.float64) / scale

    def near_zero(p, selected=selected):
      return bool(np.all(relative_norms(p)[selected] <= prune_below))

    run = 0
    if targeted_steps and not near_zero(params):
      fit = fitting.fit_periodic_siren(
          params, x, y, optimizer, targeted_steps, targeted=selected, groups=groups, alpha=targeted_alpha,
          key=k_targeted, until=near_zero, check_every=check_every, **fit_kw,
      )
      params, run = fit.params, len(fit.losses)
    steps += run
    rel = relative_norms(params)
    pruned = selected & (rel <= prune_below)
    if pruned.any():
      params = prune_params(params, jnp.asarray(pruned), groups)
      if groups == "frequencies":
        params = shrink_params(params, keep_frequencies=~pruned, drop_zero_frequencies=False)
      else:
        params = shrink_params(params, keep_neurons=~pruned, drop_zero_frequencies=False)
    total += int(pruned.sum())
    fit = fitting.fit_periodic_siren(params, x, y, optimizer, finetune_steps, key=k_finetune, **fit_kw)
    params = fit.params
    steps += finetune_steps
    mse = float(fitting.mse_loss(params, x, y))
    a = hidden.matrix(params)
    rounds.append(PruningRound(int(selected.sum()), int(pruned.sum()), a.shape[0 if groups == "frequencies" else 1],
                               mse, run, float(np.max(rel[selected])), steps))
    if not pruned.any() or (target_pruned is not None and total >= target_pruned):
      break
  return params, rounds
