"""PNG diagnostics of a training workdir, drawn with matplotlib's Agg canvas (no display).

Files read (each optional; a plot whose data are missing is skipped):
  * metrics.jsonl     one JSON object per logged step (train.MetricWriter);
  * score_hist.jsonl  the monitor's positive / negative similarity histograms (monitor.py);
  * embedding_2d.npz  2-D coordinates and labels of test embeddings (`save_embedding`).
Files written:
  * curves.png        loss terms, OUCL parts, margin term, bank scores, MAG gradient norms
                      (direct vs second-order, log scale), encoder gradient norm, kNN accuracy;
  * score_hist.png    positive vs negative cosine-similarity histograms, one panel per recorded
                      step (the Feature-Transformation paper's view of training,
                      docs/contrastive_baselines.md §9);
  * score_stats.png   the batch aggregates of the positive score and of the negatives' mean and
                      variance a feature augmenter logs before and after transforming the batch
                      (score_* metrics, docs/feature_transformation.md);
  * embedding_2d.png  t-SNE (or UMAP when `umap` is importable) of test embeddings by class.

`write_diagnostics(exp, state, workdir)` is what the training loop calls once at the end: it
computes the 2-D embedding, saves it and draws everything, logging (never raising) any error,
so a plotting problem cannot cost a finished run. `write_all(workdir)` redraws from the files
alone, e.g. in a notebook while a run is going.
"""

import json
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metaug_jax.evaluation import features as features_lib
from metaug_jax.evaluation import monitor as monitor_lib

METRICS_FILE = "metrics.jsonl"
EMBEDDING_FILE = "embedding_2d.npz"
CURVES_PNG, SCORE_HIST_PNG, EMBEDDING_PNG = "curves.png", "score_hist.png", "embedding_2d.png"
SCORE_STATS_PNG = "score_stats.png"
# Metric keys of the score-distribution statistics (augmenters/score_stats.py), drawn in
# score_stats.png rather than curves.png: score_{pos,neg}_{mean,var}_{pre,post}.
SCORE_STATS_PREFIX = "score_"
SCORE_STATS = (("pos_mean", "positive score: batch mean"),
               ("pos_var", "positive score: batch variance"),
               ("neg_mean", "negatives: batch mean of the per-anchor mean"),
               ("neg_var", "negatives: batch mean of the per-anchor variance"))
SCORE_STAGES = (("pre", "before the transformation", "--"),
                ("post", "after (what the loss sees)", "-"))
MAX_HIST_PANELS = 6
# Totals drawn dashed, so the parts they are (nearly) equal to stay visible beneath them.
_DASHED = ("mag_grad_norm", "meta_loss")

# (panel title, metric keys, log-scale y); a panel is drawn when any of its keys was logged.
CURVE_PANELS = (
    ("loss", ("loss", "loss_total", "meta_loss"), False),
    ("OUCL terms", ("oucl", "oucl_aug"), False),
    ("margin-injected regulariser", ("margin",), False),
    ("bank scores (train batch)", ("pos_mean", "neg_mean", "aug_pos_mean", "aug_neg_mean"),
     False),
    ("MAG gradient norm", ("mag_grad_direct_norm", "mag_grad_second_order_norm",
                           "mag_grad_norm"), True),
    ("encoder gradient / update norm", ("grad_norm", "update_norm"), True),
    ("monitor cosine (augmented views)", ("monitor_pos_mean", "monitor_neg_mean"), False),
    ("kNN accuracy (%)", ("knn_acc",), False),
)


# ---- reading -------------------------------------------------------------------------------


