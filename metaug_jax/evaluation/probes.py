"""The evaluation protocol (docs/implementation.md §9.2): every probe of a frozen encoder (or of
raw pixels), on features extracted once per split.

For each linear-probe level (`linear_probe.LEVELS` the features contain; `pixels` for the
raw-pixel floor), standardised with the training features' moments:

  * `linear`: all training labels; final-epoch test accuracy (and the paper's best epoch);
    with eval.probe_augment the paper's augmented-views protocol instead;
  * `few_label`: each fraction of eval.few_label_fractions of every class's labels, over
    eval.few_label_draws seeded draws (mean ± std of the final-epoch test accuracy);
  * `val_selected`: fitted on the training set minus a stratified eval.val_fraction split,
    epoch (and eval.val_lrs x eval.val_weight_decays) chosen on that split, test accuracy
    reported at the choice;

and for each level of eval.knn_levels, `knn`: the weighted kNN classifier (knn.py) with the
whole training set as memory. Label draws and the validation split are functions of the seed
(config.seed), so methods compared at one seed see the same labels. The results are one JSON
dict ({probe: {level: ...}, "protocol": ...}); `columns` flattens it to one number per
(probe, level), the cells of every results table.
"""

from typing import Optional, Sequence

import numpy as np

from metaug_jax import config_check
from metaug_jax.evaluation import features as features_lib
from metaug_jax.evaluation import knn, linear_probe, splits, tables

PROBES = ("linear", "few_label", "val_selected", "knn")
PIXELS = "pixels"


# Levels are fitted side by side (zero-padded to one width: one compilation for all of them)
# while their padded stack of training features stays below this size, where compiling costs
# more than fitting; larger ones one at a time, where the padding's arithmetic would cost more
# (Fashion-MNIST's 10k x 6272 conv features beside 512 fc ones: about twice the work).
SIDE_BY_SIDE_BYTES = 64 << 20


def check_labels(dataset) -> None:
  """Raises ProbeNeedsLabelsError (one line) unless the train and test sets are labelled."""
  if dataset.train_labels is None or dataset.test_images is None \
      or dataset.test_labels is None:
    raise linear_probe.ProbeNeedsLabelsError(
        f"dataset {dataset.name!r} has no labels (or no labelled test set), so no probe can "
        f"run; give the data class sub-folders (folder) or a 'y' array (npz), or pass "
        f"--config.eval.probe_after_training=False to only pre-train.")


def few_label_key(fraction: float) -> str:
  """The JSON key of a label fraction: 0.01 -> '0.01'."""
  return f"{float(fraction):g}"


def _level_groups(levels: list, train: dict) -> list:
  """The levels as groups fitted side by side: all together, or one by one when the padded
  stack would exceed SIDE_BY_SIDE_BYTES."""
  if not levels:
    return []
  n = train[levels[0]].shape[0]
  width = max(train[lvl].shape[1] for lvl in levels)
  return [levels] if 4 * n * width * len(levels) <= SIDE_BY_SIDE_BYTES else [[l] for l in levels]


def _linear_probes(xs: list, xs_test: list, y, y_test, num_classes: int, ec, seed: int,
                   subsets: dict, validation) -> list:
  """The linear probes of standardised levels fitted side by side: per level {"linear": ...,
  "few_label": {fraction key: ...}, "val_selected": ...} (the last two when configured)."""
  settings = linear_probe.ProbeSettings.from_config(ec)
  out = [{"linear": r} for r in linear_probe.full_probes(xs, y, xs_test, y_test, num_classes,
                                                         settings, seed)]
  for fraction, draws in subsets.items():
    few = linear_probe.few_label_probes(xs, y, xs_test, y_test, num_classes, draws, settings,
                                        seed)
    for per_level, r in zip(out, few):
      per_level.setdefault("few_label", {})[few_label_key(fraction)] = r
  if validation is not None:
    fit, val = validation
    chosen = linear_probe.validation_selected_probes(
        [x[fit] for x in xs], y[fit], [x[val] for x in xs], y[val], xs_test, y_test,
        num_classes, settings, seed, lrs=tuple(ec.val_lrs),
        weight_decays=tuple(ec.val_weight_decays))
    for per_level, r in zip(out, chosen):
      per_level["val_selected"] = r
  return out


