"""Cost of an LRNN: training-step time and memory against SIREN and a ReLU MLP, and the Laplacian.

The LRNN paper (Table 8) reports an LRNN-SPDER training step at 2.6x SIREN's time on the cameraman image
and (App. B.2, App. G) keeps memory small with gradient checkpointing and forward-mode Laplacians.
Two measurements, all in one process:

1. *Image-fit step.* An LRNN (``lrnn_image``'s architecture: SPDER components, LayerNorm), with and
   without rematerialisation (``sp.lrnn_apply(..., remat=True)``), a SIREN and a ReLU MLP whose width
   is chosen so that their parameter count is closest to the LRNN's (``lrnn_image.siren_init`` /
   ``siren_apply``; the ReLU MLP has SIREN's layout). Each maps a batch of 2-D coordinates to one
   value; the jitted step is a ``value_and_grad`` of the MSE plus an ``optax.adam`` update.
2. *Poisson Laplacian.* ``lrnn_poisson``'s LRNN [2,16,16,1] on its collocation grid: the library's
   forward-mode ``sp.laplacian`` (jvp of jvp) against the trace of ``jax.hessian`` at every point
   (vmapped), for the Laplacian over the interior points and for the value and parameter gradient
   of App. G's loss (``sp.poisson_loss`` against the same loss built on the Hessian trace). We check
   that both give the same Laplacian, loss and gradient (max abs difference).

Every function is compiled first (``jit(...).lower(...).compile()``); temporary memory is XLA's
compiled memory analysis (``temp_size_in_bytes``) of the same executable that is timed. Then the
executables of each group are timed interleaved over repeats, so that they see the same machine
state; we report min / median / max and ratios of medians (to SIREN; forward / Hessian). Nothing here
is asserted in tests.

Run:
  .venv/bin/python -m experiments.bench_lrnn --preset quick
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import spectral_peft as sp
from experiments import _common, lrnn_image, lrnn_poisson


@dataclasses.dataclass(frozen=True)
class Config:
  # 1. Image-fit training step (defaults: lrnn_image's quick sizes, ~11k parameters).
  batch: int = 8192  # Coordinates per step.
  lrnn_ranks: tuple[int, ...] = (32, 32)
  lrnn_width: int = 8
  lrnn_hidden: tuple[int, ...] = (1,)
  lrnn_activation: str = "spder"
  omega: float = 30.0
  mlp_depth: int = 3  # Hidden layers of SIREN and of the ReLU MLP; their width matches the LRNN's parameters.
  learning_rate: float = 1e-3
  repeats: int = 10
  # 2. Poisson Laplacian (the network and loss are lrnn_poisson's).
  poisson_grid: int = 41
  poisson_repeats: int = 10  # Laplacian over the grid.
  poisson_grad_repeats: int = 3  # Loss value and parameter gradient (about a second a call on a 2-core CPU).
  seed: int = 0


PRESETS = {
    "quick": Config(),
    "full": Config(batch=65536, lrnn_ranks=(106, 106), lrnn_width=16, repeats=30, poisson_repeats=30,
                   poisson_grad_repeats=20),  # lrnn_image's full sizes (~197k parameters, the whole image).
}
NAME = "bench_lrnn"
PAPER_STEP_RATIO = 2.6  # the LRNN paper, Table 8: LRNN-SPDER 0.0453 s vs SIREN 0.0174 s per iteration.


# --------------------------------------------------------------------------------------------
# 1. Image-fit training step.


def image_models(config: Config, key: jax.Array) -> dict[str, dict[str, Any]]:
  """name -> {"params", "apply", "architecture"} for the four image-fit models."""
  k_lrnn, k_siren, k_relu = jax.random.split(key, 3)
  lrnn_params = sp.lrnn_init(k_lrnn, 2, config.lrnn_ranks, 1, projection_width=config.lrnn_width,
                             hidden=config.lrnn_hidden, omega=config.omega)
  width = lrnn_image.matched_width(_common.num_parameters(lrnn_params), config.mlp_depth)
  widths = (2,) + (width,) * config.mlp_depth + (1,)
  lrnn_arch = f"LRNN {[2, *config.lrnn_ranks, 1]}, d={config.lrnn_width}, h={config.lrnn_hidden}, {config.lrnn_activation}"
  # Activation evaluations per input point: r * d * (1 + len(hidden)) per LRNN layer (each SPDER
  # evaluation is a sine and a square root), one per hidden unit of an MLP. On a CPU the step time
  # follows these transcendental counts rather than the matmul flops.
  lrnn_acts = sum(r * config.lrnn_width * (1 + len(config.lrnn_hidden)) for r in config.lrnn_ranks)
  models = {}
  for remat in (False, True):
    apply = functools.partial(sp.lrnn_apply, activation=config.lrnn_activation, omega=config.omega, remat=remat)
    models["LRNN (remat)" if remat else "LRNN"] = {"params": lrnn_params, "apply": apply, "architecture": lrnn_arch,
                                                   "activations": lrnn_acts}
  models["SIREN"] = {"params": lrnn_image.siren_init(k_siren, widths, config.omega),
                     "apply": functools.partial(lrnn_image.siren_apply, omega_0=config.omega),
                     "architecture": f"SIREN {list(widths)}", "activations": width * config.mlp_depth}
  models["ReLU MLP"] = {"params": lrnn_image.siren_init(k_relu, widths, 1.0),  # He-uniform hidden layers.
                        "apply": lrnn_image.mlp_apply, "architecture": f"ReLU MLP {list(widths)}",
                        "activations": width * config.mlp_depth}
  return models


def train_step(apply: Callable, tx: optax.GradientTransformation):
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(apply(p, x) - y)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def bench_image(config: Config) -> list[dict]:
  kx, kp = jax.random.split(jax.random.key(config.seed))
  x = jax.random.uniform(kx, (config.batch, 2), minval=-1.0, maxval=1.0)
  y = (jnp.sin(3.0 * jnp.pi * x[:, :1]) * jnp.cos(2.0 * jnp.pi * x[:, 1:]))  # Any target; only the cost matters.
  tx = optax.adam(config.learning_rate)
  runs = {}
  for name, model in _common.progress(image_models(config, kp).items(), desc=f"{NAME} compile steps"):
    params = jax.tree.map(jnp.array, model["params"])  # A private copy: the step donates its buffers.
    opt_state = tx.init(params)
    start = time.perf_counter()
    compiled = train_step(model["apply"], tx).lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - start
    params, opt_state, loss = compiled(params, opt_state, x, y)  # Warm up.
    jax.block_until_ready(loss)
    runs[name] = {"compiled": compiled, "state": (params, opt_state), "architecture": model["architecture"],
                  "activations": model["activations"],
                  "params": _common.num_parameters(params), "compile_s": compile_s,
                  "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20}

  def step(run):
    params, opt_state, loss = run["compiled"](*run["state"], x, y)
    run["state"] = (params, opt_state)
    return loss

  times = _common.time_interleaved({name: lambda run=run: step(run) for name, run in runs.items()}, config.repeats,
                                   desc=f"{NAME} time steps")
  rows = []
  for name, run in runs.items():
    rows.append({"model": name, "architecture": run["architecture"], "params": run["params"],
                 "activations_per_point": run["activations"], **_common.milliseconds(times[name]),
                 "temp_MiB": run["temp_MiB"], "compile_s": run["compile_s"]})
  siren = next(r for r in rows if r["model"] == "SIREN")
  for r in rows:
    r["time_vs_siren"] = r["median_ms"] / siren["median_ms"]
    r["memory_vs_siren"] = r["temp_MiB"] / siren["temp_MiB"]
  return rows


# --------------------------------------------------------------------------------------------
# 2. Poisson Laplacian: forward mode against the Hessian's trace.


def hessian_laplacian(fn: Callable, x: jax.Array) -> jax.Array:
  """``trace(jax.hessian(fn))`` at every row of ``x`` ``(N, n)``; ``fn`` maps ``(B, n)`` to ``(B,)`` or ``(B, 1)``."""
  point = lambda q: jnp.reshape(fn(q[None]), ())  # noqa: E731
  return jax.vmap(lambda q: jnp.trace(jax.hessian(point)(q)))(x)


def hessian_poisson_loss(fn: Callable, interior, boundary, *, frequency: int, alpha: float) -> jax.Array:
  """``sp.poisson_loss``'s value with the Laplacian from :func:`hessian_laplacian`."""
  residual = hessian_laplacian(fn, interior) - sp.poisson_source(interior, frequency=frequency)
  return alpha * jnp.mean(jnp.square(residual)) + jnp.mean(jnp.square(jnp.reshape(fn(boundary), (-1,))))


