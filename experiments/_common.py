"""Shared plumbing for experiment scripts: presets, result files, Markdown tables, progress bars."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Any, Iterable, Sequence, TypeVar

import jax
import numpy as np

RESULTS_ROOT = os.environ.get("SPECTRAL_PEFT_RESULTS", "results")
Config = TypeVar("Config")


def preset(presets: dict[str, Config], name: str) -> Config:
  """The named preset, or a clear error listing the available ones."""
  if name not in presets:
    raise ValueError(f"`preset` must be one of {sorted(presets)}, got {name!r}.")
  return presets[name]


def results_dir(name: str) -> str:
  path = os.path.join(RESULTS_ROOT, name)
  os.makedirs(path, exist_ok=True)
  return path


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "python": platform.python_version(),
      "machine": platform.machine(),
  }


def _jsonable(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return _jsonable(dataclasses.asdict(value))
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


def write_json(path: str, payload: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(_jsonable(payload), f, indent=2, sort_keys=True)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  def fmt(x: Any) -> str:
    if isinstance(x, float):
      return f"{x:.4g}"
    return str(x)

  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def progress(iterable: Iterable, **kwargs: Any):
  """A tqdm progress bar (to stderr), or the bare iterable where tqdm is missing."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    return iterable
  return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def num_parameters(tree: Any) -> int:
  """Number of scalars in a parameter pytree (a complex entry counts as 2)."""
  return int(sum(np.size(x) * (2 if np.iscomplexobj(x) else 1) for x in jax.tree.leaves(tree)))


def save(out: str, result: dict[str, Any], *, stem: str = "results") -> dict[str, Any]:
  """Writes ``result["table"]`` to ``<out>/table.md`` (``<stem>.md`` for another stem) and the whole
  result, with the environment it was measured on, to ``<out>/<stem>.json``; returns the result."""
  result.setdefault("environment", environment())
  with open(os.path.join(out, "table.md" if stem == "results" else f"{stem}.md"), "w") as f:
    f.write(result["table"])
  write_json(os.path.join(out, f"{stem}.json"), result)
  return result


def agreement(held: int, total: int) -> str:
  """"Matches" / "Partly matches" / "Does not match" for ``held`` of ``total`` checks of a claim."""
  return "Matches" if held == total else "Partly matches" if held else "Does not match"


def cli(main, presets: dict[str, Any], doc: str) -> None:
  """``python -m experiments.<name> --preset quick|full``: runs ``main`` and prints its table and verdict."""
  import argparse

  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--preset", default="quick", choices=sorted(presets))
  result = main(parser.parse_args().preset)
  print(result["table"])
  print(result.get("verdict", ""))


