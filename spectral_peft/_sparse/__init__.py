"""Sparse spectral updates (WaveFT, SHiRA, FourierFT, LFMA): coefficient syntheses and sparse theory.

References:
  "Exploring sparsity for PEFT using wavelets for vision" (WaveFT; SHiRA and FourierFT as its
  baselines) and "LFMA: Layerwise Fourier Masked Adapter with top-k frequency selection".
  :mod:`.wavelets` holds the periodised 2-D wavelet transforms, :mod:`.deltas` the sparse
  coefficient matrices and their wavelet / Fourier syntheses (dense and factored), :mod:`.theory`
  the rank and gradient-coverage tools (Lemma 1, Prop. 1) and :mod:`.interpolation` the exact
  sparse least squares behind Lemma 3.
"""
