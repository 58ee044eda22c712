"""Pod-scale sharding on 8 fake devices: DP, FSDP, TP and mixtures are config changes that train identically;
parameters really are split; scan-over-layers keeps the program flat in depth; checkpoints restore onto other meshes.
"""

import dataclasses
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train_loop import MODEL, ToyTask, _skip, configs, toy_data

from latent_lm.models.latent_lm import LatentLM
from latent_lm.parallel.mesh import DEFAULT_RULES, largest_replicated, make_mesh, shard_batch
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.train_loop import Preempted, build_state_fns, jit_train_step, train

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def _mesh(shape):
    return make_mesh(ml_collections.ConfigDict(dict(shape=shape)), jax.devices()[: int(np.prod(shape))])


def _steps(shape, n=3):
    """n train steps on `shape`; returns (losses, params on host, shardings of the state)."""
    optim, train_cfg, _ = configs(n)
    tx, schedule = make_optimizer(optim, n), learning_rate_schedule(optim, n)
    mesh = _mesh(shape)
    init, _, shardings = build_state_fns(ToyTask(), tx, mesh, DEFAULT_RULES, 0)
    data = toy_data()
    losses = []
    with jax.set_mesh(mesh):
        state = init(jax.random.PRNGKey(0))
        step = jit_train_step(ToyTask(), tx, schedule, optim.ema_decay, shardings, mesh)
        for _ in range(n):
            state, metrics = step(state, shard_batch(next(data), mesh))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state, shardings


@pytest.fixture(scope="module")
def single_device():
    return _steps((1, 1, 1))


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_trains_like_one_device(shape, single_device):
    ref_losses, ref_params, _, _ = single_device
    losses, params, state, shardings = _steps(shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-4)
    # params, optimizer moments and EMA all follow the logical rules
    fc1 = state.params["params"]["backbone"]["blocks"]["mlp"]["fc1"]["kernel"]
    mu = state.opt_state[1][0].mu["params"]["backbone"]["blocks"]["mlp"]["fc1"]["kernel"]
    ema = state.ema_params["params"]["backbone"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding == mu.sharding == ema.sharding
    name, size = largest_replicated(state.params, shardings.params)
    total = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"mesh {shape}: largest unsharded parameter {name} ({size} of {total} elements)")
    if shape[1] * shape[2] > 1:  # any model parallelism: only small vectors may stay whole
        assert size <= 256, (name, size)
    else:  # pure data parallelism replicates everything by design
        assert size == max(x.size for x in jax.tree.leaves(state.params))


def _train_step_hlo_chars(depth: int, remat: str) -> int:
    cfg = dataclasses.replace(MODEL, depth=depth, remat=remat)

    class Task(ToyTask):
        @property
        def model(self):
            return LatentLM(cfg)

    optim, _, _ = configs(2)
    tx, schedule = make_optimizer(optim, 2), learning_rate_schedule(optim, 2)
    mesh = _mesh((1, 1, 1))
    _, abstract, shardings = build_state_fns(Task(), tx, mesh, DEFAULT_RULES, 0)
    batch = {"latents": jax.ShapeDtypeStruct((16, 8, 2), jnp.float32), "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
    with jax.set_mesh(mesh):
        return len(jit_train_step(Task(), tx, schedule, 0.9, shardings, mesh).lower(abstract, batch).as_text())


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_program_size_flat_in_depth(remat):
    shallow, deep = _train_step_hlo_chars(2, remat), _train_step_hlo_chars(16, remat)
    assert deep < 1.05 * shallow, (shallow, deep)


def test_scanned_params_are_stacked_and_remat_is_exact():
    model = LatentLM(MODEL)
    args = (jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8, 2)), jnp.arange(8)[None].repeat(2, 0) > 0)
    params = jax.tree.map(lambda x: x, model.init(jax.random.PRNGKey(0), *args))
    q = params["params"]["backbone"]["blocks"]["attn"]["query"]["kernel"]
    assert q.value.shape == (MODEL.depth, MODEL.width, MODEL.num_heads, MODEL.width // MODEL.num_heads)
    assert q.names == ("layers", "embed", "heads", "kv")
    grads = {}
    for remat in ["none", "full", "dots"]:
        m = LatentLM(dataclasses.replace(MODEL, remat=remat))
        f = lambda p: jnp.sum(jnp.square(m.apply(p, *args)[0]))
        grads[remat] = jax.grad(f)(params)
        if remat != "none":
            assert "remat" in str(jax.make_jaxpr(jax.grad(f))(params))
    for remat in ["full", "dots"]:
        for x, y in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _sigterm_after(it, n):
    """Yields from `it`; delivers SIGTERM to this process when batch `n` is read (a simulated preemption)."""
    for i, batch in enumerate(it):
        if i == n:
            os.kill(os.getpid(), signal.SIGTERM)
        yield batch


def test_restore_onto_other_meshes_continues_identically(tmp_path):
    """Preempted (SIGTERM) under (2,2,2); continued under (8,1,1) and under one device: both match an uninterrupted
    run (to fp32 tolerance: a different mesh reduces in a different order)."""
    optim, train_cfg, ckpt = configs(8)

    def run(shape, name, data):
        return train(ToyTask(), data, optim_config=optim, train_config=train_cfg, mesh=_mesh(shape),
                     rules=DEFAULT_RULES, workdir=str(tmp_path / name), checkpoint_config=ckpt, log=lambda s: None)

    full = run((1, 1, 1), "full", toy_data())
    with pytest.raises(Preempted) as preempted:
        run((2, 2, 2), "saved", _sigterm_after(toy_data(), 4))
    done = preempted.value.step
    assert 0 < done < 8
    for shape in [(8, 1, 1), (1, 1, 1)]:
        shutil.copytree(tmp_path / "saved", tmp_path / f"resumed{shape[0]}")
        res = run(shape, f"resumed{shape[0]}", _skip(toy_data(), done))
        assert int(res.state.step) == 8
        for x, y in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(full.state.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=2e-4)
