"""Sinusoidal networks in practice: the periodic SIREN, its frequency analysis and training controls.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024). :mod:`.siren` holds the network (integer frequencies, init, apply),
  :mod:`.frequency_analysis` the Bessel expansion and sub-periods (Thm. 1, 2, sec. 5.3), and the
  training controls one concern a module: :mod:`.bounding` (Def. 6.1, sec. 6), :mod:`.weight_decay`
  (Def. 3.2, 3.3, sec. 7.2.1), :mod:`.fitting` (the training loop), :mod:`.pruning` (Def. 3.4,
  sec. 7) and :mod:`.growing` (sec. 8), over the hidden matrix of :mod:`.hidden`.
"""
