"""Test setup: 8 fake CPU devices (before jax is imported), a persistent compilation cache shared by the whole run, XLA
with most optimisations off, parsed absl flags, the `slow` marker."""

import atexit
import os
import shutil
import tempfile

from latent_lm import host_memory  # no jax: the XLA settings below still come first

# The concurrency-optimised XLA:CPU scheduler may start independent collectives in a different order on different
# fake devices; inside a scanned (while-loop) train step that deadlocks the CPU rendezvous (measured here: a 40 s
# termination timeout on the (2,2,2) mesh in 3 of 4 runs); with the in-order scheduler it has not happened since.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_cpu_enable_concurrency_optimized_scheduler=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

# Many tests compile the same programs again: each resume builds a new jitted step, and the CLI tests start dozens of
# training subprocesses. One cache per run (the pytest-xdist workers and every subprocess inherit the variable) makes
# a repeat compile a disk read: a tiny CLI training run went from 58 s to 28 s here. The cache key covers the HLO,
# XLA_FLAGS (device count included) and the jax version, so a hit is the same executable. Set the variable yourself
# to keep a cache across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="latent_lm_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# JAX skips the cache for compiles under 1 s by default; most test programs are that small, and hundreds of them
# recompile in subprocesses and resumed runs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Compiling is most of the suite's time (measured 2026-12-07: XLA backend compiles 463 s, tracing and lowering 234 s of
# the fast tier's ≈ 1,000 worker-seconds), and its programs are tiny: XLA with most optimisations off compiles them in
# about half the time (the (2,2,2) mesh test 40 → 25 s) and computes the same results up to rounding. Every test
# process and CLI subprocess inherits it; a test whose cost is executing (a long training run) requests the
# `full_optimization` fixture.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Every CLI re-executes itself once with glibc's huge pages for XLA:CPU's temporaries (latent_lm/host_memory.py);
# the tunable set here spares the tests' CLI subprocesses that second start, and the pytest-xdist workers started
# after this file get the huge pages too.
os.environ.update(host_memory.huge_pages_environ(os.environ) or {})

from absl import flags  # noqa: E402

# grain workers and absl-based code read FLAGS; pytest never calls absl.app.run.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~20 s here; `make test` skips it, `make test-all` (CI) runs it. "
                                       "Every slow test has a fast sibling that checks the same behaviour smaller.")


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures below this line.

import pytest  # noqa: E402


def _espeak_problem() -> str | None:
    from latent_lm.audio import espeak
    try:
        espeak.find_library()
    except Exception as e:  # noqa: BLE001 - any failure to load means: skip, and say why
        return f"espeak-ng cannot be loaded here ({e}); {espeak.INSTALL_HINT}"
    return None


ESPEAK_PROBLEM = _espeak_problem()
# Tests that synthesise speech: skipped, with the reason, where espeak-ng cannot be loaded.
requires_espeak = pytest.mark.skipif(ESPEAK_PROBLEM is not None, reason=ESPEAK_PROBLEM or "")


def write_random_checkpoint(task, optim, train, train_dir: str, config, meta: dict, rng, step: int = 7
                            ) -> tuple[object, object]:
    """`<train_dir>/checkpoints/<step>` of `task` on one device as training leaves it, written without training or
    compiling: params N(0, 0.05²) in every leaf (so zero-initialised layers are exercised), EMA params other random
    values, optimizer moments and counters zero; `meta` plus the experiment config in the metadata. `rng`: a numpy
    Generator. Returns the host (params, ema_params)."""
    import jax
    import ml_collections
    import numpy as np

    from latent_lm.checkpoint import Checkpointer
    from latent_lm.parallel.mesh import logical_rules, make_mesh
    from latent_lm.training.optimizer import make_optimizer
    from latent_lm.training.train_loop import build_state_fns

    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])

    def filled(abstract, std):  # std: N(0, std²) values, else zeros (optimizer moments, counters, key)
        return jax.tree.map(lambda a: jax.device_put(
            (rng.normal(0.0, std, a.shape) if std else np.zeros(a.shape)).astype(a.dtype), a.sharding), abstract)

    _, abstract, _ = build_state_fns(task, make_optimizer(optim, train.steps), mesh, logical_rules(config.mesh), 0)
    state = filled(abstract, 0).replace(step=jax.device_put(np.int32(step), abstract.step.sharding),
                                        params=filled(abstract.params, 0.05),
                                        ema_params=filled(abstract.ema_params, 0.05))
    ckpt = Checkpointer(f"{train_dir}/checkpoints", async_save=False)
    ckpt.save(step, state, meta=dict(meta, config=config.to_json()), force=True)
    ckpt.wait()
    ckpt.close()
    return jax.device_get(state.params), jax.device_get(state.ema_params)


