"""Experiment scripts: one per reproduced claim; `python -m experiments.report` runs them all."""
