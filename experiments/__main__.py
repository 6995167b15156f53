"""``python -m experiments``: every reproduction experiment, then ``results/REPORT.md``."""

from experiments.report import cli

raise SystemExit(cli())
