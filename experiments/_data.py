"""Data for the experiments: only what ships in an installed package or what the code generates."""

from __future__ import annotations

import numpy as np


def camera(resolution: int = 256) -> np.ndarray:
  """scikit-image's cameraman (ships with the package), as float32 in [0, 1] at ``resolution``^2."""
  from skimage import data, transform

  image = data.camera().astype(np.float32) / 255.0
  if image.shape != (resolution, resolution):
    image = transform.resize(image, (resolution, resolution), anti_aliasing=True).astype(np.float32)
  return image


def image_grid(resolution: int) -> np.ndarray:
  """(resolution^2, 2) pixel-centre coordinates in [-1, 1]^2, row-major like ``image.ravel()``."""
  t = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
  return np.stack(np.meshgrid(t, t, indexing="ij"), axis=-1).reshape(-1, 2)


def psnr(prediction, target) -> float:
  """PSNR in dB for images in [0, 1]."""
  mse = float(np.mean(np.square(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))))
  return float(10.0 * np.log10(1.0 / max(mse, 1e-20)))


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
