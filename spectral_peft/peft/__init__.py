"""Adapters over parameter pytrees: method specs and the generic functions that apply them.

Typical use::

  import optax, spectral_peft as sp
  adapters = sp.peft.init_adapters(key, params, sp.peft.SineLoRA(rank=4, omega=200.0),
                                   targets=r"(query|value)/kernel$")
  tx = optax.adam(1e-3)
  opt_state = tx.init(adapters)
  grads = jax.grad(lambda ad: loss(sp.peft.merge(params, ad), batch))(adapters)
"""

from spectral_peft.peft._checkpoint import load_adapters
from spectral_peft.peft._checkpoint import save_adapters
from spectral_peft.peft._combination import WeightedSum
from spectral_peft.peft._combination import weighted_combination
from spectral_peft.peft._intercept import apply_factored
from spectral_peft.peft._intercept import factored
from spectral_peft.peft._lowrank_methods import DoRA
from spectral_peft.peft._lowrank_methods import LoRA
from spectral_peft.peft._lowrank_methods import SineDoRA
from spectral_peft.peft._lowrank_methods import SineLoRA
from spectral_peft.peft._method import Adapter
from spectral_peft.peft._method import AdapterMethod
from spectral_peft.peft._method import method_from_config
from spectral_peft.peft._method import method_registry
from spectral_peft.peft._tree import combine
from spectral_peft.peft._tree import count_parameters
from spectral_peft.peft._tree import delta_tree
from spectral_peft.peft._tree import init_adapters
from spectral_peft.peft._tree import leaf_paths
from spectral_peft.peft._tree import masked_optimizer
from spectral_peft.peft._tree import merge
from spectral_peft.peft._tree import partition
from spectral_peft.peft._tree import path_key
from spectral_peft.peft._tree import select_paths
from spectral_peft.peft._tree import switch_adapters
from spectral_peft.peft._tree import trainable_mask
from spectral_peft.peft._tree import unmerge

__all__ = (
    "Adapter",
    "AdapterMethod",
    "DoRA",
    "LoRA",
    "SineDoRA",
    "SineLoRA",
    "WeightedSum",
    "apply_factored",
    "combine",
    "count_parameters",
    "delta_tree",
    "factored",
    "init_adapters",
    "leaf_paths",
    "load_adapters",
    "masked_optimizer",
    "merge",
    "method_from_config",
    "method_registry",
    "partition",
    "path_key",
    "save_adapters",
    "select_paths",
    "switch_adapters",
    "trainable_mask",
    "unmerge",
    "weighted_combination",
)
