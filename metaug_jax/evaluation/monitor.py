"""Online monitor: kNN accuracy and positive / negative score distributions during training.

Every `config.eval.monitor_every_steps` steps the training loop hands the current parameters to
`Monitor.run`, which evaluates the frozen encoder (BatchNorm in eval mode) on fixed subsets
chosen once at construction:

  * kNN accuracy (knn.py, k = eval.knn_k, T = eval.knn_temperature) of `eval.monitor_examples`
    test images against a memory of up to MEMORY_EXAMPLES labelled train images, on the
    `embedding` features of the deterministic eval views (all views' embeddings concatenated);
  * the cosine-similarity distributions that the Feature-Transformation paper plots
    (docs/contrastive_baselines.md §9): positives = view 0's embedding vs view 1's embedding
    of the *same* image under two training augmentations (for one-encoder-per-view methods,
    encoder 0 on view 0 against encoder 1 on view 1, i.e. the pair the contrastive loss pulls
    together), negatives = the same two embeddings of *different* images. The augmentation
    keys are fixed, so successive histograms differ only through the parameters.

Histograms (fixed bins over [-1, 1]) are appended with the step to `workdir/score_hist.jsonl`
for plots.py. The monitor reads the parameters only: it never touches the train state or its
RNG, so a monitored run trains exactly like an unmonitored one.
"""

import json
import os
from typing import Optional

import chex
import jax
import numpy as np

from metaug_jax.data import views as views_lib
from metaug_jax.evaluation import features as features_lib
from metaug_jax.evaluation import knn

MEMORY_EXAMPLES = 2000          # labelled train images in the kNN memory (at most)
HIST_BINS = 50
HIST_RANGE = (-1.0, 1.0)
SCORE_HIST_FILE = "score_hist.jsonl"
_SUBSET_SEED_OFFSET = 7919      # subsets / augmentation keys: independent of the training RNG


def score_histograms(z0: np.ndarray, z1: np.ndarray) -> dict:
  """Positive (diagonal) and negative (off-diagonal) cosine statistics of two (P, D) sets.

  Row i of z0 and row i of z1 are two embeddings of the same image; every other pairing is a
  negative. Returns counts over HIST_BINS fixed bins on HIST_RANGE plus means and stds.
  """
  chex.assert_equal_shape([z0, z1])
  chex.assert_rank(z0, 2)
  unit = lambda z: z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  sims = unit(np.asarray(z0, np.float64)) @ unit(np.asarray(z1, np.float64)).T
  diag = np.eye(sims.shape[0], dtype=bool)
  pos, neg = sims[diag], sims[~diag]
  edges = np.linspace(HIST_RANGE[0], HIST_RANGE[1], HIST_BINS + 1)
  clip = lambda s: np.clip(s, HIST_RANGE[0], HIST_RANGE[1])  # rounding can exceed +-1
  return {"bin_edges": edges.tolist(),
          "pos_counts": np.histogram(clip(pos), edges)[0].tolist(),
          "neg_counts": np.histogram(clip(neg), edges)[0].tolist(),
          "pos_mean": float(pos.mean()), "pos_std": float(pos.std()),
          "neg_mean": float(neg.mean()) if neg.size else 0.0,
          "neg_std": float(neg.std()) if neg.size else 0.0}


