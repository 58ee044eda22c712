"""The one train loop. Every experiment (σ-VAE, LatentLM, …) is a `Task` plus a config; nothing else differs.

A Task supplies `init_params(rng) -> boxed params` (with logical axis names) and
`loss(params, batch, rng) -> (loss, metrics)`. The loop builds the train state on the mesh's shardings, compiles
one step with `jax.jit(in_shardings, out_shardings, donate)` under `jax.set_mesh`, skips non-finite steps, keeps
an EMA, logs JSONL/TensorBoard and a progress line, checkpoints periodically and resumes from the latest
checkpoint (state, data iterator and all) bit-exactly, onto whatever mesh the current run has.

Preemption: SIGTERM (one process) or JAX's preemption sync point (multi-host; the coordination service turns a
SIGTERM or a TPU maintenance notice on any host into the same step on every host) ⇒ checkpoint at the next step
boundary and raise `Preempted`; rerunning the same command resumes.

Another process count (docs/scaling_out.md §4.1): a pipeline with the global order (data_pipelines/sharding.py,
its iterator has `global_order = True`) continues the same global batches on any number of processes; the meta of
every checkpoint records which order the run had (`data_order`), and a per-process order refuses to resume on
another count with one error line (latent_lm/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from latent_lm.checkpoint import GLOBAL_ORDER, Checkpointer, abstract_with_shardings
from latent_lm.errors import ConfigError, MissingInputError
from latent_lm.parallel.device_prefetch import DevicePrefetcher
from latent_lm.parallel.mesh import data_parallel_size, logical_shardings, replicated
from latent_lm.training.metrics_writer import MetricsWriter
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.train_state import TrainState, ema_update, tree_all_finite


class Task(Protocol):
    def init_params(self, rng: jax.Array) -> Any: ...

    def loss(self, params, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]: ...


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the run resumes from it when started again."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted: checkpoint of step {step} saved in {directory}; rerun the same command to "
                         f"resume")
        self.step = step


class _SigtermFlag:
    """Single-process SIGTERM → a flag checked at step boundaries. With several processes the coordination
    service owns SIGTERM (JAX's preemption notifier) and `Checkpointer.reached_preemption` reports it."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def log_process0(message: str) -> None:
    """Prints on process 0 only (multi-host runs would print every line once per host)."""
    if jax.process_index() == 0:
        print(message, flush=True)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    final_metrics: dict[str, float]
    steps_per_sec: float


def build_state_fns(task: Task, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int):
    """(jitted init, abstract state, state shardings) for `task` on `mesh`."""

    def init_boxed(rng):
        params = task.init_params(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params, rng=rng, skipped=jnp.zeros((), jnp.int32))

    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(init_boxed, rng)
    shardings = logical_shardings(abstract_boxed, mesh, rules)
    abstract = abstract_with_shardings(nn.unbox(abstract_boxed), shardings)
    init = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)
    return init, abstract, shardings


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule, ema_decay: float):
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        # The step count rides in the batch for losses that change over training (σ-VAE GAN warm-up, disc_start).
        batch = dict(batch, step=state.step)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema_update(state.ema_params, params, state.step, ema_decay), state.ema_params),
            skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                       skipped=new_state.skipped)
        return new_state, metrics

    return train_step


