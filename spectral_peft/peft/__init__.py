"""Adapters over parameter pytrees: method specs and the generic functions that apply them.

Typical use::

  import optax, spectral_peft as sp
  adapters = sp.peft.init_adapters(key, params, sp.peft.SineLoRA(rank=4, omega=200.0),
                                   targets=r"(query|value)/kernel$")
  tx = optax.adam(1e-3)
  opt_state = tx.init(adapters)
  grads = jax.grad(lambda ad: loss(sp.peft.merge(params, ad), batch))(adapters)

Layout: ``_methods/`` (one spec per method, PEFT's position draw, weighted sums, banks of adapters for
mixed-adapter batches), ``_tree`` and
``_modules`` (method-free functions over parameter pytrees), ``_quant`` (quantized base weights), ``_named``
(named adapters), ``_runtime/`` (adapters applied inside
the model's call: a Flax-free core and one provider per Flax API), ``_formats/`` (our checkpoint and
PEFT's directory) and ``_sharding``. Imports only go down that list, never back.
"""

from typing import TYPE_CHECKING

from spectral_peft._lazy import lazy_names as _lazy_names
from spectral_peft.peft._formats.checkpoint import load_adapters
from spectral_peft.peft._formats.checkpoint import save_adapters
from spectral_peft.peft._formats.peft_files import export_peft
from spectral_peft.peft._formats.peft_files import from_peft_config
from spectral_peft.peft._formats.peft_files import import_peft
from spectral_peft.peft._methods.bank import AdapterBank
from spectral_peft.peft._methods.bank import stack_adapters
from spectral_peft.peft._methods.bank import unstack_adapters
from spectral_peft.peft._methods.base import Adapter
from spectral_peft.peft._methods.base import AdapterMethod
from spectral_peft.peft._methods.base import method_from_config
from spectral_peft.peft._methods.base import method_registry
from spectral_peft.peft._methods.combination import WeightedSum
from spectral_peft.peft._methods.combination import concatenate_lora
from spectral_peft.peft._methods.combination import weighted_combination
from spectral_peft.peft._methods.lowrank import DoRA
from spectral_peft.peft._methods.lowrank import LoRA
from spectral_peft.peft._methods.lowrank import SineDoRA
from spectral_peft.peft._methods.lowrank import SineLoRA
from spectral_peft.peft._methods.spectral import FourierFT
from spectral_peft.peft._methods.spectral import LFMA
from spectral_peft.peft._methods.spectral import SHiRA
from spectral_peft.peft._methods.spectral import WaveFT
from spectral_peft.peft._methods.spectral import init_lfma_adapters
from spectral_peft.peft._methods.spectral import lfma_gradient_init
from spectral_peft.peft._methods.spectral import proportional_allocation
from spectral_peft.peft._modules import TrainableSummary
from spectral_peft.peft._named import NamedAdapters
from spectral_peft.peft._quant import QuantizedArray
from spectral_peft.peft._quant import dequantize
from spectral_peft.peft._quant import quantize
from spectral_peft.peft._modules import merge_modules
from spectral_peft.peft._modules import modules_to_save
from spectral_peft.peft._modules import trainable_summary
from spectral_peft.peft._sharding import adapter_partition_specs
from spectral_peft.peft._sharding import adapter_shardings
from spectral_peft.peft._sharding import data_model_mesh
from spectral_peft.peft._sharding import path_shardings
from spectral_peft.peft._sharding import shard_adapters
from spectral_peft.peft._tree import combine
from spectral_peft.peft._tree import count_parameters
from spectral_peft.peft._tree import delta_tree
from spectral_peft.peft._tree import init_adapters
from spectral_peft.peft._tree import leaf_paths
from spectral_peft.peft._tree import masked_optimizer
from spectral_peft.peft._tree import merge
from spectral_peft.peft._tree import merge_quantized
from spectral_peft.peft._tree import partition
from spectral_peft.peft._tree import path_key
from spectral_peft.peft._tree import select_paths
from spectral_peft.peft._tree import switch_adapters
from spectral_peft.peft._tree import trainable_mask
from spectral_peft.peft._tree import unmerge

# Lazy names (PEP 562): served on first access because their modules import Flax, optax or orbax
# (here ``flax.linen``); everything imported above is pure JAX. To add a name whose module is heavy:
# an entry here (name -> module) and the same import in the ``TYPE_CHECKING`` block.
_LAZY: dict[str, str] = {
    "apply_adapters": "spectral_peft.peft._runtime.linen",
    "apply_factored": "spectral_peft.peft._runtime.aliases",
    "factored": "spectral_peft.peft._runtime.aliases",
}

if TYPE_CHECKING:
  from spectral_peft.peft._runtime.linen import apply_adapters
  from spectral_peft.peft._runtime.aliases import apply_factored
  from spectral_peft.peft._runtime.aliases import factored


__getattr__, __dir__ = _lazy_names(__name__, _LAZY, globals())


__all__ = (
    "Adapter",
    "AdapterBank",
    "AdapterMethod",
    "DoRA",
    "FourierFT",
    "LFMA",
    "LoRA",
    "NamedAdapters",
    "QuantizedArray",
    "SHiRA",
    "SineDoRA",
    "SineLoRA",
    "TrainableSummary",
    "WaveFT",
    "WeightedSum",
    "adapter_partition_specs",
    "adapter_shardings",
    "apply_adapters",
    "apply_factored",
    "combine",
    "concatenate_lora",
    "count_parameters",
    "data_model_mesh",
    "delta_tree",
    "dequantize",
    "export_peft",
    "factored",
    "from_peft_config",
    "import_peft",
    "init_adapters",
    "init_lfma_adapters",
    "leaf_paths",
    "lfma_gradient_init",
    "load_adapters",
    "masked_optimizer",
    "merge",
    "merge_modules",
    "merge_quantized",
    "method_from_config",
    "method_registry",
    "modules_to_save",
    "partition",
    "path_key",
    "path_shardings",
    "proportional_allocation",
    "quantize",
    "save_adapters",
    "select_paths",
    "shard_adapters",
    "stack_adapters",
    "switch_adapters",
    "trainable_summary",
    "trainable_mask",
    "unmerge",
    "unstack_adapters",
    "weighted_combination",
)
