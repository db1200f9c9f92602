"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def eight_devices(compilation_cache):
    """The process's backend, started now (after the cache is set) with the 8 devices above: JAX reads XLA_FLAGS
    when its first backend starts, and a test that changes the variable for its subprocesses (tests/test_chaos.py)
    must not, by being the first to touch a device, leave every later test of its worker with one."""
    import jax

    assert len(jax.devices()) == 8, jax.devices()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session (a worker's, with pytest-xdist; its subprocesses
    share it through the environment unless a test takes it away):
    the many tiny runs compile the same init, train and eval programs, and a program met again loads in
    milliseconds instead of compiling for seconds. Executables are keyed by their HLO, options and jaxlib, so a
    hit is the very program a compile would give. KEEL_TEST_XLA_CACHE=0 turns it off."""
    if os.environ.get("KEEL_TEST_XLA_CACHE", "1") == "0":
        yield
        return
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # the tests' subprocesses (keel train in a child, supervised runs, multi-process runs) share it too: JAX
    # reads these variables at import, and keel leaves a cache the process already has in place
    env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """Forty real standard-library modules copied into a folder: a small corpus that still looks like code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    names = ["abc", "bisect", "colorsys", "copy", "fnmatch", "functools", "genericpath", "glob", "heapq",
             "keyword", "linecache", "numbers", "operator", "opcode", "posixpath", "queue", "random",
             "reprlib", "sched", "shlex", "stat", "string", "struct", "textwrap", "this", "token",
             "tokenize", "types", "warnings", "weakref", "contextlib", "dataclasses", "enum", "fractions",
             "graphlib", "gzip", "hashlib", "hmac", "ipaddress", "json/__init__"]
    for n in names:
        shutil.copy(root / f"{n}.py", out / f"{n.replace('/', '_')}.py")
    return str(out / "*.py")


TINY = [
    "model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=8", "model.mlp_dim=64", "data.seq_len=32", "data.heldout_fraction=0.1",
    "train.batch_size=8", "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
    "train.sample_tokens=0", "optim.warmup_steps=2", "optim.decay_fraction=0.5", "checkpoint.every=2",
    "train.max_restarts=0",  # in the test process, not in a supervised child (tests/test_recovery.py has those)
]  # (no closing sample: it compiles a decode per new shape; tests/test_train_cli.py and tests/test_eval.py sample)


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory) -> str:
    """One `data.cache_dir` for the whole session: every run on the small corpus (same tokenizer settings) shares
    the token store the first one builds; a run on other files or settings builds its own under its own key."""
    return str(tmp_path_factory.mktemp("store_cache"))


@pytest.fixture
def tiny_args(small_corpus, store_cache, tmp_path) -> list[str]:
    """Overrides for a model that trains in seconds on the small corpus, in a fresh run directory (the token
    store comes from the session's shared cache)."""
    return [*TINY, f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}", f"run_dir={tmp_path / 'run'}"]
