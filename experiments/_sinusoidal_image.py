"""Shared wiring for the paper-001 experiments: the cameraman image, its coordinate grid, PSNR, spectra."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import spectral_peft as sp


def camera(size: int) -> np.ndarray:
  """scikit-image's cameraman (ships with the package, no download), resized to ``size x size`` in [0, 1]."""
  from skimage import data, transform

  image = data.camera().astype(np.float64) / 255.0
  if image.shape[0] != size:
    image = transform.resize(image, (size, size), anti_aliasing=True)
  return image.astype(np.float32)


def grid(size: int) -> jax.Array:
  """Pixel coordinates ``-1 + 2 i / size`` on both axes: the image spans exactly one period 2."""
  g = jnp.arange(size, dtype=jnp.float32) * (2.0 / size) - 1.0
  return jnp.stack(jnp.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)


def targets(image: np.ndarray) -> jax.Array:
  """The image in [-1, 1], shape ``(size * size, 1)``."""
  return jnp.asarray(2.0 * image.reshape(-1, 1) - 1.0)


def task(size: int) -> tuple[np.ndarray, jax.Array, jax.Array]:
  """The fitting task at ``size``: the image (:func:`camera`), its coordinates (:func:`grid`) and targets (:func:`targets`)."""
  image = camera(size)
  return image, grid(size), targets(image)


def psnr_from_mse(mse) -> np.ndarray:
  """PSNR in dB for targets in [-1, 1] (peak-to-peak 2), i.e. the PSNR of the [0, 1] image."""
  return 10.0 * np.log10(4.0 / np.maximum(np.asarray(mse, np.float64), 1e-12))


def reconstruct(params, size: int, chunk: int = 16384) -> np.ndarray:
  x = grid(size)
  out = [np.asarray(sp.periodic_siren_apply(params, x[i:i + chunk])) for i in range(0, x.shape[0], chunk)]
  return ((np.concatenate(out)[:, 0] + 1.0) / 2.0).reshape(size, size)


def psnr(params, image: np.ndarray) -> float:
  rec = reconstruct(params, image.shape[0])
  return float(10.0 * np.log10(1.0 / np.mean((rec - image) ** 2)))


def spectrum(image: np.ndarray) -> np.ndarray:
  """Centred log-magnitude spectrum ``log10(1 + |FFT|)``."""
  return np.log10(1.0 + np.abs(np.fft.fftshift(np.fft.fft2(image - image.mean()))))


def energy_beyond(image: np.ndarray, radius: int) -> float:
  """Fraction of the (mean-removed) spectral energy at integer frequencies with ``max(|kx|, |ky|) > radius``."""
  power = np.abs(np.fft.fft2(image - image.mean())) ** 2
  k = np.fft.fftfreq(image.shape[0], d=1.0 / image.shape[0])
  level = np.maximum(np.abs(k)[:, None], np.abs(k)[None, :])
  return float(power[level > radius].sum() / power.sum())
