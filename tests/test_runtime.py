"""Process-level settings: XLA:CPU's scheduler and conv kernels, XLA's CSE pass, freeing host
memory."""

import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from metaug_jax import host_memory, xla_runtime
from metaug_jax.config_check import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses find the repository first, then whatever the caller's PYTHONPATH held.
PYTHONPATH = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

# Trains two MetAug steps on digits in a fresh interpreter (JAX's backend not yet started)
# and prints the compiled step's XLA temp bytes and a checksum of the parameters.
_PROBE = """
import json, re, sys
sys.path.insert(0, {configs!r})
import digits
import jax, numpy as np
from metaug_jax import train
c = digits.get_config()
c.batch_size = 64
c.xla_cpu_scheduler = {scheduler!r}
c.xla_cse = {cse!r}
c.model.remat = {remat!r}
c.xla_cpu_conv_library = {conv_library!r}
exp = train.build_experiment(c)
state = exp.init_state()
step = train.compile_step(exp, state)
compiled = step.compile(state, exp.loader.batch_at(0))
temp = compiled.memory_analysis().temp_size_in_bytes
hlo = compiled.as_text()
convs = hlo.count(" convolution(")
bodies = dict(re.findall(r"^%?(\\S+) [^\\n]*\\{{\\n(.*?)\\n\\}}", hlo, re.M | re.S))
ynn_convs = sum(" convolution(" in bodies.get(name, "") for name in
                re.findall(r"calls=%?([^,\\s]+)[^\\n]*__ynn_fusion", hlo))
for s in range(2):
  state, _ = step(state, exp.loader.batch_at(s))
leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state.params))]
print("PROBE " + json.dumps({{"temp": temp, "params": [float(np.sum(np.abs(x))) for x in leaves],
                             "convs": convs, "ynn_convs": ynn_convs,
                             "xla_flags": __import__("os").environ.get("XLA_FLAGS", "")}}))
"""


def _probe(scheduler: str, cse: bool = True, remat: bool = False,
           conv_library: str = "eigen") -> dict:
  env = dict(os.environ, PYTHONPATH=PYTHONPATH)
  env.pop("XLA_FLAGS", None)
  code = _PROBE.format(configs=os.path.join(ROOT, "configs"), scheduler=scheduler, cse=cse,
                       remat=remat, conv_library=conv_library)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("PROBE "):])


@pytest.mark.slow  # two training subprocesses
def test_memory_scheduler_trains_the_same_with_less_memory():
  fast, lean = _probe("concurrency"), _probe("memory")
  assert xla_runtime.FLAG not in fast["xla_flags"]
  assert f"--{xla_runtime.FLAG}=false" in lean["xla_flags"]
  assert lean["params"] == fast["params"]          # the order of operations, not the maths
  assert lean["temp"] < 0.85 * fast["temp"], (lean["temp"], fast["temp"])


