"""The adapter runtime: each adapted layer computes its own product inside the model's call.

``core`` holds what does not depend on a Flax API (the per-layer adapter, the rebuilt product with
its rematerialised backward pass); ``linen`` and ``nnx`` are the providers that find the layers of
each API; ``aliases`` keeps earlier names. Each module is imported by name (``linen`` and ``nnx``
import Flax), so this package imports nothing itself.
"""
