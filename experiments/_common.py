"""Shared plumbing for experiment scripts: presets, the command line, result files, Markdown tables,
figures, progress bars, interleaved timing, and the small transformer and adapter training step the
benchmarks share."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spectral_peft as sp

RESULTS_ROOT = os.environ.get("SPECTRAL_PEFT_RESULTS", "results")
Config = TypeVar("Config")
Key = TypeVar("Key", bound=Hashable)


def preset(presets: dict[str, Config], name: str) -> Config:
  """The named preset, or a clear error listing the available ones."""
  if name not in presets:
    raise ValueError(f"`preset` must be one of {sorted(presets)}, got {name!r}.")
  return presets[name]


def results_dir(name: str) -> str:
  """``<RESULTS_ROOT>/<name>`` (``RESULTS_ROOT`` is ``$SPECTRAL_PEFT_RESULTS``, default ``results``), created if missing."""
  path = os.path.join(RESULTS_ROOT, name)
  os.makedirs(path, exist_ok=True)
  return path


def setup(presets: dict[str, Config], preset_name: str, experiment: str) -> tuple[Config, str]:
  """An experiment's prologue: the preset called ``preset_name`` (see :func:`preset`) and the results
  directory of ``experiment`` (see :func:`results_dir`).

  Example:
    >>> config, out = setup(PRESETS, preset, NAME)  # doctest: +SKIP
  """
  return preset(presets, preset_name), results_dir(experiment)


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


def progress_bar(desc: str) -> Callable[[Iterable], Iterable]:
  """``iterable -> progress(iterable, desc=desc)``: for library loops that take a ``progress`` callable."""
  return functools.partial(progress, desc=desc)


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


def write_preset_results(out: str, name: str, preset: str, table: str, payload: dict[str, Any]) -> None:
  """Writes ``table`` under a ``# <name> (<preset>)`` heading to ``<out>/table_<preset>.md`` and ``payload``
  to ``<out>/results_<preset>.json``, so that the runs of different presets sit side by side."""
  with open(os.path.join(out, f"table_{preset}.md"), "w") as f:
    f.write(f"# {name} ({preset})\n\n" + table)
  write_json(os.path.join(out, f"results_{preset}.json"), payload)


def _table_and_verdict(result: dict[str, Any]) -> str:
  return f"{result['table']}\n{result.get('verdict', '')}"


def cli(
    main: Callable[[str], dict[str, Any]],
    presets: Iterable[str],
    doc: str,
    *,
    show: Callable[[dict[str, Any]], str] = _table_and_verdict,
    name: str | None = None,
) -> None:
  """``python -m experiments.<name> --preset quick|full [--record]``: runs ``main`` and prints ``show(result)``.

  Args:
    main: the experiment, ``preset name -> result dict``.
    presets: the preset names ``--preset`` accepts (a dict of presets gives its keys and, with
      ``--record``, the recorded config); the default is ``quick``.
    doc: the module docstring; its first line is the ``--help`` description.
    show: what to print of the result; by default its ``table`` and then its ``verdict``.
    name: the experiment's module name; given, ``--record`` also writes the result with its command,
      machine and run time to ``experiments/recorded/<name>/<preset>.json`` (:func:`record`).
  """
  import argparse

  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--preset", default="quick", choices=sorted(presets))
  if name is not None:
    parser.add_argument("--record", action="store_true",
                        help=f"also write the result, with command, date, versions, machine and wall/CPU time, to "
                             f"experiments/recorded/{name}/<preset>.json (to be committed)")
  args = parser.parse_args()
  result, usage = measured(lambda: main(args.preset))
  print(show(result))
  if name is not None and args.record:
    config = presets.get(args.preset) if isinstance(presets, Mapping) else None
    command = f"python -m experiments.{name} --preset {args.preset} --record"
    print("recorded", record(name, args.preset, result, usage, command=command, config=config))


def subplots(*args: Any, **kwargs: Any) -> Any:
  """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the file-only Agg backend: ``(figure, axes)``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str, *, dpi: int = 120) -> str:
  """Lays out ``fig`` (``tight_layout``), writes it to ``path`` at ``dpi`` and closes it; returns ``path``."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def time_interleaved(
    calls: Mapping[Key, Callable[[], Any]], repeats: int, *, desc: str | None = "timing"
) -> dict[Key, list[float]]:
  """Wall-clock seconds of every call, ``repeats`` times, the calls interleaved.

  Each round runs every call once, in order, so that all of them see the same machine state (a shared
  machine's load drifts affect them alike). The timed interval includes waiting for the call's result
  (``jax.block_until_ready``); a training step that carries state keeps it in its closure. Compile and
  warm up the calls first: every call is timed.

  Args:
    calls: ``key -> call`` of no arguments.
    repeats: rounds.
    desc: the progress bar's label, or None for no progress bar.

  Returns:
    ``key -> [seconds of round 0, round 1, ...]``, in the order of ``calls``.

  Example:
    >>> times = time_interleaved({"a": lambda: jnp.ones(3).sum()}, 2, desc=None)
    >>> len(times["a"])
    2
  """
  times: dict[Key, list[float]] = {key: [] for key in calls}
  for _ in (range(repeats) if desc is None else progress(range(repeats), desc=desc)):
    for key, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[key].append(time.perf_counter() - start)
  return times


def milliseconds(seconds: Sequence[float]) -> dict[str, float]:
  """``{"min_ms", "median_ms", "max_ms"}`` of timings given in seconds."""
  t = np.asarray(seconds) * 1e3
  return {"min_ms": float(t.min()), "median_ms": float(np.median(t)), "max_ms": float(t.max())}


def min_median_max(row: Mapping[str, Any], prefix: str = "") -> str:
  """``"min / median / max"`` (ms, two decimals) from ``row``'s ``<prefix>min_ms`` etc. (see :func:`milliseconds`)."""
  return f"{row[prefix + 'min_ms']:.2f} / {row[prefix + 'median_ms']:.2f} / {row[prefix + 'max_ms']:.2f}"


def optimize(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    tx: optax.GradientTransformation,
    steps: int,
    *,
    key: jax.Array | None = None,
    desc: str | None = None,
) -> Any:
  """Minimises ``loss_fn`` from ``params`` with ``steps`` jitted steps of the optimiser ``tx``.

  Args:
    loss_fn: ``params -> scalar loss``, or ``(params, key) -> scalar loss`` when ``key`` is given (to draw
      the step's batch).
    params: the starting parameter pytree.
    tx: the optax optimiser.
    steps: number of steps.
    key: step ``i`` passes ``jax.random.fold_in(key, i)`` to ``loss_fn``; None: ``loss_fn`` takes no key.
    desc: the progress bar's label.

  Returns:
    The parameters after the last step.

  Example:
    >>> optimize(lambda p: jnp.sum(jnp.square(p - 1.0)), jnp.zeros(2), optax.sgd(0.5), 1)
    Array([1., 1.], dtype=float32)
  """
  keyed = () if key is None else (key,)

  @jax.jit
  def step(params, state, *step_key):
    loss, grads = jax.value_and_grad(loss_fn)(params, *step_key)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for i in progress(range(steps), desc=desc):
    params, state, _ = step(params, state, *(jax.random.fold_in(k, i) for k in keyed))
  return params


class TransformerBlock(nn.Module):
  """Pre-LN block: ``x + attention(LN(x))``, then ``x + mlp_out(gelu(mlp_in(LN(x))))``.

  The kernels are named ``attention/{query,key,value,out}/kernel`` (heads on their own axis, as in
  ``nn.MultiHeadDotProductAttention``), ``mlp_in/kernel`` ``(embed, mlp)`` and ``mlp_out/kernel`` ``(mlp, embed)``.
  """

  embed: int
  heads: int
  mlp: int
  dtype: Any = None  # computation dtype of the attention and MLP layers (None: that of the inputs)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype, name="attention")(nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(self.mlp, dtype=self.dtype, name="mlp_in")(nn.LayerNorm()(x)))
    return x + nn.Dense(self.embed, dtype=self.dtype, name="mlp_out")(h)


def merge_or_runtime_step(model: nn.Module, path: str) -> Callable[..., Any]:
  """``jit(value_and_grad)`` of ``mean(model(x)^2)`` wrt the adapters, ``(adapters, params, x)``: through
  ``merge`` (``path="merge"``, every merged weight alive) or the adapter runtime (``"runtime"``)."""

  def loss(adapters, params, x):
    if path == "merge":
      out = model.apply({"params": sp.peft.merge(params, adapters, safe=False)}, x)
    else:
      out = sp.peft.apply_adapters(model, params, adapters, x)
    return jnp.mean(jnp.square(out))

  return jax.jit(jax.value_and_grad(loss))


class ResidualMLP(nn.Module):
  """``layers`` blocks ``x + W2 gelu(W1 x)`` (``embed -> hidden -> embed``): the adapter benchmarks' stack."""

  layers: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))
    return x


