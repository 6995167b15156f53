"""Sine-activated low rank: low-rank and sine low-rank matrices, their products, rank diagnostics.

References:
  Ji, Saratchandran, Gordon, Zhang, Lucey. "Efficient Learning with Sine-Activated Low-Rank
  Matrices" (eq. 3, Prop. 1, Theorem 1, App. A). :mod:`.matrices` holds the matrices and the
  memory-lean product, :mod:`.diagnostics` the stable rank, spectra and the Prop. 1 bound.
"""