def _max_abs(a, b) -> float:
  return float(max(jnp.max(jnp.abs(u - v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _max_abs_value(a) -> float:
  return float(max(jnp.max(jnp.abs(u)) for u in jax.tree.leaves(a)))


def bench_poisson(config: Config) -> dict:
  net = lrnn_poisson.Config()  # The experiment's network, frequency and loss weight.
  frequency = 2  # Table 11's headline case.
  interior, boundary = sp.poisson_grid(config.poisson_grid)
  params = sp.lrnn_init(jax.random.key(config.seed), 2, net.ranks, 1, projection_width=net.projection_width,
                        hidden=net.hidden, omega=net.omega)
  apply = functools.partial(sp.lrnn_apply, omega=net.omega)
  loss_kw = {"frequency": frequency, "alpha": net.alpha}
  fns = {
      ("laplacian", "forward"): lambda p: sp.laplacian(lambda q: apply(p, q), interior),
      ("laplacian", "hessian"): lambda p: hessian_laplacian(lambda q: apply(p, q), interior),
      ("loss + grad", "forward"): jax.value_and_grad(
          lambda p: sp.poisson_loss(lambda q: apply(p, q), interior, boundary, **loss_kw)[0]),
      ("loss + grad", "hessian"): jax.value_and_grad(
          lambda p: hessian_poisson_loss(lambda q: apply(p, q), interior, boundary, **loss_kw)),
  }
  runs = {}
  for key, fn in _common.progress(fns.items(), desc=f"{NAME} compile Laplacians"):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params).compile()
    compile_s = time.perf_counter() - start
    value = jax.block_until_ready(compiled(params))  # Warm up; kept for the comparison.
    runs[key] = {"compiled": compiled, "value": value, "compile_s": compile_s,
                 "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20}
  for what, repeats in (("laplacian", config.poisson_repeats), ("loss + grad", config.poisson_grad_repeats)):
    calls = {method: lambda run=runs[(what, method)]: run["compiled"](params) for method in ("forward", "hessian")}
    for method, times in _common.time_interleaved(calls, repeats, desc=f"{NAME} time {what}").items():
      runs[(what, method)]["times"] = times

  fwd_lap, hess_lap = runs[("laplacian", "forward")]["value"], runs[("laplacian", "hessian")]["value"]
  (fwd_loss, fwd_grad), (hess_loss, hess_grad) = (runs[("loss + grad", m)]["value"] for m in ("forward", "hessian"))
  check = {
      "laplacian": {"max_abs_diff": _max_abs(fwd_lap, hess_lap), "max_abs": _max_abs_value(fwd_lap)},
      "loss + grad": {"max_abs_diff": max(_max_abs(fwd_loss, hess_loss), _max_abs(fwd_grad, hess_grad)),
                      "loss_abs_diff": _max_abs(fwd_loss, hess_loss), "grad_max_abs_diff": _max_abs(fwd_grad, hess_grad),
                      "loss": float(fwd_loss), "grad_max_abs": _max_abs_value(fwd_grad)},
  }
  rows = []
  for what in ("laplacian", "loss + grad"):
    row = {"what": what, **check[what]}
    for method in ("forward", "hessian"):
      run = runs[(what, method)]
      row.update({f"{method}_{k}": v for k, v in _common.milliseconds(run["times"]).items()})
      row.update({f"{method}_temp_MiB": run["temp_MiB"], f"{method}_compile_s": run["compile_s"],
                  f"{method}_repeats": len(run["times"])})
    row["time_forward_over_hessian"] = row["forward_median_ms"] / row["hessian_median_ms"]
    row["memory_forward_over_hessian"] = row["forward_temp_MiB"] / row["hessian_temp_MiB"]
    rows.append(row)
  return {"rows": rows, "params": _common.num_parameters(params), "frequency": frequency,
          "interior_points": int(interior.shape[0]), "boundary_points": int(boundary.shape[0]),
          "architecture": f"LRNN {[2, *net.ranks, 1]}, d={net.projection_width}, h={net.hidden}, sine, omega={net.omega}"}


# --------------------------------------------------------------------------------------------


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  image = bench_image(config)
  poisson = bench_poisson(config)
  backend = jax.default_backend()

  table = _common.markdown_table(
      ["model", "architecture", "params", "activations / point", "step ms min / median / max", "time / SIREN",
       "temp MiB", "memory / SIREN"],
      [[r["model"], r["architecture"], r["params"], r["activations_per_point"], _common.min_median_max(r),
        r["time_vs_siren"],
        r["temp_MiB"], r["memory_vs_siren"]]
       for r in image])
  table += (f"\nImage-fit training step (MSE value_and_grad + Adam) on {config.batch} coordinates in [-1, 1]^2, "
            f"omega = {config.omega}; {config.repeats} interleaved repeats after compilation, {backend} backend; "
            "temp = XLA compiled memory analysis of the timed executable.\n\n")
  table += _common.markdown_table(
      ["computed", "forward ms min / median / max", "Hessian ms min / median / max", "time fwd / Hess",
       "forward temp MiB", "Hessian temp MiB", "memory fwd / Hess", "max abs diff"],
      [[r["what"], _common.min_median_max(r, "forward_"), _common.min_median_max(r, "hessian_"),
        r["time_forward_over_hessian"], r["forward_temp_MiB"],
        r["hessian_temp_MiB"], r["memory_forward_over_hessian"], f"{r['max_abs_diff']:.3g}"] for r in poisson["rows"]])
  lap, grad = poisson["rows"]
  table += (f"\nPoisson (n = {poisson['frequency']}): {poisson['architecture']} ({poisson['params']} parameters) on the "
            f"{config.poisson_grid} x {config.poisson_grid} grid ({poisson['interior_points']} interior, "
            f"{poisson['boundary_points']} boundary points). forward = sp.laplacian (jvp of jvp); Hessian = trace of "
            "jax.hessian per point (vmapped). \"laplacian\": the Laplacian at the interior points "
            f"(max |Laplacian| {lap['max_abs']:.3g}); \"loss + grad\": value and parameter gradient of App. G's loss "
            f"(loss {grad['loss']:.4g}, max |grad| {grad['grad_max_abs']:.3g}; max abs diff over loss and gradient). "
            f"{config.poisson_repeats} / {config.poisson_grad_repeats} interleaved repeats.\n")

  rows = {r["model"]: r for r in image}
  lrnn, remat = rows["LRNN"], rows["LRNN (remat)"]
  rel = max(lap["max_abs_diff"] / lap["max_abs"], grad["grad_max_abs_diff"] / grad["grad_max_abs"])
  verdict = (f"At ~{rows['SIREN']['params']} parameters the LRNN step takes {lrnn['time_vs_siren']:.2f}x SIREN's "
             f"median time ({remat['time_vs_siren']:.2f}x with remat; paper Table 8: {PAPER_STEP_RATIO}x) and "
             f"{lrnn['memory_vs_siren']:.2f}x its temporary memory ({remat['memory_vs_siren']:.2f}x with remat), "
             f"evaluating {lrnn['activations_per_point'] / rows['SIREN']['activations_per_point']:.1f}x as many "
             "activations per point; the "
             f"forward-mode Laplacian's loss and gradient take {grad['time_forward_over_hessian']:.2f}x the time and "
             f"{grad['memory_forward_over_hessian']:.2f}x the memory of the Hessian trace's, with the same values "
             f"(relative difference {rel:.1e}).")
  result = {"config": config, "preset": preset, "image": image, "poisson": poisson, "table": table,
            "verdict": verdict, "environment": _common.environment()}
  return _common.save(out, result, stem=f"results_{preset}")


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