class Transformer(nn.Module):
  """The benchmarks' small Linen transformer: ``layers`` :class:`TransformerBlock` s named ``block_<i>``,
  mapping ``(batch, seq, embed)`` to ``(batch, seq, embed)`` (no embedding, no head)."""

  embed: int
  heads: int
  mlp: int
  layers: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = TransformerBlock(self.embed, self.heads, self.mlp, self.dtype, name=f"block_{i}")(x)
    return x


def adapter_train_step(
    model: nn.Module,
    params: Any,
    adapters: dict[str, Any],
    tx: optax.GradientTransformation,
    path: str,
    *,
    donate: bool = False,
) -> tuple[Callable[..., Any], Any]:
  """A jitted adapter training step ``(trainable, opt_state, x, y) -> (trainable, opt_state, mse)``.

  The loss is the mean squared error of the adapted ``model`` (Linen, frozen ``params``) to ``y``; the
  gradient is taken with respect to the adapters' trainable part only.

  Args:
    model: the Linen model.
    params: its frozen parameters.
    adapters: ``sp.peft.init_adapters``' output.
    tx: the optax optimiser.
    path: ``"merge"`` (``W0 + Delta W`` formed every step, ``sp.peft.merge``) or anything else for
      ``sp.peft.apply_factored`` (each spec's own ``path`` then decides how ``x Delta W`` is computed).
    donate: donate the trainable and optimiser-state buffers to the step (the caller must not reuse them).

  Returns:
    ``(step, trainable)``: the jitted step and the adapters' trainable part to start from.
  """
  trainable, frozen = sp.peft.partition(adapters)

  def loss(t, x, y):
    ad = sp.peft.combine(t, frozen)
    if path == "merge":
      out = model.apply({"params": sp.peft.merge(params, ad)}, x)
    else:
      out = sp.peft.apply_factored(model, params, ad, x)
    return jnp.mean(jnp.square(out - y))

  def step(t, state, x, y):
    value, grads = jax.value_and_grad(loss)(t, x, y)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, value

  return jax.jit(step, donate_argnums=(0, 1) if donate else ()), trainable