def test_scheduler_conflicting_with_xla_flags_is_a_config_error(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--foo=1 --{xla_runtime.FLAG}=false")
  with pytest.raises(ConfigError, match="config.xla_cpu_scheduler='concurrency'"):
    xla_runtime.apply_xla_cpu_scheduler("concurrency")
  xla_runtime.apply_xla_cpu_scheduler("memory")     # agrees: nothing to do
  monkeypatch.setenv("XLA_FLAGS", f"--{xla_runtime.FLAG}=true")
  with pytest.raises(ConfigError, match="--config.xla_cpu_scheduler=concurrency"):
    xla_runtime.apply_xla_cpu_scheduler("memory")


def test_memory_scheduler_after_the_backend_started_is_a_config_error(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()                                     # this test process's backend is running
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  with pytest.raises(ConfigError, match="before JAX starts its backend"):
    xla_runtime.apply_xla_cpu_scheduler("memory")
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  xla_runtime.apply_xla_cpu_scheduler("concurrency")  # the default needs nothing


@pytest.mark.slow  # two training subprocesses
def test_without_cse_remat_trains_the_same_and_keeps_its_recomputation():
  """jaxlib 0.10's XLA:CPU CSE merges model.remat's recomputation back into the forward
  (fewer convolutions, more memory); without CSE remat works. jaxlib 0.11 keeps it either way
  (checked with 0.11.2), and turning CSE off must then cost no memory."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  merged = _probe("memory", cse=True, remat=True)
  rematted = _probe("memory", cse=False, remat=True)
  assert "--xla_disable_hlo_passes=cse" in rematted["xla_flags"]
  assert "xla_disable_hlo_passes" not in merged["xla_flags"]
  np.testing.assert_allclose(rematted["params"], merged["params"], rtol=1e-6)
  facts = (merged["convs"], rematted["convs"], merged["temp"], rematted["temp"])
  if tuple(int(p) for p in jaxlib.__version__.split(".")[:2]) < (0, 11):
    assert merged["convs"] < rematted["convs"], facts
    assert rematted["temp"] < 0.9 * merged["temp"], facts
  else:
    assert merged["convs"] == rematted["convs"], facts
    assert rematted["temp"] <= 1.02 * merged["temp"], facts


def test_cse_setting_merges_with_xla_flags_and_reports_conflicts(monkeypatch):
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--foo=1 --xla_disable_hlo_passes=fusion")
  xla_runtime.apply_xla_cse(True)                   # CSE is not among the disabled passes
  xla_runtime.apply_xla_cse(False)
  assert os.environ["XLA_FLAGS"] == "--foo=1 --xla_disable_hlo_passes=fusion,cse"
  xla_runtime.apply_xla_cse(False)                  # already disabled: unchanged
  assert os.environ["XLA_FLAGS"] == "--foo=1 --xla_disable_hlo_passes=fusion,cse"
  with pytest.raises(ConfigError, match="--config.xla_cse=False"):
    xla_runtime.apply_xla_cse(True)
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(ConfigError, match="xla_cse=False must be chosen before JAX starts"):
    xla_runtime.apply_xla_cse(False)
  assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.slow  # two training subprocesses
def test_eigen_conv_library_takes_the_convolutions_off_ynnpack():
  eigen = _probe("concurrency")                     # the default
  default = _probe("concurrency", conv_library="xla_default")
  flag = f"--{xla_runtime.YNN_FUSION_FLAG}=-{xla_runtime.YNN_CONVOLUTION}"
  assert flag in eigen["xla_flags"] and xla_runtime.YNN_FUSION_FLAG not in default["xla_flags"]
  assert default["ynn_convs"] > 0, default          # jaxlib 0.10-0.11 give YNNPACK the convs
  assert eigen["ynn_convs"] == 0 and eigen["convs"] >= default["ynn_convs"], eigen
  # Same maths, different kernels: the two libraries sum a convolution in different orders, and
  # after two MetAug steps (second-order gradients through the convs) float32 rounding reaches
  # ~2e-4 of the smallest leaves' |sum| (seen: 1.5e-4 on a 1e-2 leaf); a wrong kernel is off by
  # far more than 1e-3.
  np.testing.assert_allclose(eigen["params"], default["params"], rtol=1e-3)


def test_conv_library_setting_merges_with_xla_flags_and_reports_conflicts(monkeypatch):
  flag, conv = xla_runtime.YNN_FUSION_FLAG, xla_runtime.YNN_CONVOLUTION
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", f"--foo=1 --{flag}=-individual_dot")
  assert not xla_runtime.cpu_convolutions_use_eigen()
  xla_runtime.apply_xla_cpu_conv_library("xla_default")  # XLA's choice: nothing to do
  assert os.environ["XLA_FLAGS"] == f"--foo=1 --{flag}=-individual_dot"
  xla_runtime.apply_xla_cpu_conv_library("eigen")
  assert os.environ["XLA_FLAGS"] == f"--foo=1 --{flag}=-individual_dot,-{conv}"
  assert xla_runtime.cpu_convolutions_use_eigen()
  xla_runtime.apply_xla_cpu_conv_library("eigen")   # already so: unchanged
  assert os.environ["XLA_FLAGS"] == f"--foo=1 --{flag}=-individual_dot,-{conv}"
  for explicit, eigen in (("", True), ("individual_dot", True),
                          ("LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", False)):
    monkeypatch.setenv("XLA_FLAGS", f"--{flag}={explicit}")
    assert xla_runtime.cpu_convolutions_use_eigen() == eigen, explicit
  with pytest.raises(ConfigError, match="--config.xla_cpu_conv_library=xla_default"):
    xla_runtime.apply_xla_cpu_conv_library("eigen")
  monkeypatch.setenv("XLA_FLAGS", f"--{flag}=+{conv}")
  with pytest.raises(ConfigError, match="remove 'individual_convolution'"):
    xla_runtime.apply_xla_cpu_conv_library("eigen")


def test_conv_library_after_the_backend_started_warns_once(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  warnings = []
  monkeypatch.setattr(xla_runtime.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  monkeypatch.setattr(xla_runtime, "_warned_conv_library_too_late", False)
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  xla_runtime.apply_xla_cpu_conv_library("eigen")
  xla_runtime.apply_xla_cpu_conv_library("eigen")
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  assert len(warnings) == 1 and "xla_cpu_conv_library='eigen' not applied" in warnings[0]
  assert f"XLA_FLAGS=--{xla_runtime.YNN_FUSION_FLAG}=-" in warnings[0]


# Runs main() with the multi-process set-up and training replaced by recorders, in a fresh
# interpreter (main and eval define the same absl flag, so they cannot share one process).
_MAIN_ORDER_PROBE = """
import json, os, sys, types
sys.path.insert(0, {configs!r})
import digits
from absl import flags
from metaug_jax import main as main_lib, parallel, train
flags.FLAGS.mark_as_parsed()
config = digits.get_config("tiny")
config.xla_cse, config.xla_cpu_scheduler = False, "memory"
seen = {{}}
main_lib._CONFIG = types.SimpleNamespace(value=config)
main_lib._WORKDIR = types.SimpleNamespace(value="unused")
parallel.maybe_initialize_distributed = (
    lambda *args: seen.setdefault("at_start", os.environ.get("XLA_FLAGS", "")))
train.train_and_evaluate = lambda *args: seen.setdefault("trained", True)
main_lib.main(["main"])
print("PROBE " + json.dumps(seen))
"""


def test_cli_sets_xla_flags_before_a_multi_process_run_starts_the_backend():
  """main applies config.xla_* before jax.distributed (whose set-up starts the backend)."""
  env = dict(os.environ, PYTHONPATH=PYTHONPATH,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  code = _MAIN_ORDER_PROBE.format(configs=os.path.join(ROOT, "configs"))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
  seen = json.loads(lines[-1][len("PROBE "):])
  assert "--xla_disable_hlo_passes=cse" in seen["at_start"], seen
  assert f"--{xla_runtime.FLAG}=false" in seen["at_start"] and seen["trained"], seen


def test_unknown_jaxlib_flags_are_probed_and_a_refused_one_is_skipped(monkeypatch, capsys):
  monkeypatch.setattr(xla_runtime, "jaxlib_version", lambda: "0.99.0")
  xla_runtime.flag_accepted.cache_clear()
  try:
    # Not a checked version: the probe starts XLA with the flag in a fresh interpreter.
    assert not xla_runtime.flag_accepted("xla_metaug_no_such_flag", "1")
    assert xla_runtime.flag_accepted(xla_runtime.YNN_FUSION_FLAG, "-individual_convolution")
  finally:
    xla_runtime.flag_accepted.cache_clear()
  monkeypatch.setattr(xla_runtime, "flag_accepted", lambda flag, value: False)
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: False)
  monkeypatch.setattr(xla_runtime, "_noted", set())
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  for _ in range(2):
    xla_runtime.apply_xla_cpu_conv_library("eigen")
    xla_runtime.apply_xla_cpu_scheduler("memory")
    xla_runtime.apply_xla_cse(False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 3 and all(l.startswith("info: config.") and "0.99.0" in l
                                 for l in lines), lines


def test_cpu_flags_are_not_written_for_an_accelerator_run(monkeypatch, capsys):
  monkeypatch.setattr(xla_runtime, "backend_started", lambda: False)
  monkeypatch.setattr(xla_runtime, "_noted", set())
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_runtime.apply_xla_cpu_conv_library("eigen")
  assert os.environ["XLA_FLAGS"] == ""
  assert "uses cuda" in capsys.readouterr().err


def test_backend_started_is_read_through_public_jax_config():
  code = ("import jax, jax.numpy as jnp\n"
          "from metaug_jax import xla_runtime\n"
          "before = xla_runtime.backend_started()\n"
          "jnp.zeros(1).block_until_ready()\n"
          "print(before, xla_runtime.backend_started(), "
          "jax.config.jax_cpu_get_local_topology_timeout_minutes)\n")
  env = dict(os.environ, PYTHONPATH=PYTHONPATH)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  assert out == ["False", "True", "2"], out


def test_the_package_imports_no_private_jax_modules():
  offenders = []
  for folder, _, files in os.walk(os.path.join(ROOT, "metaug_jax")):
    for f in files:
      if f.endswith(".py"):
        with open(os.path.join(folder, f)) as fh:
          if "jax._src" in fh.read():
            offenders.append(f)
  assert not offenders, offenders


def test_release_collects_garbage_cycles():
  class Node:
    pass

  gc.disable()
  try:
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    assert alive() is not None                      # only a collection frees a cycle
    trimmed = host_memory.release()
  finally:
    gc.enable()
  assert alive() is None
  assert isinstance(trimmed, bool)
  if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
    assert host_memory._MALLOC_TRIM is not None     # pylint: disable=protected-access
