"""metaug-jax: contrastive learning with meta feature augmentation (MetAug) in JAX/Flax.

The command-line entry points are `python -m metaug_jax.main` (pre-train, then probe) and
`python -m metaug_jax.eval` (restore a checkpoint and evaluate it); `metaug_jax.train` is the
same loop as a library. Importing the package starts nothing: JAX's backend starts on the first
computation, so process-level XLA settings can still be applied after `import metaug_jax`.
"""

__version__ = "0.1.0"
