"""Test set-up: 8 fake CPU devices, before anything imports JAX.

One-device and many-device runs are compared inside the same process by
building meshes over 1 or all 8 devices.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep TensorFlow (input pipeline tests) off the accelerator-less CPU thread pool fights.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests (and the subprocesses they start, which inherit the environment)
# compile the same smoke-sized programs: share them through JAX's persistent
# compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
