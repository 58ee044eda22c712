"""Pod-scale sharding on 8 fake devices: DP, FSDP, TP and mixtures are config changes that train identically;
parameters really are split; scan-over-layers keeps the program flat in depth; checkpoints restore onto other meshes.
"""

import dataclasses
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import (MODEL, REF_STEPS, Interrupted, ToyTask, assert_same_state, configs, mesh_of, toy_data,
                             train_toy)

from latent_lm.models.latent_lm import LatentLM
from latent_lm.parallel.mesh import DEFAULT_RULES, largest_replicated, shard_batch
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.train_loop import Preempted, build_state_fns, jit_train_step

# Every mesh kind: pure DP, pure FSDP, DP×FSDP×TP, FSDP×TP. (2,2,2) splits the batch over data×fsdp and the model
# over fsdp×tensor at once: the fast tier trains on it; the others train in the slow tier (their layouts are checked
# in the fast one, by test_state_layout_follows_the_rules).
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
TRAIN_MESHES = [pytest.param(m, marks=[] if m == (2, 2, 2) else [pytest.mark.slow], id="x".join(map(str, m)))
                for m in MESHES]


def _steps(shape, n=3):
    """n train steps on `shape`, as train() takes them (the REF_STEPS schedule, the logical-axis rules in scope: the
    same programs as the toy runs, so the compilation cache shares them); returns (losses, params on host, state,
    shardings of the state)."""
    optim, _, _ = configs()
    tx, schedule = make_optimizer(optim, REF_STEPS), learning_rate_schedule(optim, REF_STEPS)
    mesh = mesh_of(shape)
    init, _, shardings = build_state_fns(ToyTask(), tx, mesh, DEFAULT_RULES, 0)
    data = toy_data()
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = init(jax.random.PRNGKey(0))
        step = jit_train_step(ToyTask(), tx, schedule, optim.ema_decay, shardings, mesh)
        for _ in range(n):
            state, metrics = step(state, shard_batch(next(data), mesh))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state, shardings


@pytest.fixture(scope="module")
def single_device():
    return _steps((1, 1, 1))


@pytest.mark.parametrize("shape", TRAIN_MESHES)
def test_mesh_trains_like_one_device(shape, single_device):
    """Initialised and trained on `shape`, the toy run matches one device (fp32 tolerance)."""
    ref_losses, ref_params, _, _ = single_device
    losses, params, state, _ = _steps(shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-4)
    # the trained arrays are laid out as the rules say (test_state_layout_follows_the_rules checks the rules' layout)
    _, _, shardings = build_state_fns(ToyTask(), make_optimizer(configs()[0], REF_STEPS), mesh_of(shape),
                                      DEFAULT_RULES, 0)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert x.sharding == s


