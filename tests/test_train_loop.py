"""The one train loop: learns, runs unchanged on 1 and 8 devices, skips non-finite steps, resumes exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.training.batches import class_conditional_batch
from latent_lm.training.generator_losses import latent_lm_loss
from latent_lm.diffusion import make_schedule
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh, resolve_mesh_shape
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.training.train_loop import load_state, train

MODEL = LatentLMConfig(width=32, depth=2, num_heads=4, latent_dim=2, head_depth=1, num_classes=4, max_len=8)


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """Class-conditional LatentLM on latents whose mean depends on the class; optional NaN injection."""

    nan_at_label: int = -1

    @property
    def model(self):
        return LatentLM(MODEL)

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8, 2)), jnp.zeros((1, 8), bool))

    def loss(self, params, batch, rng):
        loss, m = latent_lm_loss(self.model, params, class_conditional_batch(batch["latents"], batch["label"]), rng,
                                 schedule=make_schedule("cosine", 1000), prediction_type="v_prediction",
                                 batch_mul=2, class_dropout=0.1)
        poison = jnp.any(batch["label"] == self.nan_at_label)
        return jnp.where(poison, jnp.nan, loss), m


def toy_data(seed=0, batch=16):
    rng = np.random.default_rng(seed)
    while True:
        label = rng.integers(0, 4, batch).astype(np.int32)
        lat = (label[:, None, None] - 1.5 + 0.1 * rng.standard_normal((batch, 8, 2))).astype(np.float32)
        yield {"latents": lat, "label": label}


def configs(steps, every=None):
    optim = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=5, final_lr_ratio=0.1, b1=0.9, b2=0.98,
                                           eps=1e-8, weight_decay=0.01, clip_norm=1.0, ema_decay=0.9))
    train_cfg = ml_collections.ConfigDict(dict(steps=steps, batch_size=16, log_every=5, seed=0))
    ckpt = ml_collections.ConfigDict(dict(every=every or steps, max_to_keep=3, async_save=True))
    return optim, train_cfg, ckpt


def run(tmp_path, steps, mesh_shape=(1, 1, 1), every=None, task=ToyTask(), data=None, name="run"):
    optim, train_cfg, ckpt = configs(steps, every)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=mesh_shape)), devices)
    return train(task, data or toy_data(), optim_config=optim, train_config=train_cfg, mesh=mesh,
                 rules=DEFAULT_RULES, workdir=str(tmp_path / name), checkpoint_config=ckpt, log=lambda s: None)


def test_loss_falls_and_metrics_written(tmp_path):
    res = run(tmp_path, 60)
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[-1]["step"] == 60 and "diffusion_loss" in rows[-1] and "grad_norm" in rows[-1]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert int(res.state.step) == 60 and int(res.state.skipped) == 0


def test_one_device_and_eight_devices_agree(tmp_path):
    assert len(jax.devices()) == 8
    a = run(tmp_path, 6, (1, 1, 1), name="one")
    b = run(tmp_path, 6, (2, 2, 2), name="eight")
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=2e-4)
    # the embedding table is really split over the fsdp axis on the 8-device mesh
    fc1 = b.state.params["params"]["backbone"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # a 5-row table cannot be split in 2: that dimension falls back to replication
    emb = b.state.params["params"]["token_embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_non_finite_steps_are_skipped(tmp_path):
    res = run(tmp_path, 20, task=ToyTask(nan_at_label=3))
    assert int(res.state.skipped) > 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(res.state.params))


def test_resume_continues_identically(tmp_path):
    full = run(tmp_path, 12, name="full")
    # an interrupted run: 6 steps (checkpointed), then a new process-equivalent call continues to 12
    data = toy_data()
    run(tmp_path, 6, every=6, data=data, name="resumed")
    optim, train_cfg, ckpt = configs(12)
    rest = train(ToyTask(), _skip(toy_data(), 6), optim_config=optim, train_config=train_cfg,
                 mesh=make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1]),
                 rules=DEFAULT_RULES, workdir=str(tmp_path / "resumed"), checkpoint_config=ckpt, log=lambda s: None)
    for x, y in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(rest.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    restored = load_state(ToyTask(), optim_config=optim, train_config=train_cfg,
                          mesh=make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))), rules=DEFAULT_RULES,
                          workdir=str(tmp_path / "resumed"))
    assert int(restored.step) == 12


def _skip(it, n):
    for _ in range(n):
        next(it)
    return it


@pytest.mark.parametrize("shape,n,msg", [((3, 1, 1), 8, "has 3 devices"), ((-1, 3, 1), 8, "does not divide"),
                                         ((1, 1), 8, "must have 3 entries"), ((-1, -1, 1), 8, "at most one -1")])
def test_bad_mesh_shapes(shape, n, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_mesh_shape(shape, n)


def test_batch_not_divisible_by_data_parallel(tmp_path):
    optim, train_cfg, ckpt = configs(2)
    train_cfg.batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        train(ToyTask(), toy_data(batch=12), optim_config=optim, train_config=train_cfg,
              mesh=make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))), rules=DEFAULT_RULES,
              workdir=str(tmp_path / "bad"), checkpoint_config=ckpt, log=lambda s: None)
