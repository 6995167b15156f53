"""Low-rank separated neural networks (LRNNs): product-structured activations and the Poisson benchmark.

References:
  "Deep learning with learnable product-structured activations" (LRNNs). :mod:`.lrnn` holds the
  component MLPs, the product activation, layers and deep networks (eq. 1-5), :mod:`.pde` the
  forward-mode Laplacian and the 2-D Poisson problem of App. G.
"""