@pytest.mark.parametrize("shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_state_layout_follows_the_rules(shape):
    """Params, optimizer moments and EMA of the train state on `shape` (abstract: nothing is compiled) are split
    by the logical rules: only small vectors stay whole under any model parallelism; pure DP replicates all."""
    _, abstract, shardings = build_state_fns(ToyTask(), make_optimizer(configs()[0], REF_STEPS), mesh_of(shape),
                                             DEFAULT_RULES, 0)
    kernel = lambda tree: tree["params"]["backbone"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel(shardings.params) == kernel(shardings.opt_state[1][0].mu) == kernel(shardings.ema_params)
    if shape == (2, 2, 2):
        P = jax.sharding.PartitionSpec
        # [layers, embed, mlp]: the scanned layer axis whole, embed over fsdp, mlp over tensor
        assert kernel(shardings.params).spec == P(None, "fsdp", "tensor")
        # the [5, 32] class table: 5 rows cannot be split in 2, so that dimension falls back to replication
        assert shardings.params["params"]["token_embed"]["embedding"].spec == P(None, "fsdp")
    name, size = largest_replicated(abstract.params, shardings.params)
    total = sum(x.size for x in jax.tree.leaves(abstract.params))
    print(f"mesh {shape}: largest unsharded parameter {name} ({size} of {total} elements)")
    if shape[1] * shape[2] > 1:  # any model parallelism: only small vectors may stay whole
        assert size <= 256, (name, size)
    else:  # pure data parallelism replicates everything by design
        assert size == max(x.size for x in jax.tree.leaves(abstract.params))


def _train_step_hlo_chars(depth: int, remat: str) -> int:
    cfg = dataclasses.replace(MODEL, depth=depth, remat=remat)

    class Task(ToyTask):
        @property
        def model(self):
            return LatentLM(cfg)

    optim, _, _ = configs(2)
    tx, schedule = make_optimizer(optim, 2), learning_rate_schedule(optim, 2)
    mesh = mesh_of((1, 1, 1))
    _, abstract, shardings = build_state_fns(Task(), tx, mesh, DEFAULT_RULES, 0)
    batch = {"latents": jax.ShapeDtypeStruct((16, 8, 2), jnp.float32), "label": jax.ShapeDtypeStruct((16,), jnp.int32),
             "poison": jax.ShapeDtypeStruct((16,), jnp.int32)}
    with jax.set_mesh(mesh):
        return len(jit_train_step(Task(), tx, schedule, 0.9, shardings, mesh).lower(abstract, batch).as_text())


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_program_size_flat_in_depth(remat):
    shallow, deep = _train_step_hlo_chars(2, remat), _train_step_hlo_chars(16, remat)
    assert deep < 1.05 * shallow, (shallow, deep)


def test_scanned_params_are_stacked_and_remat_is_exact():
    model = LatentLM(MODEL)
    args = (jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8, 2)), jnp.arange(8)[None].repeat(2, 0) > 0)
    # Random values in every leaf, not the init (whose zero-initialised adaLN layers would zero most gradients and
    # make the comparison below weak); no init program to compile either.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
                          jax.eval_shape(model.init, jax.random.PRNGKey(0), *args))
    q = params["params"]["backbone"]["blocks"]["attn"]["query"]["kernel"]
    assert q.value.shape == (MODEL.depth, MODEL.width, MODEL.num_heads, MODEL.width // MODEL.num_heads)
    assert q.names == ("layers", "embed", "heads", "kv")
    losses = {}
    for remat in ["none", "full", "dots"]:
        m = LatentLM(dataclasses.replace(MODEL, remat=remat))
        losses[remat] = lambda p, m=m: jnp.sum(jnp.square(m.apply(p, *args)[0]))
        if remat != "none":
            assert "remat" in str(jax.make_jaxpr(jax.grad(losses[remat]))(params))
    # one compiled program for the three gradients (eagerly, each op would compile on its own)
    grads = jax.jit(lambda p: {k: jax.grad(f)(p) for k, f in losses.items()})(params)
    for remat in ["full", "dots"]:
        for x, y in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _resume_from_step_8(toy_reference, tmp_path):
    """A copy of the reference run holding only its step-8 checkpoint (written on one device)."""
    run = tmp_path / "run"
    shutil.copytree(toy_reference.workdir, run)
    for step in ("16", str(REF_STEPS)):
        shutil.rmtree(run / "checkpoints" / step)
    return run


def test_restore_onto_other_meshes_continues_identically(tmp_path, toy_reference):
    """A one-device checkpoint continued under (2,2,2), preempted (SIGTERM) there, continued on one device again:
    the run ends where the uninterrupted reference does, in params, optimizer state and EMA (to fp32 tolerance:
    another mesh reduces in another order)."""
    run, logs = _resume_from_step_8(toy_reference, tmp_path), []
    with pytest.raises(Preempted) as preempted:
        train_toy(run, Interrupted(toy_data(), at=5), (2, 2, 2), log=logs.append)
    assert preempted.value.step == 13
    res = train_toy(run, toy_data(), (1, 1, 1), log=logs.append)
    resumed = [line for line in logs if line.startswith("resumed")]
    assert resumed == ["resumed from step 8", "resumed from step 13"] and int(res.state.step) == REF_STEPS
    assert_same_state(res.state, toy_reference.state, exact=False)


@pytest.mark.slow
def test_restore_between_multi_device_meshes_continues_identically(tmp_path, toy_reference):
    """The same through (2,2,2) → (8,1,1): the preemption checkpoint resharded between two multi-device layouts
    (FSDP×TP-split to replicated), then 11 steps of pure data parallelism, ending where the reference does."""
    run = _resume_from_step_8(toy_reference, tmp_path)
    with pytest.raises(Preempted):
        train_toy(run, Interrupted(toy_data(), at=5), (2, 2, 2))
    res = train_toy(run, toy_data(), (8, 1, 1))
    assert_same_state(res.state, toy_reference.state, exact=False)
