"""The hidden matrix ``A`` of a periodic SIREN and its groups: the vocabulary of the training controls.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024), Def. 3.3 and 3.4 (groups of ``A``).

Layout (see :mod:`spectral_peft._sinusoidal.siren`): the hidden matrix is ``A = params["hidden"][0]["kernel"]``
of shape ``(m, n)`` (the transpose of the paper's ``n x m``). A *frequency group* is a row ``A[i, :]``
(the paper's column ``A^(i)``, tied to the input frequency ``omega[:, i]``); a *neuron group* is a
column ``A[:, j]`` (the paper's row ``A_j``, tied to hidden neuron ``j``). Functions that act on groups
take ``groups="frequencies"`` or ``groups="neurons"``.
"""

from __future__ import annotations

from typing import Any

import jax

from spectral_peft._sinusoidal import siren

Array = jax.Array
Params = dict[str, Any]
GROUPS = ("frequencies", "neurons")


def check_groups(groups: Any) -> str:
  """``groups`` after checking that it is ``"frequencies"`` or ``"neurons"``."""
  if groups not in GROUPS:
    raise ValueError(f"`groups` must be one of {GROUPS}, got {groups!r}.")
  return groups


def matrix(params: Params) -> Array:
  """The hidden matrix ``A: (m, n)`` of a periodic SIREN dict (the dict is checked first)."""
  siren._check_params(params)
  return params["hidden"][0]["kernel"]


def with_matrix(params: Params, a: Array) -> Params:
  """A new dict equal to ``params`` but with the hidden matrix ``a``."""
  hidden = list(params["hidden"])
  hidden[0] = {**hidden[0], "kernel": a}
  return {**params, "hidden": tuple(hidden)}
