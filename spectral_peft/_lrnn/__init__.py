"""Low-rank separated neural networks (LRNNs): product-structured activations and the Poisson benchmark.

References:
  "Deep learning with learnable product-structured activations" (LRNNs). :mod:`.neurons` holds the
  component MLPs and the product activation (eq. 1, 4, 5, Lemma 1), :mod:`.network` the layers, deep
  networks and interaction heatmaps (eq. 3-4, App. A.2), :mod:`.pde` the forward-mode Laplacian and
  the 2-D Poisson problem of App. G.
"""
