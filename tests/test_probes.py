"""The evaluation protocol (metaug_jax/evaluation/probes.py, splits.py, linear_probe.py): label
draws stratified, seeded and per class; the validation split carved from the training set,
never from the test set; the validation-selected figure chosen without reading test
accuracies; levels fitted side by side as each alone; the raw-pixel floor; the table and its
columns; the eval config's checks."""

import dataclasses

import numpy as np
import pytest

from metaug_jax import config_base, config_check
from metaug_jax.data import dataset as dataset_lib
from metaug_jax.evaluation import knn, linear_probe, probes, splits

CLASSES = 4
SIDE = 4                                    # 4x4 grey images: 16 raw-pixel features


def synthetic(n: int, seed: int):
  """uint8 (n, 4, 4, 1) images whose class sets a bright 2x2 quadrant, plus noise; labels."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % CLASSES
  images = rng.integers(0, 90, size=(n, SIDE, SIDE, 1))
  for i, c in enumerate(y):
    r, q = divmod(int(c), 2)
    images[i, 2 * r:2 * r + 2, 2 * q:2 * q + 2] += 160
  return images.astype(np.uint8), y.astype(np.int32)


@pytest.fixture(scope="module")
def data():
  train_x, train_y = synthetic(200, 0)
  test_x, test_y = synthetic(80, 1)
  return dataset_lib.ImageDataset("synthetic", train_x, train_x, train_y, test_x, test_y,
                                  CLASSES)


def eval_config(**overrides):
  c = config_base.get_base_config().eval
  c.probe_epochs, c.probe_batch_size, c.few_label_draws = 6, 32, 3
  c.update_from_flattened_dict(overrides)
  return c


SETTINGS = linear_probe.ProbeSettings(epochs=6, lr=0.1, weight_decay=1e-4, batch_size=32)


# ---- label draws and the validation split -------------------------------------------------------

UNEVEN = np.repeat(np.arange(5), [100, 50, 20, 7, 1])   # classes of 100, 50, 20, 7 and 1


def test_few_label_draws_take_the_fraction_of_every_class_seeded_per_draw():
  draw = splits.few_label_subset(UNEVEN, 0.1, seed=0, draw=0)
  # round(0.1 n_c), at least one: 10, 5, 2, 1 (0.7 rounds up), 1 (the minimum).
  assert np.bincount(UNEVEN[draw], minlength=5).tolist() == [10, 5, 2, 1, 1]
  assert np.all(np.diff(draw) > 0)                        # sorted, no repeats
  np.testing.assert_array_equal(draw, splits.few_label_subset(UNEVEN, 0.1, 0, 0))
  assert not np.array_equal(draw, splits.few_label_subset(UNEVEN, 0.1, 0, 1))
  assert not np.array_equal(draw, splits.few_label_subset(UNEVEN, 0.1, 1, 0))
  assert np.bincount(UNEVEN[splits.few_label_subset(UNEVEN, 0.01, 0, 0)]).tolist() == [1] * 5
  np.testing.assert_array_equal(splits.few_label_subset(UNEVEN, 1.0, 3, 2), np.arange(178))
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    splits.few_label_subset(UNEVEN, 0.0, 0, 0)


def test_validation_split_is_stratified_disjoint_seeded_and_keeps_every_class():
  fit, val = splits.validation_split(UNEVEN, 0.1, seed=0)
  assert np.bincount(UNEVEN[val], minlength=5).tolist() == [10, 5, 2, 1, 0]
  assert not set(fit) & set(val) and len(fit) + len(val) == len(UNEVEN)
  assert np.bincount(UNEVEN[fit], minlength=5).min() >= 1   # a 1-example class stays in fit
  again, other = splits.validation_split(UNEVEN, 0.1, 0), splits.validation_split(UNEVEN, 0.1, 1)
  np.testing.assert_array_equal(val, again[1])
  assert not np.array_equal(val, other[1])
  with pytest.raises(ValueError, match="no validation example"):
    splits.validation_split(np.arange(3), 0.1, 0)          # every class has one example
  one_each = np.eye(3, 4, dtype=np.float32)
  with pytest.raises(config_check.ConfigError, match="raise config.eval.val_fraction"):
    probes.evaluate_features({"pixels": one_each}, {"pixels": one_each}, np.arange(3),
                             np.arange(3), 3, eval_config(), 0, linear_levels=("pixels",))


# ---- the linear probes ----------------------------------------------------------------------------


def flat(images):
  return images.reshape(images.shape[0], -1).astype(np.float32)


def standardised(data):
  f = linear_probe.standardiser(flat(data.train_images))
  return f(flat(data.train_images)), f(flat(data.test_images))


def test_levels_fitted_side_by_side_equal_each_fitted_alone(data):
  x, x_test = standardised(data)
  y, y_test = data.train_labels, data.test_labels
  narrow, narrow_test = x[:, :5], x_test[:, :5]            # a second level, zero-padded to 16
  together = linear_probe.full_probes([x, narrow], y, [x_test, narrow_test], y_test, CLASSES,
                                      SETTINGS, 0)
  alone = [linear_probe.full_probes([a], y, [b], y_test, CLASSES, SETTINGS, 0)[0]
           for a, b in ((x, x_test), (narrow, narrow_test))]
  # Zero columns add exact zeros to the logits; only the summation order may differ, which
  # could move a borderline example: allow one example's worth.
  for got, want in zip(together, alone):
    assert got["dim"] == want["dim"]
    for key in ("test_acc", "best_test_acc"):
      assert got[key] == pytest.approx(want[key], abs=100 / len(y_test) + 1e-9)
    assert got["train_acc"] == pytest.approx(want["train_acc"], abs=100 / len(y) + 1e-9)
  assert [r["dim"] for r in together] == [16, 5]
  assert together[0]["test_acc"] > 95 and together[0]["best_test_acc"] >= together[0]["test_acc"]


def test_few_label_probes_report_each_draw_and_their_spread(data):
  x, x_test = standardised(data)
  y = data.train_labels
  subsets = [splits.few_label_subset(y, 0.1, 0, d) for d in range(3)]
  [r] = linear_probe.few_label_probes([x], y, [x_test], data.test_labels, CLASSES, subsets,
                                      SETTINGS, 0)
  assert r["examples"] == 20 and len(r["accs"]) == 3
  assert r["mean"] == pytest.approx(np.mean(r["accs"]))
  assert r["std"] == pytest.approx(np.std(r["accs"], ddof=1))
  assert r["mean"] > 80                                    # 5 labels per class suffice here
  [shuffled] = linear_probe.few_label_probes([x], np.random.default_rng(0).permutation(y),
                                             [x_test], data.test_labels, CLASSES, subsets,
                                             SETTINGS, 0)
  assert shuffled["mean"] < 50                             # random labels: near chance (25)
  with pytest.raises(ValueError, match="one size"):
    linear_probe.few_label_probes([x], y, [x_test], data.test_labels, CLASSES,
                                  [subsets[0], subsets[0][:-1]], SETTINGS, 0)


def test_the_validation_selected_figure_never_reads_test_accuracies(data, monkeypatch):
  """A spy on the selection sees only validation accuracies: a different test set changes the
  reported test accuracy, never the choice or what the selection saw."""
  x, x_test = standardised(data)
  y, y_test = data.train_labels, data.test_labels
  fit, val = splits.validation_split(y, 0.1, 0)
  seen = []
  select = linear_probe.select_on_validation
  monkeypatch.setattr(linear_probe, "select_on_validation",
                      lambda accs: seen.append(np.array(accs)) or select(accs))
  run = lambda xt, yt: linear_probe.validation_selected_probes(
      [x[fit]], y[fit], [x[val]], y[val], [xt], yt, CLASSES, SETTINGS, 0,
      lrs=(0.001, 0.1), weight_decays=(0.0, 1e-3))[0]
  first = run(x_test, y_test)
  scrambled = run(x_test[::-1], np.roll(y_test, 1))
  assert len(seen) == 2 and seen[0].shape == (4, SETTINGS.epochs)   # (lr x wd grid, epochs)
  np.testing.assert_array_equal(seen[0], seen[1])
  for key in ("epoch", "lr", "weight_decay", "val_acc"):
    assert first[key] == scrambled[key], key
  assert first["test_acc"] != scrambled["test_acc"]
  assert seen[0].max() == first["val_acc"] and first["val_examples"] == len(val) == 20
  assert first["fit_examples"] == 180


def test_select_on_validation_takes_the_first_best():
  assert linear_probe.select_on_validation([[1, 3, 3], [2, 3, 0]]) == (0, 1)
  assert linear_probe.select_on_validation([[1, 2], [5, 0]]) == (1, 0)


# ---- the protocol on features, and the raw-pixel floor ---------------------------------------------


def test_validation_rows_come_from_the_training_set_never_the_test_set(data, monkeypatch):
  x, x_test = standardised(data)             # what evaluate_features fits on
  got = {}
  real = linear_probe.validation_selected_probes

  def spy(xs_fit, y_fit, xs_val, *args, **kwargs):
    got.update(fit=xs_fit[0], val=xs_val[0])
    return real(xs_fit, y_fit, xs_val, *args, **kwargs)

  monkeypatch.setattr(linear_probe, "validation_selected_probes", spy)
  probes.evaluate_features({"pixels": flat(data.train_images)},
                           {"pixels": flat(data.test_images)}, data.train_labels,
                           data.test_labels, CLASSES, eval_config(few_label_fractions=()), 0,
                           linear_levels=("pixels",), knn_levels=())
  rows = lambda a: {r.tobytes() for r in a}
  assert len(got["fit"]) + len(got["val"]) == len(x)
  assert rows(got["val"]) <= rows(x) and not rows(got["val"]) & rows(x_test)
  assert not rows(got["val"]) & rows(got["fit"])


def test_raw_pixel_floor_runs_every_probe_on_the_flattened_images(data):
  results = probes.evaluate_pixels(data, dataclasses.replace(_Config(), seed=0))
  for probe in ("linear", "val_selected", "knn"):
    assert set(results[probe]) == {"pixels"}, probe
  assert set(results["few_label"]["pixels"]) == {"0.01", "0.1"}
  assert results["few_label"]["pixels"]["0.01"]["examples"] == CLASSES     # 1 per class
  assert results["knn"]["pixels"]["test_acc"] == knn.knn_accuracy(
      flat(data.train_images) / 255, data.train_labels, flat(data.test_images) / 255,
      data.test_labels, CLASSES, 20, 0.07)
  assert results["linear"]["pixels"]["test_acc"] > 95 and results["linear"]["pixels"]["dim"] == 16
  assert results["protocol"]["few_label_draws"] == 3 and results["protocol"]["seed"] == 0
  columns = probes.columns(results)
  assert set(columns) == {("linear", "pixels"), ("few_label:0.01", "pixels"),
                          ("few_label:0.1", "pixels"), ("val_selected", "pixels"),
                          ("knn", "pixels")}
  assert columns[("few_label:0.1", "pixels")] == results["few_label"]["pixels"]["0.1"]["mean"]


@dataclasses.dataclass
class _Config:
  """The two fields evaluate_pixels reads."""
  eval: object = dataclasses.field(default_factory=eval_config)
  seed: int = 0


def test_an_unlabelled_data_set_is_a_one_line_error(data):
  unlabelled = dataclasses.replace(data, train_labels=None, test_images=None, test_labels=None,
                                   num_classes=None)
  with pytest.raises(linear_probe.ProbeNeedsLabelsError) as err:
    probes.evaluate_pixels(unlabelled, _Config())
  assert "\n" not in str(err.value) and "probe_after_training=False" in str(err.value)


# ---- the table ---------------------------------------------------------------------------------


def test_format_results_has_a_row_per_level_and_a_column_per_probe():
  results = {
      "linear": {"conv": {"dim": 8, "test_acc": 91.0, "best_test_acc": 92.5, "train_acc": 99.0}},
      "few_label": {"conv": {"0.01": {"mean": 50.0, "std": 2.5}, "0.1": {"mean": 80.0,
                                                                        "std": 1.0}}},
      "val_selected": {"conv": {"test_acc": 90.5, "epoch": 7}},
      "knn": {"embedding": {"dim": 4, "test_acc": 70.25}},
      "protocol": {"knn_k": 20, "knn_temperature": 0.07, "few_label_draws": 5,
                   "val_fraction": 0.1}}
  text = probes.format_results(results, "title")
  assert text.splitlines() == [
      "title",
      "| features | dim | all labels | all labels, best epoch (test-selected) | 1 % labels | "
      "10 % labels | val-selected (epoch) | kNN (k=20, T=0.07) |",
      "|---|---|---|---|---|---|---|---|",
      "| conv | 8 | 91.00 | 92.50 | 50.00 ± 2.50 | 80.00 ± 1.00 | 90.50 (7) | – |",
      "| embedding | 4 | – | – | – | – | – | 70.25 |",
      "few-label: mean ± std over 5 stratified label draws; val-selected: test accuracy at the "
      "epoch chosen on a stratified 10 % validation split of the training set."]
  assert probes.columns(results) == {("linear", "conv"): 91.0, ("few_label:0.01", "conv"): 50.0,
                                     ("few_label:0.1", "conv"): 80.0,
                                     ("val_selected", "conv"): 90.5,
                                     ("knn", "embedding"): 70.25}
  assert probes.column_order(["knn", "few_label:0.1", "linear", "few_label:0.01",
                              "val_selected"]) == ["linear", "few_label:0.01", "few_label:0.1",
                                                   "val_selected", "knn"]


# ---- the eval section's checks --------------------------------------------------------------------


@pytest.mark.parametrize("field,value,needle", [
    ("eval.few_label_fractions", (0.0, 0.1), "must be a tuple of numbers in (0, 1]"),
    ("eval.few_label_fractions", (1.5,), "must be a tuple of numbers in (0, 1]"),
    ("eval.few_label_draws", 0, "must be an integer >= 1"),
    ("eval.val_fraction", 1.0, "must be a finite number in [0, 1)"),
    ("eval.val_lrs", (0.1, 0.0), "must be a tuple of numbers > 0"),
    ("eval.knn_levels", ("fc", "logits"), "must be a tuple of values from 'conv', 'fc'"),
])
def test_bad_probe_settings_are_one_line_each(field, value, needle):
  c = config_base.get_base_config()
  c.update_from_flattened_dict({field: value})
  problems = config_check.field_problems(c)
  assert list(problems) == [field] and needle in problems[field]
  assert "\n" not in problems[field] and f"--config.{field}=" in problems[field]