def regression_task(model: nn.Module, shape: tuple[int, ...], *, seed: int = 0) -> tuple[jax.Array, jax.Array, Any]:
  """Standard-normal inputs ``x`` and targets ``y``, both of ``shape``, and ``model``'s parameters initialised
  on ``x`` (three keys split from ``jax.random.key(seed)``): a task whose steps are only timed."""
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, shape)
  y = jax.random.normal(ky, x.shape)
  return x, y, model.init(kp, x)["params"]


def time_adapter_steps(
    steps: Mapping[Key, dict[str, Any]], x: jax.Array, y: jax.Array, repeats: int, *, desc: str | None = "timing"
) -> dict[Key, list[float]]:
  """:func:`time_interleaved` for :func:`adapter_train_step` s that carry their state.

  Every entry of ``steps`` holds its jitted ``"step"``, ``"trainable"`` and ``"state"``; each call feeds
  ``(trainable, state, x, y)`` and replaces the last two by the step's outputs (so donated buffers are
  never reused). Returns ``key -> seconds per round``.
  """

  def call(entry: dict[str, Any]) -> jax.Array:
    entry["trainable"], entry["state"], loss = entry["step"](entry["trainable"], entry["state"], x, y)
    return loss

  return time_interleaved({key: functools.partial(call, entry) for key, entry in steps.items()}, repeats, desc=desc)