def paired_spread_verdict(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """Mean +- std (ddof = 1) of two samples over seeds, their paired difference, and whether the
  difference is larger than the spread.

  "Larger than the spread" means the intervals ``mean +- std`` of ``a`` and ``b`` do not overlap
  (``|mean_a - mean_b| > std_a + std_b``); one seed is never beyond the spread. With equal-length samples the paired difference
  ``a_i - b_i`` (same seed) is reported too. One seed gives std 0 and is flagged in ``text``.

  Returns:
    ``{"n", "mean_a", "std_a", "mean_b", "std_b", "diff_mean", "diff_std", "beyond_spread", "text"}``.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  std = lambda v: float(np.std(v, ddof=1)) if v.size > 1 else 0.0  # noqa: E731
  paired = a.shape == b.shape
  diff = a - b if paired else np.asarray([a.mean() - b.mean()])
  out = {"n": int(min(a.size, b.size)), "mean_a": float(a.mean()), "std_a": std(a), "mean_b": float(b.mean()),
         "std_b": std(b), "diff_mean": float(diff.mean()), "diff_std": std(diff)}
  out["beyond_spread"] = bool(out["n"] > 1 and abs(out["mean_a"] - out["mean_b"]) > out["std_a"] + out["std_b"])
  seeds = f"{out['n']} seed{'s' if out['n'] != 1 else ''}"
  out["text"] = (f"{out['mean_a']:.4g} +- {out['std_a']:.2g} vs {out['mean_b']:.4g} +- {out['std_b']:.2g} "
                 f"({seeds}{', paired difference ' + format(out['diff_mean'], '.3g') + ' +- ' + format(out['diff_std'], '.2g') if paired else ''}); "
                 f"the difference is {'larger' if out['beyond_spread'] else 'not larger'} than the spread"
                 f"{' (one seed: no spread measured)' if out['n'] == 1 else ''}")
  return out


def spread_verdict(
    ours: Sequence[float],
    reference: "Sequence[float] | float",
    *,
    names: tuple[str, str] = ("ours", "reference"),
    unit: str = "",
    log10: bool = False,
) -> dict[str, Any]:
  """Mean +- std of two sets of runs and whether their difference is larger than the spread.

  ``ours`` holds one value per seed; ``reference`` holds one per seed too, or is a single number
  (a paper's figure, whose spread is unknown and taken as 0). With ``log10`` the comparison is made
  on ``log10`` of the values (errors spanning orders of magnitude), and means are geometric.
  The std is the sample standard deviation (``ddof=1``); the spread is ``std_ours + std_reference``
  and the difference is *beyond the spread* when ``|mean_ours - mean_reference| > spread`` and
  ``ours`` has at least two seeds (with one seed the spread is unknown and nothing is beyond it).

  Returns:
    A dict with ``mean``/``std``/``n`` for both sides (in log10 units when ``log10``), ``difference``
    (ours minus reference), ``spread``, ``beyond_spread`` (bool), ``sign`` (+1, 0 or -1, that of the
    difference when beyond the spread, else 0) and ``text``, one sentence for a verdict line.
  """
  a = np.asarray(ours, np.float64).ravel()
  scalar = np.ndim(reference) == 0
  b = np.asarray([reference] if scalar else reference, np.float64).ravel()
  if a.size == 0 or b.size == 0:
    raise ValueError(f"`ours` and `reference` must hold at least one value, got {a.size} and {b.size}.")
  if log10:
    a, b = np.log10(a), np.log10(b)
  std = lambda x: float(np.std(x, ddof=1)) if x.size > 1 else 0.0  # noqa: E731
  mean_a, mean_b, std_a, std_b = float(a.mean()), float(b.mean()), std(a), std(b)
  diff, spread = mean_a - mean_b, std_a + std_b
  beyond = a.size > 1 and abs(diff) > spread
  if log10:
    show = lambda m, s: f"{10**m:.2g} (x/ {10**s:.2g})"  # noqa: E731
    diff_txt = f"ratio {10**diff:.3g}, spread x/ {10**spread:.2g}"
  else:
    show = lambda m, s: f"{m:.4g} +- {s:.2g}{unit}"  # noqa: E731
    diff_txt = f"difference {diff:+.3g}{unit}, spread {spread:.2g}{unit}"
  ref_txt = f"{names[1]} {10**mean_b:.2g}" if (scalar and log10) else (
      f"{names[1]} {mean_b:.4g}{unit}" if scalar else f"{names[1]} {show(mean_b, std_b)} ({b.size} seed{'s' if b.size > 1 else ''})")
  seeds = f"{a.size} seed{'s' if a.size > 1 else ''}"
  judged = ("beyond the spread" if beyond else
            "within the spread" if a.size > 1 else "one seed, spread unknown")
  text = f"{names[0]} {show(mean_a, std_a)} ({seeds}) vs {ref_txt}: {diff_txt}, {judged}"
  return {"mean": mean_a, "std": std_a, "n": int(a.size), "reference_mean": mean_b, "reference_std": std_b,
          "reference_n": int(b.size), "difference": diff, "spread": spread, "beyond_spread": bool(beyond),
          "sign": int(np.sign(diff)) if beyond else 0, "log10": log10, "text": text}
