"""Sinusoidal networks in practice: the periodic SIREN, its frequency analysis and training controls.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024). :mod:`.siren` holds the network (integer frequencies, init, apply),
  :mod:`.frequency_analysis` the Bessel expansion and sub-periods (Thm. 1, 2, sec. 5.3) and
  :mod:`.training` the training controls (bounding, decay, pruning, growing).
"""