def sample_std(values: Any) -> float:
  """The sample standard deviation (``ddof=1``) of ``values`` (any shape, flattened), 0.0 for fewer than two."""
  v = np.asarray(values, np.float64)
  return float(np.std(v, ddof=1)) if v.size > 1 else 0.0


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
  paired = a.shape == b.shape
  diff = a - b if paired else np.asarray([a.mean() - b.mean()])
  out = {"n": int(min(a.size, b.size)), "mean_a": float(a.mean()), "std_a": sample_std(a), "mean_b": float(b.mean()),
         "std_b": sample_std(b), "diff_mean": float(diff.mean()), "diff_std": sample_std(diff)}
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
  mean_a, mean_b, std_a, std_b = float(a.mean()), float(b.mean()), sample_std(a), sample_std(b)
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


# --- Recorded runs ------------------------------------------------------------------------------------------
# A recorded run is an experiment run at a named preset (usually a paper-size budget that does not fit in
# ``make report``) whose result is committed under ``experiments/recorded/<experiment>/<preset>.json`` with
# what it was measured on and what it cost, so that the report can show it beside the quick run it recomputes.

RECORDED_ROOT = os.environ.get("SPECTRAL_PEFT_RECORDED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded"))
RECORD_SIZE_LIMIT = 200_000  # characters of JSON above which one top-level result field is left out of a record


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``, else "unknown")."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
  """What a run was measured on.

  Returns:
    ``{"cpu", "cores", "platform", "backend", "devices"}``: the CPU model (:func:`cpu_model`), the number of
    logical cores this process may use (``os.sched_getaffinity``, else ``os.cpu_count()``), the OS and
    architecture (``platform.platform()``), JAX's default backend and its devices.
  """
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # pragma: no cover - not Linux
    cores = os.cpu_count() or 0
  return {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


def versions() -> dict[str, str | None]:
  """Versions of Python, ``spectral_peft`` and the libraries the numbers depend on (None where not installed)."""
  from importlib import metadata

  out: dict[str, str | None] = {"python": platform.python_version(), "spectral_peft": sp.__version__}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_revision(path: str | None = None) -> dict[str, Any]:
  """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package): the HEAD commit and
  whether tracked files differ from it; both None outside a git checkout."""
  import subprocess

  cwd = path or os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": commit, "dirty": dirty}


@dataclasses.dataclass
class Usage:
  """What a measured call cost.

  Attributes:
    wall_s: wall-clock seconds (``time.perf_counter``).
    cpu_s: CPU seconds of this process, all threads, user + system (``time.process_time``); on a machine with
      several cores this exceeds ``wall_s`` when XLA runs in parallel.
    children_cpu_s: CPU seconds of waited-for child processes (``resource.getrusage(RUSAGE_CHILDREN)``).
    max_rss_mb: the process's peak resident memory in MiB so far (``ru_maxrss``; a high-water mark since the
      process started, not only of the call).
  """

  wall_s: float = 0.0
  cpu_s: float = 0.0
  children_cpu_s: float = 0.0
  max_rss_mb: float = 0.0


def measured(fn: Callable[[], Any]) -> tuple[Any, Usage]:
  """``(fn(), usage)``: calls ``fn`` and measures its wall and CPU time (see :class:`Usage`).

  Example:
    >>> value, usage = measured(lambda: sum(range(1000)))
    >>> value, usage.wall_s >= 0.0
    (499500, True)
  """
  import resource

  def children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

  wall, cpu, kids = time.perf_counter(), time.process_time(), children()
  value = fn()
  usage = Usage(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, children_cpu_s=children() - kids,
                max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
  return value, usage


def _compact(result: Mapping[str, Any], limit: int) -> tuple[dict[str, Any], list[str]]:
  """The JSON form of ``result`` without its top-level fields longer than ``limit`` characters of JSON (and
  without ``plot``, a path under ``results/`` that is not committed); returns it and the names left out."""
  kept, dropped = {}, []
  for key, value in result.items():
    value = _jsonable(value)
    if key == "plot" or len(json.dumps(value, default=str)) > limit:
      dropped.append(str(key))
    else:
      kept[str(key)] = value
  return kept, dropped


def seeds_of(config: Any) -> int:
  """How many seeds a preset's config runs: ``len(config.seeds)`` for a sequence, ``config.seeds`` for an int
  (``init_seeds`` where a config names its initialisation seeds so), else 1."""
  seeds = getattr(config, "seeds", getattr(config, "init_seeds", 1))
  return len(seeds) if isinstance(seeds, (list, tuple)) else int(seeds)


def record(
    experiment: str,
    preset: str,
    result: Mapping[str, Any],
    usage: Usage,
    *,
    command: str,
    config: Any = None,
    root: str | None = None,
    date: datetime.datetime | None = None,
) -> str:
  """Writes a recorded run to ``<root>/<experiment>/<preset>.json`` (and a readable ``<preset>.md``); returns
  the JSON's path. An earlier record of the same experiment and preset is replaced.

  The JSON holds:
    experiment, preset: what ran.
    command: the command line that reproduces it.
    date: when it finished, ISO 8601 UTC.
    seeds: the number of seeds of the preset (:func:`seeds_of` of ``config``; 1 where unknown).
    config: the preset's configuration (``config``, or ``result["config"]``).
    versions: :func:`versions`; machine: :func:`machine`; git: :func:`git_revision`.
    usage: :class:`Usage` as a dict (wall and CPU seconds, peak memory).
    verdict, table: the experiment's own verdict line and Markdown table.
    result: the rest of the result (fields over ``RECORD_SIZE_LIMIT`` characters of JSON left out);
    left_out: the names of the fields left out.

  Args:
    experiment: the experiment module's name (``experiments.<experiment>``).
    preset: the preset it ran at.
    result: its ``main(preset)`` output (needs ``table``; ``verdict`` if it has one).
    usage: what the run cost (:func:`measured`).
    command: the command line that reproduces it.
    config: the preset's config object (for ``seeds`` and ``config``).
    root: the recorded-results folder (default :data:`RECORDED_ROOT`).
    date: the finishing time (default now).
  """

  root = RECORDED_ROOT if root is None else root
  config = result.get("config") if config is None else config
  rest, dropped = _compact({k: v for k, v in result.items() if k not in ("table", "verdict", "config")}, RECORD_SIZE_LIMIT)
  when = (date or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
  payload = {
      "experiment": experiment, "preset": preset, "command": command, "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
      "seeds": seeds_of(config), "config": _jsonable(config), "versions": versions(), "machine": machine(),
      "git": git_revision(), "usage": dataclasses.asdict(usage), "verdict": result.get("verdict", ""),
      "table": result["table"], "result": rest, "left_out": dropped,
  }
  folder = os.path.join(root, experiment)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{preset}.json")
  write_json(path, payload)
  with open(os.path.join(folder, f"{preset}.md"), "w") as f:
    f.write(f"# {experiment} ({preset}), recorded\n\n{record_heading(payload)}\n\n{payload['table']}\n"
            f"**Verdict of this run:** {payload['verdict']}\n")
  return path


def record_heading(rec: Mapping[str, Any]) -> str:
  """One line saying how a recorded run was made: command, date, seeds, machine, versions, wall and CPU time."""
  m, v, u = rec["machine"], rec["versions"], rec["usage"]
  return (f"`{rec['command']}` — {rec['date']}, {rec['seeds']} seed{'s' if rec['seeds'] != 1 else ''}, "
          f"{m['cpu']} ({m['cores']} cores, {m['backend']}), jax {v.get('jax')}, spectral_peft {v.get('spectral_peft')}; "
          f"wall {u['wall_s'] / 60:.1f} min, CPU {u['cpu_s'] / 60:.1f} min")


def load_recorded(experiment: str, root: str | None = None, order: Sequence[str] = ()) -> list[dict[str, Any]]:
  """The recorded runs of ``experiment`` (the JSON of :func:`record`), in the order of the preset names in
  ``order`` (an experiment's ``PRESETS`` lists them from small to large budgets), then the others by name;
  an empty list where none was recorded."""
  folder = os.path.join(RECORDED_ROOT if root is None else root, experiment)
  if not os.path.isdir(folder):
    return []
  records = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      with open(os.path.join(folder, name)) as f:
        records.append(json.load(f))
  rank = {p: i for i, p in enumerate(order)}
  return sorted(records, key=lambda r: (rank.get(r["preset"], len(rank)), r["preset"]))
