"""What the two-view Siamese baselines share (MoCo v2, BYOL, SimSiam, Barlow Twins).

One encoder (its fc head is the projector) applied to two augmented views of each image,
plus, per method, a predictor and/or a slowly moving copy of the encoder.
"""

import jax
import ml_collections
import optax

from metaug_jax import parallel
from metaug_jax.methods import base, common
from metaug_jax.models import heads

TWO_VIEW_KINDS = ("augmented_copies", "simclr")


def two_view_variant(config: ml_collections.ConfigDict) -> None:
  """A dataset config made two views of one shape for one shared encoder: the paper configs'
  Lab splits (views of different channel counts) become two SimCLR-style RGB crops."""
  if config.data.views not in TWO_VIEW_KINDS:
    config.data.views = "simclr"
  config.data.num_views = 2
  config.model.share_encoder = True


def two_view_check(name: str):
  """A registry `check` for methods that need two views through one shared encoder."""
  def check(config) -> list:
    problems = []
    if config.data.views not in TWO_VIEW_KINDS or config.data.num_views != 2:
      problems.append(
          f"config.method={name!r} contrasts two views of one kind: pass "
          f"--config.data.views=simclr (or augmented_copies for grey data) and "
          f"--config.data.num_views=2 (or use the config variant :{name}).")
    if not config.model.share_encoder:
      problems.append(f"config.method={name!r} uses one encoder for both views: pass "
                      f"--config.model.share_encoder=True.")
    return problems
  return check


class TwoViewMethod(base.Method):
  """Base of the Siamese baselines: helpers for a predictor and for extra parameter parts."""

  def __init__(self, config, facts):
    super().__init__(config, facts)
    hidden = self.predictor_width()
    self.predictor = (None if hidden is None else
                      heads.build_predictor(config.model, hidden, axis_name="batch"))

  def predictor_width(self):
    """The predictor's hidden width, or None for a method without a predictor."""
    return None

  def _init_predictor(self, state, key):
    """Adds params/batch_stats/opt_state["predictor"] (input: the encoder's projection)."""
    dim = int(self.config.model.embedding_dim)
    variables = self.predictor.init(key, jax.numpy.zeros((2, dim)), train=False)
    return state.replace(
        params={**state.params, "predictor": variables["params"]},
        batch_stats={**state.batch_stats, "predictor": variables["batch_stats"]},
        opt_state={**state.opt_state, "predictor": self.encoder_tx.init(variables["params"])})

  def predict(self, params, stats, x):
    """Train-mode predictor forward: (outputs, new batch stats)."""
    out, mutated = self.predictor.apply({"params": params, "batch_stats": stats}, x,
                                        train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]

  def _online_step(self, state, loss_fn):
    """One SGD step of the encoder and the predictor on `loss_fn({"encoder", "predictor"})
    -> (loss, (encoder stats, predictor stats, aux))`, gradients pmean'd after grad.

    Returns (the new params, batch_stats and opt_state of both parts, loss, aux, metrics).
    """
    online = {"encoder": state.params["encoder"], "predictor": state.params["predictor"]}
    (loss, (enc_stats, pred_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        online)
    grads = parallel.pmean(grads)
    enc_params, enc_opt, update_norm = self._apply_encoder_update(state, grads["encoder"])
    pred_params, pred_opt = self._apply_part_update(state, "predictor", grads["predictor"])
    parts = ({"encoder": enc_params, "predictor": pred_params},
             {"encoder": enc_stats, "predictor": pred_stats},
             {"encoder": enc_opt, "predictor": pred_opt})
    return parts, loss, aux, {"loss": loss, "grad_norm": common.global_norm(grads),
                              "update_norm": update_norm}

  def _apply_part_update(self, state, part: str, grads):
    """The encoders' SGD (same schedule, own momentum state) applied to params[part]."""
    updates, opt = self.encoder_tx.update(grads, state.opt_state[part], state.params[part])
    return optax.apply_updates(state.params[part], updates), opt

  @staticmethod
  def copy_of_encoder(state, name: str):
    """A state whose params/batch_stats[name] start as copies of the encoder's."""
    return state.replace(params={**state.params, name: state.params["encoder"]},
                         batch_stats={**state.batch_stats, name: state.batch_stats["encoder"]})

  def views(self, state, batch):
    """This step's two augmented views of the device's batch."""
    keys = common.step_keys(state, ("augment",))
    return common.train_views(batch["image"], keys["augment"], self.config.data)
