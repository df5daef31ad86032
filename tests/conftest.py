"""Test set-up: 8 fake CPU devices, before anything imports JAX.

One-device and many-device runs are compared inside the same process by
building meshes over 1 or all 8 devices.
"""
import os

# Tests run small programs once, so compiling dominates: LLVM at -O0 for XLA's
# fused loops halves a train step's compile on 2 cores (11.6 -> 6.6 s). It
# changes rounding only (-O3 vectorises reductions, summing in another order;
# fast math stays off either way), so every process a test compares must use
# it: the subprocesses the tests start inherit both flags (test_workflow._env).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep TensorFlow (input pipeline tests) off the accelerator-less CPU thread pool fights.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests (and the subprocesses they start, which inherit the environment)
# compile the same smoke-sized programs: share them through JAX's persistent
# compilation cache.
_CACHE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE_ROOT, "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# TensorFlow's XLA-compiled augmentation functions (care_jax/augment.py) likewise:
# ~1 s of compiling per process and view shape, shared through TF's own cache.
if "tf_xla_persistent_cache_directory" not in os.environ.get("TF_XLA_FLAGS", ""):
  os.environ["TF_XLA_FLAGS"] = (os.environ.get("TF_XLA_FLAGS", "") + " --tf_xla_persistent_cache_directory="
                                + os.path.join(_CACHE_ROOT, "tf-xla-cache")).strip()

