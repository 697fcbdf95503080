"""Tests of on-device augmentation (metaug_jax.data.augment) and views (metaug_jax.data.views)."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import config_base
from metaug_jax.data import augment
from metaug_jax.data import views


def _image(h=6, w=7, c=3, seed=0):
  return np.random.default_rng(seed).uniform(size=(h, w, c)).astype(np.float32)


def _uint8_batch(b=4, h=8, w=8, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def _data_config(kind, **overrides):
  """Small views; tests share shapes and settings so that jit caches are reused."""
  c = config_base.get_base_config().data
  c.views = kind
  c.input_size = 8
  c.flip = True
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


# ---- affine sampling ---------------------------------------------------------------------


def test_affine_sample_identity_reproduces_image():
  img = _image(6, 6)
  out = augment.affine_sample(img, augment.identity_matrix(), 6)
  np.testing.assert_allclose(out, img, atol=1e-6)


def test_affine_sample_translation_moves_pixels():
  img = _image(5, 8)
  # out[y, x] = in[y + 1, x + 2]: the content moves up by 1 and left by 2.
  matrix = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
  out = np.asarray(augment.affine_sample(img, matrix, (5, 8), mode="constant"))
  np.testing.assert_allclose(out[:4, :6], img[1:, 2:], atol=1e-6)
  np.testing.assert_allclose(out[4:], 0.0)   # constant mode: zeros outside
  np.testing.assert_allclose(out[:, 6:], 0.0)
  near = np.asarray(augment.affine_sample(img, matrix, (5, 8), mode="nearest"))
  np.testing.assert_allclose(near[:4, 6:], np.repeat(img[1:, 7:8], 2, axis=1), atol=1e-6)


def test_affine_sample_half_pixel_is_bilinear_mean():
  img = _image(4, 4, 1)
  matrix = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
  out = np.asarray(augment.affine_sample(img, matrix, 4))
  np.testing.assert_allclose(out[:, :3], 0.5 * (img[:, :3] + img[:, 1:]), atol=1e-6)


def test_crop_matrix_flip_mirrors():
  img = _image(5, 5)
  out = augment.affine_sample(img, augment.crop_matrix(0.0, 0.0, 5.0, 5.0, 5, flip=True), 5)
  np.testing.assert_allclose(out, img[:, ::-1], atol=1e-6)


def test_crop_matrix_selects_box_and_resize_downsamples():
  img = _image(8, 8)
  out = augment.affine_sample(img, augment.crop_matrix(2.0, 3.0, 4.0, 4.0, 4), 4)
  np.testing.assert_allclose(out, img[2:6, 3:7], atol=1e-6)
  # Halving: each output pixel is the mean of a 2x2 block (centre-aligned bilinear).
  half = np.asarray(augment.affine_sample(img, augment.resize_matrix((8, 8), 4), 4))
  blocks = img.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(half, blocks, atol=1e-6)


def test_compose_affine_applies_inner_first():
  outer = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
  inner = jnp.array([[0.0, 1.0, 0.5], [1.0, 0.0, 2.0]])
  p = np.array([1.5, -2.0, 1.0])
  q = np.asarray(inner) @ p
  expected = np.asarray(outer) @ np.append(q, 1.0)
  np.testing.assert_allclose(np.asarray(augment.compose_affine(outer, inner)) @ p, expected,
                             rtol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_axis_aligned_sample_equals_affine_sample(mode):
  """The separable sampler of crops/resizes/flips is the bilinear gather, re-associated."""
  img = _image(9, 11)
  rng = np.random.default_rng(1)
  cases = [(augment.resize_matrix((9, 11), (12, 10)), (12, 10)),
           (augment.crop_matrix(-2.0, 7.5, 6.0, 8.0, (5, 13), flip=True), (5, 13)),  # 2 edges
           (augment.crop_matrix(1.25, 0.5, 3.0, 2.0, 7), 7)]                      # up-sampling
  cases += [(augment.resized_crop_matrix_from_uniforms(
      rng.uniform(size=5).astype(np.float32), (9, 11), (12, 10), flip=True), (12, 10))
            for _ in range(4)]
  sample = jax.jit(augment.axis_aligned_sample, static_argnums=(2, 3))
  for matrix, out_size in cases:
    want = np.asarray(augment.affine_sample(img, matrix, out_size, mode=mode))
    got = np.asarray(sample(img, matrix, out_size, mode))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  with pytest.raises(ValueError, match="mode"):
    augment.axis_aligned_sample(img, cases[0][0], 4, mode="wrap")


def test_random_resized_crop_full_scale_is_identity_or_flip():
  img = _image(6, 6)
  seen_flip = seen_plain = False
  for seed in range(12):
    m = augment.random_resized_crop_matrix(jax.random.key(seed), (6, 6), 6, (1.0, 1.0),
                                           (1.0, 1.0), flip=True)
    out = np.asarray(augment.affine_sample(img, m, 6))
    if np.allclose(out, img, atol=1e-5):
      seen_plain = True
    else:
      np.testing.assert_allclose(out, img[:, ::-1], atol=1e-5)
      seen_flip = True
  assert seen_flip and seen_plain


def test_random_resized_crop_stays_inside_image():
  keys = jax.random.split(jax.random.key(3), 200)
  mats = jax.jit(jax.vmap(lambda k: augment.random_resized_crop_matrix(
      k, (10, 20), 8, (0.05, 1.0), (0.25, 4.0), flip=True)))(keys)
  corners = np.array([[0, 0, 1], [0, 7, 1], [7, 0, 1], [7, 7, 1]], np.float32).T
  pts = np.einsum("kij,jc->kic", np.asarray(mats), corners)  # (K, 2, 4) input coordinates
  assert pts[:, 0].min() >= -0.5 - 1e-4 and pts[:, 0].max() <= 9.5 + 1e-4
  assert pts[:, 1].min() >= -0.5 - 1e-4 and pts[:, 1].max() <= 19.5 + 1e-4
  # Areas vary (a real random crop, not always the full image).
  areas = np.abs(np.asarray(mats)[:, 0, 0] * np.asarray(mats)[:, 1, 1]) * 64
  assert areas.min() < 0.3 * 200 and areas.max() > 0.8 * 200


def test_affine_jitter_zero_is_identity_and_rotation_keeps_centre():
  m = augment.random_affine_jitter_matrix(jax.random.key(0), (9, 9), 0.0, 0.0)
  np.testing.assert_allclose(m, augment.identity_matrix(), atol=1e-6)
  m = np.asarray(augment.random_affine_jitter_matrix(jax.random.key(1), (9, 9), 30.0, 0.0))
  np.testing.assert_allclose(m @ np.array([4.0, 4.0, 1.0]), [4.0, 4.0], atol=1e-5)
  assert abs(m[0, 1]) > 1e-3  # it does rotate
  np.testing.assert_allclose(np.linalg.det(m[:, :2]), 1.0, atol=1e-5)


# ---- colour ------------------------------------------------------------------------------


def test_rgb_to_lab_known_values():
  rgb = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                   [0.0, 0.0, 1.0]])
  lab = np.asarray(augment.rgb_to_lab(rgb))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
  np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-4)
  np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.01)
  np.testing.assert_allclose(lab[3], [87.73, -86.18, 83.18], atol=0.01)
  np.testing.assert_allclose(lab[4], [32.30, 79.19, -107.86], atol=0.01)


def test_rgb_to_lab_matches_skimage():
  color = pytest.importorskip("skimage.color")
  rgb = _image(5, 5, 3, seed=4)
  np.testing.assert_allclose(augment.rgb_to_lab(rgb), color.rgb2lab(rgb), atol=1e-3)


def test_normalize_lab_maps_ranges_to_unit():
  lab = jnp.array([[0.0, 6.025, -6.6895], [100.0, 98.233, 94.478]])
  out = np.asarray(augment.normalize_lab(lab))
  np.testing.assert_allclose(out[0], [-1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(out[1], [1.0, 1.0, 1.0], atol=1e-3)


def test_hsv_matches_colorsys_and_round_trips():
  rgb = np.random.default_rng(1).uniform(size=(20, 3)).astype(np.float32)
  rgb[0] = [0.5, 0.5, 0.5]  # grey: hue 0, saturation 0
  hsv, back = jax.jit(lambda x: (augment.rgb_to_hsv(x),
                                 augment.hsv_to_rgb(augment.rgb_to_hsv(x))))(rgb)
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(hsv, expected, atol=1e-5)
  np.testing.assert_allclose(back, rgb, atol=1e-5)


@jax.jit
def _colour_ops(img, red):
  """All deterministic colour ops in one compiled call (eager dispatch compiles every op)."""
  return dict(
      brightness=augment.adjust_brightness(img, 1.0),
      contrast=augment.adjust_contrast(img, 1.0),
      saturation=augment.adjust_saturation(img, 1.0),
      hue=augment.adjust_hue(img, 0.0),
      grey=augment.adjust_saturation(img, 0.0),
      flat=augment.adjust_contrast(img, 0.0),
      red_to_green=augment.adjust_hue(red, 1.0 / 3.0))


def test_colour_ops_identity_factors_and_extremes():
  img = _image(4, 4)
  red = np.zeros((1, 1, 3), np.float32)
  red[..., 0] = 1.0
  out = _colour_ops(img, red)
  for name in ("brightness", "contrast", "saturation", "hue"):
    np.testing.assert_allclose(out[name], img, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(out["grey"][..., 0], out["grey"][..., 2], atol=1e-6)
  np.testing.assert_allclose(out["flat"], np.mean(out["flat"]), atol=1e-6)
  # A hue turn of 1/3 maps pure red to pure green.
  np.testing.assert_allclose(out["red_to_green"][0, 0], [0.0, 1.0, 0.0], atol=1e-5)


@jax.jit
def _random_colour_ops(img):
  k0, k1, k2 = jax.random.key(0), jax.random.key(1), jax.random.key(2)
  return dict(
      a=augment.random_color_jitter(k0, img, 1.0, 1.0),
      b=augment.random_color_jitter(k0, img, 1.0, 1.0),
      c=augment.random_color_jitter(k1, img, 1.0, 1.0),
      never=augment.random_color_jitter(k2, img, 1.0, 0.0),
      grey=augment.random_grayscale(k0, img, 1.0),
      keep=augment.random_grayscale(k0, img, 0.0),
      noisy=augment.gaussian_noise(k0, img, 0.1))


def test_random_colour_ops_are_keyed():
  img = _image(6, 6)
  out = _random_colour_ops(img)
  np.testing.assert_array_equal(out["a"], out["b"])
  assert not np.allclose(out["a"], out["c"])
  np.testing.assert_allclose(out["never"], img)
  np.testing.assert_allclose(out["grey"][..., 0], out["grey"][..., 1], atol=1e-6)
  np.testing.assert_allclose(out["keep"], img)
  assert 0.05 < float(np.std(out["noisy"] - img)) < 0.2


# ---- views -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,channels,expected", [
    ("lab", 3, (1, 2, 3)),
    ("lab2", 3, (1, 2)),
    ("augmented_copies", 1, (1, 1)),
    ("augmented_copies", 3, (3, 3)),
    ("simclr", 3, (3, 3)),
    ("simclr", 1, (1, 1)),
])
def test_view_shapes_and_channels(kind, channels, expected):
  cfg = _data_config(kind)
  assert views.view_channels(cfg, channels) == expected
  assert views.num_views(cfg) == len(expected)
  images = _uint8_batch(4, 8, 8, channels)
  train = views.make_train_views(jax.random.key(0), images, cfg)
  evals = views.make_eval_views(images, cfg)
  for vs in (train, evals):
    assert len(vs) == len(expected)
    for v, c in zip(vs, expected):
      assert v.shape == (4, 8, 8, c) and v.dtype == jnp.float32
      assert bool(jnp.all(jnp.isfinite(v)))


def test_num_views_config():
  cfg = _data_config("augmented_copies", num_views=4)
  assert views.view_channels(cfg, 1) == (1, 1, 1, 1)
  assert len(views.make_eval_views(_uint8_batch(4, 8, 8, 1), cfg)) == 4


def test_lab_views_on_grey_images_raise():
  with pytest.raises(ValueError, match="augmented_copies"):
    views.view_channels(_data_config("lab"), 1)
  with pytest.raises(ValueError, match="augmented_copies"):
    views.make_train_views(jax.random.key(0), _uint8_batch(2, 8, 8, 1), _data_config("lab2"))
  with pytest.raises(ValueError, match="allowed"):
    views.view_channels(_data_config("nope"), 3)


def test_same_key_same_views_different_key_different():
  cfg = _data_config("augmented_copies")
  images = _uint8_batch(4, 8, 8, 1)
  a = views.make_train_views(jax.random.key(0), images, cfg)
  b = views.make_train_views(jax.random.key(0), images, cfg)
  c = views.make_train_views(jax.random.key(1), images, cfg)
  for va, vb, vc in zip(a, b, c):
    np.testing.assert_array_equal(va, vb)
    assert not np.allclose(va, vc)
  assert not np.allclose(a[0], a[1])  # the two copies differ


def test_views_depend_only_on_the_example_key():
  cfg = _data_config("lab")
  images = _uint8_batch(4)
  keys = jax.random.split(jax.random.key(7), 4)
  full = views.make_train_views_from_keys(keys, images, cfg)
  part = views.make_train_views_from_keys(keys[2:], images[2:], cfg)
  raw = views.make_train_views_from_keys(jax.random.key_data(keys)[2:], images[2:], cfg)
  for f, p, r in zip(full, part, raw):
    np.testing.assert_allclose(f[2:], p, atol=1e-6)
    np.testing.assert_allclose(p, r, atol=1e-6)


def test_lab_views_split_one_crop():
  cfg = _data_config("lab")
  l_view, ab_view, lab_view = views.make_train_views(jax.random.key(0), _uint8_batch(), cfg)
  np.testing.assert_array_equal(l_view, lab_view[..., :1])
  np.testing.assert_array_equal(ab_view, lab_view[..., 1:])
  assert float(jnp.abs(lab_view).max()) <= 1.1


def test_eval_views_deterministic_and_exact_at_native_size():
  cfg = _data_config("lab")
  images = _uint8_batch(4, 8, 8, 3)
  a = views.make_eval_views(images, cfg)
  b = views.make_eval_views(images, cfg)
  for va, vb in zip(a, b):
    np.testing.assert_array_equal(va, vb)
  expected = augment.normalize_lab(augment.rgb_to_lab(images.astype(np.float32) / 255.0))
  np.testing.assert_allclose(a[2], expected, atol=1e-5)
  grey = _uint8_batch(4, 8, 8, 1)
  ev = views.make_eval_views(grey, _data_config("augmented_copies"))
  np.testing.assert_allclose(ev[0], grey / 127.5 - 1.0, atol=1e-6)


def test_views_inside_user_jit_match_eager():
  cfg = _data_config("lab2")
  images = _uint8_batch(4, 8, 8, 3)
  inside = jax.jit(lambda k, x: views.make_train_views(k, x, cfg))(jax.random.key(5), images)
  outside = views.make_train_views(jax.random.key(5), images, cfg)
  for a, b in zip(inside, outside):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_augment_under_vmap_and_jit():
  imgs = np.stack([_image(6, 6, 3, seed=s) for s in range(3)])
  keys = jax.random.split(jax.random.key(0), 3)
  fn = jax.jit(jax.vmap(lambda k, x: augment.affine_sample(
      x, augment.random_resized_crop_matrix(k, (6, 6), 4, (0.5, 1.0), (0.75, 1.33), True), 4)))
  out = fn(keys, imgs)
  assert out.shape == (3, 4, 4, 3)
  single = augment.affine_sample(imgs[1], augment.random_resized_crop_matrix(
      keys[1], (6, 6), 4, (0.5, 1.0), (0.75, 1.33), True), 4)
  np.testing.assert_allclose(out[1], single, atol=1e-5)
  lab = jax.jit(jax.vmap(augment.rgb_to_lab))(imgs)
  np.testing.assert_allclose(lab, augment.rgb_to_lab(imgs), atol=1e-4)