def evaluate_features(train: dict, test: dict, train_labels: np.ndarray,
                      test_labels: np.ndarray, num_classes: int, eval_config, seed: int,
                      linear_levels: Sequence[str] = linear_probe.LEVELS,
                      knn_levels: Optional[Sequence[str]] = None) -> dict:
  """Every probe on given features: {level: (N, F)} of the training and test sets.

  Args:
    train, test: features per level (levels absent from `train` are skipped).
    train_labels, test_labels: int labels in [0, num_classes).
    eval_config: config.eval (probe settings, fractions, draws, validation, kNN).
    seed: the label draws', validation split's and probes' seed.
    linear_levels: the levels the linear probes fit.
    knn_levels: the levels of the kNN (None: eval.knn_levels).

  Returns:
    {"linear": {level: ...}, "few_label": {level: {fraction: ...}}, "val_selected":
    {level: ...}, "knn": {level: ...}, "protocol": {...}}; accuracies in percent.
  """
  ec = eval_config
  y, y_test = np.asarray(train_labels, np.int32), np.asarray(test_labels, np.int32)
  fractions = tuple(float(f) for f in ec.few_label_fractions)
  draws, val_fraction = int(ec.few_label_draws), float(ec.val_fraction)
  subsets = {f: [splits.few_label_subset(y, f, seed, d) for d in range(draws)]
             for f in fractions}
  try:
    validation = splits.validation_split(y, val_fraction, seed) if val_fraction > 0 else None
  except ValueError as e:  # too few labels per class for the configured split: a config error
    raise config_check.ConfigError(str(e)) from None
  results = {probe: {} for probe in PROBES}
  for group in _level_groups([lvl for lvl in linear_levels if lvl in train], train):
    standardise = [linear_probe.standardiser(train[lvl]) for lvl in group]
    fitted = _linear_probes([f(train[lvl]) for f, lvl in zip(standardise, group)],
                            [f(test[lvl]) for f, lvl in zip(standardise, group)], y, y_test,
                            num_classes, ec, seed, subsets, validation)
    for level, per_level in zip(group, fitted):
      for probe, r in per_level.items():
        results[probe][level] = r
  k, temperature = int(ec.knn_k), float(ec.knn_temperature)
  for level in (lvl for lvl in (ec.knn_levels if knn_levels is None else knn_levels)
                if lvl in train):
    results["knn"][level] = {
        "dim": int(train[level].shape[1]), "k": k, "temperature": temperature,
        "test_acc": knn.knn_accuracy(train[level], y, test[level], y_test, num_classes, k,
                                     temperature)}
  results["protocol"] = {
      "seed": int(seed), "probe_epochs": int(ec.probe_epochs), "probe_lr": float(ec.probe_lr),
      "probe_weight_decay": float(ec.probe_weight_decay),
      "probe_batch_size": int(ec.probe_batch_size), "few_label_fractions": list(fractions),
      "few_label_draws": draws, "val_fraction": val_fraction, "val_lrs": list(ec.val_lrs),
      "val_weight_decays": list(ec.val_weight_decays), "knn_k": k,
      "knn_temperature": temperature, "train_examples": int(y.shape[0]),
      "test_examples": int(y_test.shape[0])}
  return results


def evaluate(method, params, batch_stats, dataset, config, devices: Optional[Sequence] = None,
             seed: Optional[int] = None) -> dict:
  """Every probe of a frozen encoder (BatchNorm in eval mode) on `dataset`: features of the
  training and test sets extracted once (features.Extractor over `devices`), then
  `evaluate_features`; with eval.probe_augment the full-label probe follows the paper's
  augmented protocol."""
  check_labels(dataset)
  ec = config.eval
  seed = int(config.seed if seed is None else seed)
  extractor = features_lib.method_extractor(
      method, config.data, int(ec.batch_size), devices,
      names=tuple(linear_probe.LEVELS) + tuple(ec.knn_levels))
  train = extractor(params, batch_stats, dataset.train_images)
  test = extractor(params, batch_stats, dataset.test_images)
  results = evaluate_features(train, test, dataset.train_labels, dataset.test_labels,
                              dataset.num_classes, ec, seed)
  if ec.probe_augment:
    clean = tuple({k: v for k, v in f.items() if k in linear_probe.LEVELS}
                  for f in (train, test))
    results["linear"] = linear_probe.probe_augmented(extractor, params, batch_stats, dataset,
                                                     config, seed, clean)
  results["protocol"]["probe_augment"] = bool(ec.probe_augment)
  return results


