"""One process of the multi-host test: trains the tiny digits config and dumps its state.

Launched by tests/test_multihost.py, either as one of several processes on localhost
(`--coordinator=localhost:PORT --num_processes=2 --process_id=i`) or alone (no coordinator),
with the number of simulated CPU devices of this process set by the launcher through
XLA_FLAGS=--xla_force_host_platform_device_count=N. For each method it trains `--steps`
pmapped steps with the same global batch and writes `{out_dir}/{method}_p{process_id}.npz`:

  * `param/<path>`, `stats/<path>`, `banks`: the final state, as host numpy arrays;
  * `index_<step>`: the bank rows of this process's part of each step's batch, (devices, b);
  * `global_index_<step>`: the rows of the whole global batch (the same in every process);
  * `image_ok_<step>`: whether this process's images are exactly `images[index]`;
  * `process_count`, `local_devices`, `global_devices`, `loader_local_rows`.

The launcher compares the files: equal across processes, equal to a one-process run.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def tiny_config(method: str):
  """configs/digits.py:tiny, with the MAG terms weighted so that they change the result."""
  import digits  # pylint: disable=g-import-not-at-top  (configs/digits.py)
  c = digits.get_config("tiny")
  c.method = method
  c.model.share_encoder = method == "simclr"
  c.metaug.lambda_aug = 0.1
  c.metaug.lambda_mi = 0.1
  c.metaug.inner_lr = 0.1
  return c


def flat_arrays(prefix: str, tree) -> dict:
  """{prefix/path: numpy array} for every leaf of a pytree (paths from jax.tree_util)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(jax.device_get(leaf))
          for path, leaf in leaves}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--coordinator", default="", help="host:port; empty = one process")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--methods", default="cmc,metaug")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out_dir", required=True)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top  (after the launcher's XLA_FLAGS)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaug_jax import parallel, train  # pylint: disable=g-import-not-at-top

  if args.coordinator:
    parallel.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                          args.process_id)
  os.makedirs(args.out_dir, exist_ok=True)
  for method in filter(None, args.methods.split(",")):
    config = tiny_config(method)
    exp = train.build_experiment(config)
    state = exp.init_state()
    step_fn = parallel.pmap_step(exp.method.train_step, exp.devices)
    record = {}
    for step in range(args.steps):
      batch = exp.loader.batch_at(step)
      record[f"index_{step}"] = batch["index"]
      record[f"global_index_{step}"] = exp.loader.global_indices_at(step)
      record[f"image_ok_{step}"] = np.array(np.array_equal(
          batch["image"], exp.dataset.pretrain_images[batch["index"]]))
      state, _ = step_fn(state, batch)
    record.update(flat_arrays("param", state.params))
    record.update(flat_arrays("stats", state.batch_stats))
    if state.banks is not None:
      record["banks"] = np.asarray(jax.device_get(state.banks))
    record.update(process_count=np.array(jax.process_count()),
                  local_devices=np.array(len(exp.devices)),
                  global_devices=np.array(jax.device_count()),
                  loader_local_rows=np.array(exp.loader.num_devices *
                                             exp.loader.per_device_batch_size))
    path = os.path.join(args.out_dir, f"{method}_p{jax.process_index()}.npz")
    np.savez(path, **record)
    print(f"process {jax.process_index()}/{jax.process_count()}: wrote {path}", flush=True)
  if args.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
