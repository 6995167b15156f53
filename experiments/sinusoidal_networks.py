"""Claims of the sinusoidal-networks paper (Aldana et al.) (controlled sinusoidal networks), all four parts in one report entry:
integer vs SIREN initialisation, bounding and the spectrum, structured pruning (Fig. 17), growing (Fig. 20).

Each part is its own script (experiments.sinusoidal_init, sinusoidal_bounding, sinusoidal_pruning,
sinusoidal_growing) writing under results/<part>/; this one runs them in turn and joins their tables.

Run:
  python -m experiments.sinusoidal_networks --preset quick
"""

from __future__ import annotations

from experiments import _common
from experiments import sinusoidal_bounding
from experiments import sinusoidal_growing
from experiments import sinusoidal_init
from experiments import sinusoidal_pruning

PARTS = (
    ("Integer vs SIREN initialisation", sinusoidal_init),
    ("Bounding and the spectrum", sinusoidal_bounding),
    ("Structured pruning", sinusoidal_pruning),
    ("Growing vs a fixed wide band", sinusoidal_growing),
)
NAME = "sinusoidal_networks"


def main(preset: str = "quick") -> dict:
  out = _common.results_dir(NAME)
  results = {title: module.main(preset) for title, module in PARTS}
  table = "\n".join(f"**{title}** ({results[title]['verdict']})\n\n{results[title]['table']}" for title, _ in PARTS)
  verdict = " ".join(f"{title}: {results[title]['verdict']}" for title, _ in PARTS)
  summary = {"table": table, "verdict": verdict, "plot": results[PARTS[0][0]]["plot"],
             "plots": {title: results[title]["plot"] for title, _ in PARTS}}
  _common.save(out, {**summary})
  return summary


if __name__ == "__main__":
  _common.cli(main, ("quick", "full"), __doc__, show=lambda result: result["table"])
