"""One process of a multi-process (multi-host) adapter training run, on loopback with CPU collectives.

Run by tests/test_distributed.py as two processes; by hand:

  python tests/distributed_worker.py --process-id 0 --num-processes 2 --port 12355 --out /tmp/p0.npz &
  python tests/distributed_worker.py --process-id 1 --num-processes 2 --port 12355 --out /tmp/p1.npz

Each process owns 2 CPU devices; the 4 global devices form a (data=2, model=2) mesh, so the data
axis spans the processes (as hosts do in a real multi-host job) and the model axis lies within
each process. Every process builds the same base parameters and LoRA adapters from the same keys,
feeds only its own half of the global batch (``jax.make_array_from_process_local_data``), and runs
the same jitted training step; gradients are averaged over the global batch by XLA's collectives
(gloo over TCP). At the end each process gathers the adapters and writes them, with the losses, to
``--out``. :func:`train` with ``mesh=None`` is the single-device reference the test compares with.

On a real cluster the only differences are the coordinator address (host 0's address), the
process count and id (often set by the cluster environment, so ``jax.distributed.initialize()``
can take no arguments) and the accelerator devices in place of CPU ones.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import spectral_peft as sp  # noqa: E402

FEATURES, HIDDEN, GLOBAL_BATCH, STEPS = 8, 16, 8, 4
RULES = {r"mlp_in/kernel$": P(None, "model"), r"mlp_in/bias$": P("model"), r"mlp_out/kernel$": P("model", None)}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(FEATURES, name="mlp_out")(nn.tanh(nn.Dense(HIDDEN, name="mlp_in")(x)))


def problem():
  """Base parameters, LoRA adapters and the global batch: identical in every process (same keys)."""
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (GLOBAL_BATCH, FEATURES))
  y = jnp.sin(3.0 * x)
  params = model.init(jax.random.key(0), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(2), params, sp.peft.LoRA(rank=2, alpha=4.0), r"kernel$")
  return model, params, adapters, np.asarray(x), np.asarray(y)


def train(mesh=None, process_index=0, process_count=1):
  """Trains the adapters for ``STEPS`` Adam steps; returns ``(adapters, losses)`` as host arrays.

  With a mesh, parameters and adapters are global arrays sharded by ``RULES`` and
  :func:`sp.peft.adapter_shardings`, and this process contributes rows
  ``[process_index * B / process_count, ...)`` of the global batch ``B``.
  """
  model, params, adapters, x, y = problem()
  tx = optax.adam(3e-2)

  def step(adapters, opt_state, params, x, y):
    def loss(adapters):
      return jnp.mean(jnp.square(model.apply({"params": sp.peft.merge(params, adapters)}, x) - y))

    value, grads = jax.value_and_grad(loss)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  if mesh is None:
    step = jax.jit(step)
  else:
    params_shardings = sp.peft.path_shardings(params, mesh, RULES)
    adapters_shardings = sp.peft.adapter_shardings(adapters, params_shardings)

    # Every process holds the same full values (same keys), so device_put can place them globally.
    params = jax.device_put(params, params_shardings)
    adapters = sp.peft.shard_adapters(adapters, params)
    batch = NamedSharding(mesh, P("data"))
    rows = slice(process_index * GLOBAL_BATCH // process_count, (process_index + 1) * GLOBAL_BATCH // process_count)
    x = jax.make_array_from_process_local_data(batch, x[rows], x.shape)
    y = jax.make_array_from_process_local_data(batch, y[rows], y.shape)
    step = jax.jit(step, out_shardings=(adapters_shardings, None, NamedSharding(mesh, P())))

  opt_state = tx.init(adapters)
  losses = []
  for _ in range(STEPS):
    adapters, opt_state, value = step(adapters, opt_state, params, x, y)
    losses.append(value)
  if mesh is not None:
    from jax.experimental import multihost_utils

    adapters = multihost_utils.process_allgather(adapters, tiled=True)
    losses = multihost_utils.process_allgather(jnp.stack(losses), tiled=True)
  return jax.tree.map(np.asarray, adapters), np.asarray(losses)


def flat_arrays(adapters, losses):
  """``{name: array}`` for ``np.savez``: every adapter leaf by its path, plus the losses."""
  out = {f"{path}/{name}": np.asarray(leaf) for path, adapter in adapters.items() for name, leaf in adapter.params.items()}
  out["losses"] = np.asarray(losses)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}",
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=120,
  )
  assert jax.process_count() == args.num_processes and jax.device_count() == 2 * args.num_processes
  mesh = sp.peft.data_model_mesh(model=2)
  # The data axis spans processes, the model axis stays within one.
  assert all(len({d.process_index for d in row}) == 1 for row in mesh.devices), mesh.devices
  adapters, losses = train(mesh, jax.process_index(), jax.process_count())
  np.savez(args.out, **flat_arrays(adapters, losses))
  print(f"process {jax.process_index()} losses {losses.tolist()}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