def jit_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule, ema_decay: float,
                   shardings, mesh: Mesh):
    """The compiled step: state laid out by `shardings`, metrics replicated, the old state donated."""
    return jax.jit(make_train_step(task, tx, schedule, ema_decay), in_shardings=(shardings, None),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def train(task: Task, data: Iterator[dict], *, optim_config, train_config, mesh: Mesh, rules, workdir: str,
          meta: dict | None = None, checkpoint_config=None, log: Callable[[str], None] = log_process0) -> TrainResult:
    """Trains `task` for `train_config.steps` steps, resuming from `workdir` checkpoints if present.

    `data` yields this process's rows of each global batch of `train_config.batch_size` (numpy); when it is a
    grain iterator (has get_state/set_state) its position is checkpointed with the state and restored on resume.
    When its `global_order` is true (data_pipelines.sharding.GlobalOrder) the run may resume on another number of
    processes.
    """
    total = int(train_config.steps)
    dp = data_parallel_size(mesh)
    if train_config.batch_size % dp:
        raise ConfigError(f"batch_size {train_config.batch_size} is not divisible by the data-parallel size {dp} "
                         f"(mesh data×fsdp)")
    tx = make_optimizer(optim_config, total)
    schedule = learning_rate_schedule(optim_config, total)
    init, abstract, shardings = build_state_fns(task, tx, mesh, rules, train_config.get("seed", 0))
    ckpt_cfg = checkpoint_config
    ckpt = Checkpointer(f"{workdir}/checkpoints", max_to_keep=ckpt_cfg.max_to_keep if ckpt_cfg else 2,
                        save_every=ckpt_cfg.every if ckpt_cfg else total,
                        async_save=ckpt_cfg.get("async_save", True) if ckpt_cfg else True)
    batches = DevicePrefetcher(data, mesh, size=int(train_config.get("prefetch", 2)))
    data_state = batches if hasattr(data, "get_state") and hasattr(data, "set_state") else None
    # The global batches of a global-order pipeline do not depend on the process count; checked on resume.
    global_order = bool(getattr(data, "global_order", False))
    meta = dict(meta or {}, mesh={"shape": dict(mesh.shape), "process_count": jax.process_count()},
                data_order=GLOBAL_ORDER if global_order else "per_process")
    state = None
    restored = ckpt.restore(abstract, data_iter=data_state, global_order=global_order)
    if restored is not None:
        state, _ = restored
        log(f"resumed from step {int(state.step)}")
    sigterm = _SigtermFlag()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if state is None:
                state = init(jax.random.PRNGKey(train_config.get("seed", 0)))
            step_fn = jit_train_step(task, tx, schedule, optim_config.ema_decay, shardings, mesh)
            writer = MetricsWriter(workdir)
            log_every = int(train_config.get("log_every", 100))
            start = int(state.step)
            t0 = time.time()
            t_last, s_last = t0, start
            metrics = {}
            for step in range(start, total):
                state, metrics = step_fn(state, next(batches))
                done = step + 1
                if done % log_every == 0 or done == total:
                    metrics = jax.device_get(metrics)
                    now = time.time()
                    rate = (done - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, done
                    writer.write(done, dict(metrics, steps_per_sec=rate))
                    eta = (total - done) / max(rate, 1e-9)
                    log(f"[{workdir.rsplit('/', 1)[-1]}] step {done}/{total} loss {metrics['loss']:.4f} "
                        f"{rate:.2f} steps/s ETA {eta / 60:.1f} min" +
                        (f" skipped {int(metrics['skipped'])}" if metrics['skipped'] else ""))
                if done != total and (sigterm.event.is_set() or ckpt.reached_preemption(done)):
                    ckpt.save(done, state, data_iter=data_state, meta=meta, force=True)
                    ckpt.wait()
                    writer.close()
                    raise Preempted(done, ckpt.directory)
                if ckpt_cfg is not None and done % ckpt.save_every == 0 and done != total:
                    ckpt.save(done, state, data_iter=data_state, meta=meta)
            elapsed = time.time() - t0
            if total > start or ckpt.latest_step() is None:
                ckpt.save(int(state.step), state, data_iter=data_state, meta=meta, force=True)
            ckpt.wait()
            writer.close()
    finally:
        sigterm.close()
        ckpt.close()
    steps_per_sec = (total - start) / elapsed if total > start else 0.0
    return TrainResult(state=state, final_metrics={k: float(v) for k, v in jax.device_get(metrics).items()},
                       steps_per_sec=steps_per_sec)


def load_state(task: Task, *, optim_config, train_config, mesh: Mesh, rules, workdir: str,
               step: int | None = None) -> TrainState:
    """Restores the train state in `workdir` onto `mesh` (for sampling / evaluation / export): the latest, or the
    checkpoint of `step`."""
    tx = make_optimizer(optim_config, int(train_config.steps))
    _, abstract, _ = build_state_fns(task, tx, mesh, rules, train_config.get("seed", 0))
    ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
    try:
        if step is not None and step not in ckpt.all_steps():
            raise MissingInputError(f"no checkpoint of step {step} under {workdir}/checkpoints (it holds "
                                    f"{ckpt.all_steps()})")
        restored = ckpt.restore(abstract, step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise MissingInputError(f"no checkpoint under {workdir}/checkpoints: run the training mode first")
    return restored[0]


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints kept in `workdir` (`checkpoint.max_to_keep` of them), oldest first."""
    ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()
