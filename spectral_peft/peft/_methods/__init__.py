"""The adapter methods: one immutable spec per method and what they share.

``base`` (the :class:`AdapterMethod` protocol and the :class:`Adapter` record), ``lowrank`` (LoRA,
DoRA, sine LoRA, sine DoRA), ``spectral`` (SHiRA, WaveFT, FourierFT, LFMA), ``positions`` (PEFT's
position draw, reproduced exactly) and ``combination`` (weighted sums of adapters). Nothing here
knows about Flax; each module is imported by name, so this package imports nothing itself.
"""
