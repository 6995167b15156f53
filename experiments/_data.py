"""Data for the experiments: only what ships in an installed package or what the code generates."""

from __future__ import annotations

import numpy as np


def mnist1d(seed: int = 0, num_samples: int = 5000) -> dict[str, np.ndarray]:
  """MNIST-1D generated locally with the `mnist1d` package's generator (never its download).

  Returns a dict with ``x`` (n_train, 40) float32, ``y`` (n_train,) int32, ``x_test``, ``y_test``.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.seed = seed
  args.num_samples = num_samples
  data = make_dataset(args)
  return {k: np.asarray(data[k], np.float32 if k.startswith("x") else np.int32)
          for k in ("x", "y", "x_test", "y_test")}