def evaluate_pixels(dataset, config, seed: Optional[int] = None) -> dict:
  """The raw-pixel floor: every probe (the kNN included) on the flattened images, as level
  `pixels`."""
  check_labels(dataset)
  train = {PIXELS: features_lib.pixel_features(dataset.train_images)}
  test = {PIXELS: features_lib.pixel_features(dataset.test_images)}
  return evaluate_features(train, test, dataset.train_labels, dataset.test_labels,
                           dataset.num_classes, config.eval,
                           int(config.seed if seed is None else seed),
                           linear_levels=(PIXELS,), knn_levels=(PIXELS,))


# ---- one number per (probe, level), and the tables --------------------------------------------


def columns(results: dict) -> dict:
  """{(probe column, level): accuracy} of one evaluation, probe columns "linear",
  "few_label:<fraction>", "val_selected", "knn" (few-label: the mean over draws)."""
  out = {}
  for level, r in results.get("linear", {}).items():
    out[("linear", level)] = r["test_acc"]
  for level, by_fraction in results.get("few_label", {}).items():
    for fraction, r in by_fraction.items():
      out[(f"few_label:{fraction}", level)] = r["mean"]
  for level, r in results.get("val_selected", {}).items():
    out[("val_selected", level)] = r["test_acc"]
  for level, r in results.get("knn", {}).items():
    out[("knn", level)] = r["test_acc"]
  return out


def column_order(names) -> list:
  """Probe columns in table order: linear, few-label by fraction, val-selected, kNN."""
  def rank(name):
    kind, _, fraction = name.partition(":")
    return (["linear", "few_label", "val_selected", "knn"].index(kind),
            float(fraction) if fraction else 0.0)
  return sorted(set(names), key=rank)


def level_order(levels) -> list:
  """Levels in table order: conv, fc, mag_hidden, embedding, pixels, then any other."""
  known = [*linear_probe.LEVELS, "embedding", PIXELS]
  return sorted(set(levels), key=lambda l: (known.index(l) if l in known else len(known), l))


def column_title(name: str, protocol: Optional[dict] = None) -> str:
  """A probe column's header: 'linear, all labels', '1 % labels', 'val-selected', 'kNN'."""
  kind, _, fraction = name.partition(":")
  if kind == "few_label":
    return f"{float(fraction) * 100:g} % labels"
  if kind == "knn" and protocol:
    return f"kNN (k={protocol['knn_k']}, T={protocol['knn_temperature']:g})"
  return {"linear": "all labels", "val_selected": "val-selected", "knn": "kNN"}[kind]


def format_results(results: dict, title: str) -> str:
  """One evaluation as a markdown table: a row per level, a column per probe.

  Few-label cells are mean ± std over the label draws; the val-selected cell names the chosen
  epoch; 'best epoch' is the paper's test-selected figure, shown for comparison only.
  """
  protocol = results.get("protocol", {})
  dims = {level: r["dim"] for probe in ("linear", "knn")
          for level, r in results.get(probe, {}).items()}
  fractions = sorted({f for by in results.get("few_label", {}).values() for f in by}, key=float)
  augmented = any(r.get("augmented") for r in results.get("linear", {}).values())
  with_val, with_knn = bool(results.get("val_selected")), bool(results.get("knn"))
  head = ["features", "dim", "all labels" + (" (augmented)" if augmented else ""),
          "all labels, best epoch (test-selected)",
          *(column_title(f"few_label:{f}") for f in fractions),
          *(["val-selected (epoch)"] if with_val else []),
          *([column_title("knn", protocol)] if with_knn else [])]
  rows = []
  for level in level_order(dims):
    lin = results.get("linear", {}).get(level)
    few = results.get("few_label", {}).get(level, {})
    val = results.get("val_selected", {}).get(level)
    near = results.get("knn", {}).get(level)
    rows.append([
        level, dims[level], tables.number(lin and lin["test_acc"]),
        tables.number(lin and lin["best_test_acc"]),
        *(f"{few[f]['mean']:.2f} ± {few[f]['std']:.2f}" if f in few else tables.MISSING
          for f in fractions),
        *([f"{val['test_acc']:.2f} ({val['epoch']})" if val else tables.MISSING]
          if with_val else []),
        *([tables.number(near and near["test_acc"])] if with_knn else [])])
  notes = []
  if fractions:
    notes.append(f"few-label: mean ± std over {protocol.get('few_label_draws')} stratified "
                 f"label draws")
  if results.get("val_selected"):
    notes.append(f"val-selected: test accuracy at the epoch chosen on a stratified "
                 f"{protocol.get('val_fraction', 0) * 100:g} % validation split of the training "
                 f"set")
  table = tables.markdown_table(head, rows, title)
  return table + ("\n" + "; ".join(notes) + "." if notes else "")
