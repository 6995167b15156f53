"""Adapter methods checked by the shared adapter test matrix (tests/test_adapter_matrix.py).

Every method spec added to ``sp.peft`` gets a case here; ``scale`` is the size of the random
perturbation that makes a freshly initialised adapter non-trivial. ``StringEinsum`` is the einsum
layer of Tunix and Gemma, shared by the tests of einsum layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spectral_peft as sp


class StringEinsum(nnx.Module):
  """Tunix's / Gemma's ``Einsum`` style: a string ``einsum_str`` and one weight ``w``."""

  def __init__(self, einsum_str, shape, rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[0]))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  method: sp.peft.AdapterMethod
  scale: float = 0.1


CASES = [
    Case("lora", sp.peft.LoRA(rank=2, alpha=4.0)),
    Case("dora", sp.peft.DoRA(rank=2, alpha=4.0)),
    Case("sine_lora", sp.peft.SineLoRA(rank=2, omega=50.0, alpha=4.0), scale=0.05),
    Case("sine_dora", sp.peft.SineDoRA(rank=2, omega=50.0, alpha=4.0), scale=0.05),
    Case("dora_exact_grad", sp.peft.DoRA(rank=1, stop_norm_gradient=False)),
    Case("waveft", sp.peft.WaveFT(n_params=20, scale=2.0, wavelet="db2", level=1)),
    Case("shira", sp.peft.SHiRA(n_params=20, scale=2.0)),
    Case("fourierft", sp.peft.FourierFT(n_frequency=20, scale=30.0)),
    Case("lfma", sp.peft.LFMA(top_k_ratio=0.1, alpha=30.0, value_init="zeros")),
]
