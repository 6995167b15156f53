"""Earlier names of the Linen adapter runtime (:mod:`spectral_peft.peft._runtime.linen`).

``apply_factored(model, params, adapters, ...)`` is :func:`sp.peft.apply_adapters`, and
``factored(adapters)`` is the context form that finds adapters by their weight paths. Both apply
every adapter inside its own layer (factored where the method allows, the per-layer merged weight
rebuilt in the backward pass otherwise) and raise for an adapter that was not used.
"""

from __future__ import annotations

from spectral_peft.peft._runtime.linen import adapted as factored
from spectral_peft.peft._runtime.linen import apply_adapters as apply_factored

__all__ = ("apply_factored", "factored")
