"""One `get_config(arg)` per dataset setup, read by `--config=configs/NAME.py[:variant]`.

Installed with the package as `metaug_jax.configs`, so the same paths work outside a checkout
(`metaug_jax.cli.resolve_config_argument` finds the installed copy when `configs/NAME.py` is not
in the current directory).
"""