def write_tiny_run(workdir: str, arch: str = "latent_lm") -> dict:
    """A workdir laid out as `--mode=all` leaves it, at the `default.py:tiny=1` size (backbone depth 1, 2 solver
    steps, 1 sample per class; `arch`: "latent_lm" or its DiT twin "dit"), written without training or compiling:
    lm/ and vae/ checkpoints (step 7) whose params are random in every leaf (so the zero-initialised head layers are
    exercised) and whose EMA params are other random values, and eval/classifier.msgpack (random weights). For the
    export/import CLIs and the PyTorch-parity benchmark, which read only these files.

    Returns dict(workdir, config, lm_raw, lm_ema, vae_raw): the config the checkpoints hold, host params."""
    import jax
    import numpy as np

    from configs import default
    from latent_lm.evaluation import classifier as clf
    from latent_lm.latents import LatentNormalization
    from latent_lm.training.tasks import VAETask, make_generator_task

    config = default.get_config("tiny=1")
    config.model.update(dict(arch=arch, depth=1))
    config.diffusion.num_sampling_steps = 2
    config.eval.update(dict(samples_per_class=1, sample_batch=10))
    norm = LatentNormalization(scale=0.8, bias=0.1)  # not the identity: exports must carry it
    rng = np.random.default_rng(0)
    lm_raw, lm_ema = write_random_checkpoint(make_generator_task(config, norm), config.optim, config.train,
                                             f"{workdir}/lm", config, {"latent_norm": norm.to_dict()}, rng)
    vae_raw, _ = write_random_checkpoint(VAETask.from_config(config), config.vae_optim, config.vae_train,
                                         f"{workdir}/vae", config, {}, rng)
    classifier = jax.eval_shape(clf.CNNClassifier(10).init, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
    clf.save_classifier(jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), classifier),
                        f"{workdir}/eval/classifier.msgpack")
    return dict(workdir=workdir, config=config, lm_raw=lm_raw, lm_ema=lm_ema, vae_raw=vae_raw)


@pytest.fixture(scope="session")
def tiny_run_workdir(tmp_path_factory):
    """`write_tiny_run` of a LatentLM run (written once per session; treat it as read-only)."""
    return write_tiny_run(str(tmp_path_factory.mktemp("tiny_run")))


@pytest.fixture(scope="session")
def tiny_dit_workdir(tmp_path_factory):
    """`write_tiny_run` of a DiT-twin run (written once per session; treat it as read-only)."""
    return write_tiny_run(str(tmp_path_factory.mktemp("tiny_dit_run")), arch="dit")


@pytest.fixture(scope="session")
def toy_reference(tmp_path_factory):
    """The uninterrupted toy run (test_train_loop.reference_run: REF_STEPS steps on one device, checkpoints every
    REF_EVERY) that the resume, restore, fault and bucket tests compare against; built once per xdist worker.
    Read-only: copy its workdir before resuming from its checkpoints."""
    from test_train_loop import reference_run  # noqa: PLC0415  (a test module: importable once pytest runs)

    return reference_run(tmp_path_factory.mktemp("toy_reference") / "run")


@pytest.fixture
def full_optimization(monkeypatch):
    """XLA with its optimisations on (the suite turns most of them off, above) for a test whose cost is executing, not
    compiling (a long training run): in this process and in the subprocesses it starts with this environment."""
    import jax

    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