def read_jsonl(path: str) -> list:
  """The JSON objects of a JSON-lines file; [] when absent. Unparsable lines (e.g. a line cut
  short by a killed run) are skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
  return records


def metric_series(records: Sequence[dict]) -> dict:
  """{key: (steps, values)} sorted by step; a step logged twice (a resumed run re-logs the
  steps after its checkpoint) keeps its last value; non-finite values are dropped."""
  per_key = {}
  for r in records:
    step = int(r["step"])
    for k, v in r.items():
      if k == "step" or isinstance(v, (list, dict, str)) or v is None:
        continue
      if math.isfinite(float(v)):
        per_key.setdefault(k, {})[step] = float(v)
  return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in
          per_key.items()}


def _last_per_step(records: Sequence[dict]) -> list:
  by_step = {int(r["step"]): r for r in records}
  return [by_step[s] for s in sorted(by_step)]


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)  # render with Agg: no display, no pyplot state
  return fig


# ---- drawing -------------------------------------------------------------------------------


# Logged keys that are not training curves (or are drawn elsewhere).
_NOT_CURVES = ("steps_per_sec",)
MAX_EXTRA_PANELS = 6


def curve_panels(series: dict) -> list:
  """[(title, keys, log y)] to draw: the panels of CURVE_PANELS with a logged key, then one
  panel per other metric a method logs (a new method's own diagnostics, e.g. BYOL's
  target_decay), up to MAX_EXTRA_PANELS."""
  panels = [(title, [k for k in keys if k in series], log)
            for title, keys, log in CURVE_PANELS]
  panels = [p for p in panels if p[1]]
  known = {k for _, keys, _ in CURVE_PANELS for k in keys} | set(_NOT_CURVES)
  extra = sorted(k for k in series if k not in known
                 and not k.startswith(("monitor_", "hist_", SCORE_STATS_PREFIX))
                 and not k.endswith("_std"))  # spreads go with the means drawn above
  return panels + [(k, [k], False) for k in extra[:MAX_EXTRA_PANELS]]


def plot_curves(series: dict, path: str) -> Optional[str]:
  """curves.png from `metric_series` output; None when no metric is present."""
  panels = curve_panels(series)
  if not panels:
    return None
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig = _new_figure(5.0 * cols, 3.4 * rows)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (title, keys, log) in zip(axes, panels):
    for key in keys:
      steps, values = series[key]
      if log:
        keep = values > 0
        steps, values = steps[keep], values[keep]
      if steps.size:
        ax.plot(steps, values, marker="o" if steps.size < 20 else None, markersize=3,
                linestyle="--" if key in _DASHED else "-", label=key)
    if log:
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=8)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.savefig(path)
  return path


def plot_score_hist(records: Sequence[dict], path: str,
                    max_panels: int = MAX_HIST_PANELS) -> Optional[str]:
  """score_hist.png: positive vs negative similarity densities at up to `max_panels` steps
  (evenly spaced over the recorded ones, always the first and the last)."""
  records = [r for r in _last_per_step(records)
             if {"bin_edges", "pos_counts", "neg_counts"} <= set(r)]
  if not records:
    return None
  pick = np.unique(np.linspace(0, len(records) - 1, min(max_panels, len(records))).round())
  records = [records[int(i)] for i in pick]
  cols = min(3, len(records))
  rows = -(-len(records) // cols)
  fig = _new_figure(4.2 * cols, 3.2 * rows)
  axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
  for ax, r in zip(axes, records):
    edges = np.asarray(r["bin_edges"], np.float64)
    widths = np.diff(edges)
    for name, colour, label in (("pos_counts", "tab:blue", "positive (same image)"),
                                ("neg_counts", "tab:red", "negative (other images)")):
      counts = np.asarray(r[name], np.float64)
      density = counts / max(counts.sum(), 1.0) / widths
      ax.stairs(density, edges, fill=True, alpha=0.35, color=colour, label=label)
      ax.stairs(density, edges, color=colour)
    title = f"step {int(r['step'])}"
    if "knn_acc" in r:
      title += f"  (kNN {float(r['knn_acc']):.1f}%)"
    ax.set_title(title)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("cosine similarity of embeddings")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("density")
  axes[0].legend(fontsize=8, loc="upper left")
  for ax in axes[len(records):]:
    ax.set_visible(False)
  fig.suptitle("positive / negative score distributions during training")
  fig.savefig(path)
  return path


def plot_score_stats(series: Sequence[dict], path: str,
                     labels: Optional[Sequence[str]] = None,
                     title: str = "score distributions before / after the feature transformation"
                     ) -> Optional[str]:
  """score_stats.png: one panel per statistic of SCORE_STATS against the step, the value
  before the transformation dashed and after solid.

  `series` is one `metric_series` output per run; several runs (a hyper-parameter sweep,
  `labels` naming each) share the panels, one colour per run. None when no run logged any
  score_* statistic.
  """
  def key(stat, stage):
    return f"{SCORE_STATS_PREFIX}{stat}_{stage}"

  present = [stat for stat, _ in SCORE_STATS
             if any(key(stat, stage) in s for s in series for stage, _, _ in SCORE_STAGES)]
  if not present:
    return None
  labels = list(labels) if labels is not None else [None] * len(series)
  fig = _new_figure(5.0 * min(2, len(present)), 3.6 * -(-len(present) // 2))
  axes = fig.subplots(-(-len(present) // 2), min(2, len(present)), squeeze=False).ravel()
  colours = [f"C{i % 10}" for i in range(len(series))]
  for ax, stat in zip(axes, present):
    for run, label, colour in zip(series, labels, colours):
      for stage, stage_name, style in SCORE_STAGES:
        if key(stat, stage) not in run:
          continue
        steps, values = run[key(stat, stage)]
        name = stage_name if label is None else f"{label}, {stage}"
        ax.plot(steps, values, linestyle=style, color=colour, label=name,
                marker="o" if steps.size < 20 else None, markersize=3)
    ax.set_title(dict(SCORE_STATS)[stat])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  for ax in axes[len(present):]:
    ax.set_visible(False)
  fig.suptitle(title)
  fig.savefig(path)
  return path


def plot_embedding(xy: np.ndarray, labels: np.ndarray, path: str,
                   title: str = "test embeddings") -> Optional[str]:
  """embedding_2d.png: a scatter of (N, 2) points coloured by integer class label."""
  xy, labels = np.asarray(xy), np.asarray(labels).astype(np.int64)
  if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
    return None
  classes = np.unique(labels)
  fig = _new_figure(6.4, 5.6)
  ax = fig.subplots()
  cmap = "tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "nipy_spectral"
  points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, s=9, alpha=0.85,
                      vmin=labels.min() - 0.5, vmax=labels.max() + 0.5, linewidths=0)
  if classes.size <= 20:
    handles, names = points.legend_elements(num=list(classes))
    ax.legend(handles, names, title="class", fontsize=7, loc="center left",
              bbox_to_anchor=(1.0, 0.5))
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.savefig(path)
  return path


def write_all(workdir: str) -> list:
  """Draws every diagnostic whose input file exists in `workdir`; returns the PNGs written.

  Each plot is independent: an error in one is logged and the others are still drawn.
  """
  written = []
  metrics = read_jsonl(os.path.join(workdir, METRICS_FILE))
  hists = read_jsonl(os.path.join(workdir, monitor_lib.SCORE_HIST_FILE))

  def curves(path):
    series = metric_series(metrics)
    if "knn_acc" not in series:  # the loop may log kNN accuracy only in score_hist.jsonl
      knn_series = metric_series([{"step": r["step"], "knn_acc": r["knn_acc"]}
                                  for r in hists if "knn_acc" in r])
      series.update(knn_series)
    return plot_curves(series, path)

  def embedding(path):
    file = os.path.join(workdir, EMBEDDING_FILE)
    if not os.path.exists(file):
      return None
    with np.load(file) as data:
      title = str(data["title"]) if "title" in data else "test embeddings"
      return plot_embedding(data["xy"], data["labels"], path, title)

  jobs = ((CURVES_PNG, curves), (SCORE_HIST_PNG, lambda p: plot_score_hist(hists, p)),
          (SCORE_STATS_PNG, lambda p: plot_score_stats([metric_series(metrics)], p)),
          (EMBEDDING_PNG, embedding))
  for name, draw in jobs:
    try:
      path = draw(os.path.join(workdir, name))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not draw %s: %s: %s", name, type(e).__name__, e)
      continue
    if path:
      written.append(path)
  return written


# ---- the 2-D embedding ---------------------------------------------------------------------


def _umap_or_none():
  try:
    import umap  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return umap


def reduce_to_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
  """(N, F) -> ((N, 2) float32, method name): UMAP if importable, else t-SNE; PCA for N < 10.

  Rows are L2-normalised first, so Euclidean distances rank pairs as cosine similarity does.
  """
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  n = x.shape[0]
  if n < 10:  # too few points for t-SNE's perplexity; a (zero-padded) PCA map instead
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
    xy = PCA(n_components=min(2, n, x.shape[1]), random_state=seed).fit_transform(x)
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))).astype(np.float32), "PCA"
  umap = _umap_or_none()
  if umap is not None:
    xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    return np.asarray(xy, np.float32), "UMAP"
  from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
  from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel
  perplexity = float(min(30.0, (n - 1) / 3.0))
  # One thread: sklearn's OpenMP threads spin-wait on cores that XLA (or other jobs) keep
  # busy, which made t-SNE of 1000 points 4-10x slower than single-threaded on a loaded CPU.
  with threadpool_limits(1):
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca",
              random_state=seed).fit_transform(x)
  return np.asarray(xy, np.float32), "t-SNE"


def embedding_points(exp, state, max_points: int) -> tuple[np.ndarray, np.ndarray, str]:
  """2-D map of the `embedding` features of up to `max_points` test images of `exp`.

  Uses the eval views and the frozen encoder (eval-mode BatchNorm); a seeded subset of the
  test set (of the train set when there is none). Returns (xy (n, 2), labels (n,), method
  name), labels all 0 for unlabelled data.
  """
  data, config = exp.dataset, exp.config
  images, labels = data.test_images, data.test_labels
  if images is None or images.shape[0] == 0:
    images, labels = data.train_images, data.train_labels
  if labels is None:
    labels = np.zeros((images.shape[0],), np.int32)
  rng = np.random.default_rng(int(config.seed))
  idx = np.sort(rng.permutation(images.shape[0])[:max(1, int(max_points))])
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  embed = features_lib.method_extractor(exp.method, config.data, int(config.eval.batch_size),
                                        exp.devices, names=("embedding",))
  feats = embed(params, batch_stats, images[idx])["embedding"]
  xy, name = reduce_to_2d(feats, int(config.seed))
  return xy, np.asarray(labels)[idx].astype(np.int32), name


def save_embedding(workdir: str, xy: np.ndarray, labels: np.ndarray, title: str) -> str:
  """Writes workdir/embedding_2d.npz (xy, labels, title) for `write_all`."""
  path = os.path.join(workdir, EMBEDDING_FILE)
  np.savez(path, xy=np.asarray(xy, np.float32), labels=np.asarray(labels, np.int32),
           title=np.asarray(title))
  return path


def write_diagnostics(exp, state, workdir: str) -> list:
  """End-of-training diagnostics: the 2-D embedding of `state`, then every PNG of write_all.

  Does nothing unless config.eval.plots is set, and only on process 0. Never raises: any
  error is logged as a warning and the PNGs that could be drawn are still returned.
  """
  try:
    if not exp.config.eval.plots or jax.process_index() != 0:
      return []
    max_points = int(exp.config.eval.tsne_max_points)
    if max_points > 0:
      try:
        xy, labels, name = embedding_points(exp, state, max_points)
        save_embedding(workdir, xy, labels,
                       f"{name} of {xy.shape[0]} test embeddings ({exp.config.dataset}, "
                       f"{exp.config.method}, step {int(jax.device_get(state.step))})")
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not compute the 2-D embedding: %s: %s", type(e).__name__, e)
    written = write_all(workdir)
    if written:
      print("diagnostics: " + ", ".join(os.path.basename(p) for p in written), flush=True)
    return written
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("diagnostic plots failed: %s: %s", type(e).__name__, e)
    return []
