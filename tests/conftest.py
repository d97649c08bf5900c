"""Test set-up: 8 simulated CPU devices so sharding is exercised without accelerators, and one persistent
XLA compilation cache for the whole run.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.

The compilation cache: the CLI tests start `python -m fwm.cli ...` child processes (runs killed and resumed,
several processes side by side), and each would compile the same train, RL and sampler programs again. A
cache directory made for this run (kept if JAX_COMPILATION_CACHE_DIR is already set) is shared by the child
processes and by pytest-xdist's workers, which inherit the environment of the process that made it; that
process removes it at exit. jax caches only programs whose compile took over a second.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache_dir = tempfile.mkdtemp(prefix="fwm-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Files marked `slow` (pytestmark) run first, each file's tests kept together and in order: with
    `-n 2 --dist loadfile --no-loadscope-reorder` the workers take whole files in this order, and a long
    file left for last would run alone while the other worker idles."""
    del config
    first_index = {}
    for index, item in enumerate(items):
        first_index.setdefault(item.fspath, index)

    def file_key(item):
        return (item.get_closest_marker("slow") is None, first_index[item.fspath])

    items.sort(key=file_key)  # stable: within a file, the collected order