class Monitor:
  """kNN accuracy and score histograms of the frozen encoder on fixed subsets (see module doc).

  Build once, before the loop, with `Monitor.maybe_create(exp, workdir)`; call `run` when `due`.
  """

  def __init__(self, exp, workdir: Optional[str] = None,
               memory_examples: int = MEMORY_EXAMPLES):
    """Picks the subsets and builds the embedder (features.Extractor over exp.devices).

    Args:
      exp: the train.Experiment (config, dataset and method are read).
      workdir: where score_hist.jsonl is appended (process 0 only); None writes nothing.
      memory_examples: at most this many labelled train images form the kNN memory.
    """
    config, data = exp.config, exp.dataset
    if data.train_labels is None or data.test_images is None or data.test_labels is None:
      raise ValueError(f"dataset {data.name!r} has no labelled train and test sets; the "
                       f"monitor needs both (set config.eval.monitor_every_steps=0).")
    ec = config.eval
    if int(ec.knn_k) < 1 or float(ec.knn_temperature) <= 0:
      raise ValueError(f"config.eval.knn_k must be >= 1 and config.eval.knn_temperature > 0, "
                       f"got {ec.knn_k} and {ec.knn_temperature}.")
    self.every = int(ec.monitor_every_steps)
    self.k, self.temperature = int(ec.knn_k), float(ec.knn_temperature)
    self.num_classes = int(data.num_classes)
    self.batch_size = int(ec.batch_size)
    self.path = os.path.join(workdir, SCORE_HIST_FILE) if workdir else None
    rng = np.random.default_rng(int(config.seed) + _SUBSET_SEED_OFFSET)
    n_mem = min(int(memory_examples), data.train_images.shape[0])
    n_test = min(int(ec.monitor_examples), data.test_images.shape[0])
    mem_idx = np.sort(rng.permutation(data.train_images.shape[0])[:n_mem])
    test_idx = np.sort(rng.permutation(data.test_images.shape[0])[:n_test])
    self.memory_images = data.train_images[mem_idx]
    self.memory_labels = data.train_labels[mem_idx].astype(np.int32)
    self.test_images = data.test_images[test_idx]
    self.test_labels = data.test_labels[test_idx].astype(np.int32)
    # Score pairs: the first monitor_examples memory images (training distribution), with
    # fixed per-example augmentation keys.
    n_pairs = min(int(ec.monitor_examples), n_mem)
    self.pair_images = self.memory_images[:n_pairs]
    key = jax.random.key(int(config.seed) + _SUBSET_SEED_OFFSET)
    self.pair_keys = np.asarray(jax.random.key_data(jax.random.split(key, n_pairs)))
    self.num_views = views_lib.num_views(config.data)
    self._embed = features_lib.method_extractor(exp.method, config.data, self.batch_size,
                                                exp.devices, names=("embedding",))

  @classmethod
  def maybe_create(cls, exp, workdir: Optional[str] = None) -> Optional["Monitor"]:
    """A Monitor, or None when eval.monitor_every_steps <= 0 or the data have no labels."""
    data = exp.dataset
    if int(exp.config.eval.monitor_every_steps) <= 0:
      return None
    if data.train_labels is None or data.test_images is None or data.test_labels is None:
      return None
    return cls(exp, workdir)

  def due(self, step: int, final_step: Optional[int] = None) -> bool:
    """Whether to monitor after `step`: every `eval.monitor_every_steps` steps (step 0, the
    initial state, included) and at `final_step` when given."""
    return self.every > 0 and (step % self.every == 0 or step == final_step)

  def evaluate(self, params, batch_stats) -> tuple[dict, dict]:
    """(scalar metrics, histogram record) of host parameters; pure, writes nothing."""
    embed = lambda images, keys=None: self._embed(params, batch_stats, images,
                                                  keys=keys)["embedding"]
    acc = knn.knn_accuracy(embed(self.memory_images), self.memory_labels,
                           embed(self.test_images), self.test_labels, self.num_classes, self.k,
                           self.temperature)
    # View v's embedding of each pair image under its fixed training augmentation.
    z = features_lib.split_views(embed(self.pair_images, self.pair_keys), self.num_views)
    chex.assert_rank(z, 3)
    hist = score_histograms(z[0], z[1])
    metrics = {"knn_acc": acc, "monitor_pos_mean": hist["pos_mean"],
               "monitor_pos_std": hist["pos_std"], "monitor_neg_mean": hist["neg_mean"],
               "monitor_neg_std": hist["neg_std"]}
    return metrics, {"knn_acc": acc, **hist}

  def run(self, step: int, state) -> dict:
    """Evaluates `state`'s parameters, appends the histograms to score_hist.jsonl, returns
    {knn_acc, monitor_pos_mean, monitor_pos_std, monitor_neg_mean, monitor_neg_std}.

    `state` is only read (params and batch_stats are copied to the host first), so its
    buffers may be donated to the next step afterwards.
    """
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    metrics, record = self.evaluate(params, batch_stats)
    if self.path and jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **record}) + "\n")
    return metrics
