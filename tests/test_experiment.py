"""The whole pipeline (train_vae → encode → train → sample → eval → eval_loss) through `experiment.run`, tiny and on a
one-device mesh; config validation.

The fast test starts from finished trainings (random weights) and runs every stage; the slow one trains the σ-VAE,
the generator and the scoring classifier for real. Both use the same sizes, so the slow test's other programs come
from the compilation cache that the fast one (same file, same worker) filled."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tts
from latent_lm import experiment
from latent_lm.checkpoint import Checkpointer
from latent_lm.config_validation import ConfigError, validate
from latent_lm.evaluation import classifier as clf
from latent_lm.latents import LatentNormalization
from latent_lm.parallel import mesh as mesh_lib
from latent_lm.parallel.mesh import DEFAULT_RULES
from latent_lm.training.optimizer import make_optimizer
from latent_lm.training.tasks import VAETask, make_generator_task
from latent_lm.training.train_loop import build_state_fns


def tiny_config(steps=2):
    c = default.get_config()
    c.vae.update(dict(width=32, depth=1))
    c.vae_train.update(dict(steps=steps, batch_size=16, log_every=2))
    c.model.update(dict(width=32, depth=1))
    c.head.depth = 1
    c.train.update(dict(steps=steps, batch_size=16, log_every=2))
    c.optim.warmup_steps = c.vae_optim.warmup_steps = steps - 1  # what the clamp gave; validation rejects ≥ steps
    c.diffusion.update(dict(num_sampling_steps=2, batch_mul=1))  # eval_loss runs the head batch_mul× per token
    c.eval.update(dict(samples_per_class=1, sample_batch=10, classifier_steps=20, loss_batch=500, loss_repeats=1))
    c.checkpoint.every = 2
    c.mesh.shape = (1, 1, 1)
    return c


@pytest.fixture
def one_device(monkeypatch):
    """`run` builds its mesh on the first device only (a quarter of the 8-device compile time; data parallelism over
    the mesh is test_sharding's and test_multihost's)."""
    mesh = mesh_lib.make_mesh(None, jax.devices()[:1])
    monkeypatch.setattr(experiment, "make_mesh", lambda cfg: mesh)
    return mesh


def _check_outputs(path, config, summary):
    """What every stage leaves in the workdir, and the summary `run` returns and writes to done.json."""
    per, steps = config.eval.samples_per_class, config.train.steps
    samples = np.load(path / "samples" / "final.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (10 * per, 28, 28, 1)
    assert samples["labels"].tolist() == np.repeat(np.arange(10), per).tolist()
    assert (path / "samples" / "final.png").stat().st_size > 0
    result = json.loads((path / "eval" / "final.json").read_text())
    for key in ("sample_conditional_accuracy", "sample_fd", "random_latent_fd", "vae_psnr_db",
                "variance_collapse_ratio"):
        assert np.isfinite(result[key]), key
    assert summary["train_latents"] == [4000, 49, 4]
    loss = json.loads((path / "eval" / "loss.json").read_text())
    assert loss["family"] == "latent_lm" and loss["steps"] == steps
    assert loss["eval_batches"] == summary["test_latents"][0] // config.eval.loss_batch
    assert np.isfinite(loss["eval_loss"]) and loss["train_flops"] == steps * loss["flops_per_step"] > 0
    assert json.loads((path / "done.json").read_text())["eval_loss"] == loss["eval_loss"]
    assert (path / "lm" / "metrics.jsonl").exists() and (path / "vae" / "metrics.jsonl").exists()


def _write_finished_training(workdir: str, config, mesh) -> None:
    """vae/ and lm/ checkpoints at their last step and eval's classifier, with random values in every leaf (nothing
    is compiled): what training (and a previous eval) leave behind, so that `run` restores them and has no step left
    to take."""
    rng = np.random.default_rng(0)
    norm = LatentNormalization(scale=1.0, bias=0.0)  # shapes only: the train stage restores with the encoded one
    for task, optim, train_cfg, sub in ((VAETask.from_config(config), config.vae_optim, config.vae_train, "vae"),
                                        (make_generator_task(config, norm), config.optim, config.train, "lm")):
        _, abstract, _ = build_state_fns(task, make_optimizer(optim, train_cfg.steps), mesh, DEFAULT_RULES, 0)
        state = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
                             if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype), abstract)
        state = state.replace(step=np.int32(train_cfg.steps))
        ckpt = Checkpointer(f"{workdir}/{sub}/checkpoints", async_save=False)
        ckpt.save(train_cfg.steps, state, force=True)
        ckpt.close()
    # eval's scoring classifier, as a previous eval (or a sweep's shared classifier_dir) leaves it
    classifier = jax.eval_shape(clf.CNNClassifier(10).init, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
    clf.save_classifier(jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), classifier),
                        f"{workdir}/eval/classifier.msgpack")


def test_all_stages_from_finished_training(tmp_path, one_device):
    """Every stage through `run`, with both trainings and the scoring classifier already there (random weights:
    compiling the train steps is what makes the slow test slow; the toy tests train through the same loop,
    test_evaluation the classifier): the training stages resume with nothing to do, eval loads the classifier, and
    encode, sample, eval and eval_loss write everything the slow test checks."""
    config = tiny_config()
    _write_finished_training(str(tmp_path), config, one_device)
    summary = experiment.run(config, str(tmp_path), "all")
    assert summary["lm_steps_per_sec"] == 0.0
    _check_outputs(tmp_path, config, summary)


@pytest.mark.slow
def test_all_stages_write_their_outputs(tmp_path, one_device):
    """The same with real training: σ-VAE and generator 4 steps each, the scoring classifier 20."""
    config = tiny_config(steps=4)
    summary = experiment.run(config, str(tmp_path), "all")
    _check_outputs(tmp_path, config, summary)
    # A second `train` call resumes from the final checkpoint and has nothing left to do.
    assert experiment.run(config, str(tmp_path), "train")["lm_steps_per_sec"] == 0.0


@pytest.mark.parametrize("path,value,msg", [
    (("vae", "patch_size"), 5, "not divisible by vae.patch_size"),
    (("model", "latent_dim"), 8, "must equal vae.latent_dim"),
    (("diffusion", "prediction_type"), "x0", "prediction_type"),
    (("model", "num_heads"), 5, "heads of even size"),
])
def test_invalid_configs_fail_with_one_clear_error(path, value, msg):
    c = default.get_config()
    setattr(c[path[0]], path[1], value)
    with pytest.raises(ConfigError, match=msg):
        validate(c, experiment.STAGES)


def test_a_text_split_the_tokenizer_lacks_is_one_clear_error():
    c = tts.get_config()
    c.text.split = "syllables"
    with pytest.raises(ConfigError, match="text.split='syllables' must be one of"):
        validate(c, experiment.STAGES)


@pytest.mark.parametrize("tok,workdir,expected", [
    ("", "runs/a", "runs/a"), ("../tok", "runs/sweep/a", "runs/sweep/tok"),
    ("../tok", "gs://b/runs/a", "gs://b/runs/tok"), ("/abs/tok", "runs/a", "/abs/tok"), ("gs://c/t", "runs/a", "gs://c/t"),
])
def test_tokenizer_workdir_is_relative_to_the_run(tok, workdir, expected):
    c = default.get_config()
    c.data.tokenizer_workdir = tok
    assert experiment.tokenizer_dir(c, workdir) == expected


@pytest.mark.parametrize("tok,vae,expected", [
    ("", "", "runs/a/vae"), ("../tok", "", "runs/tok/vae"), ("../tok", "../imagenet_vae", "runs/imagenet_vae/vae"),
    ("", "gs://b/runs/imagenet_vae", "gs://b/runs/imagenet_vae/vae"),
])
def test_vae_workdir_defaults_to_the_tokenizer_dir(tok, vae, expected):
    """The σ-VAE is read from `data.vae_workdir` (relative to the run, as tokenizer_workdir) or the tokenizer dir;
    the latents stay in the tokenizer dir either way (docs/experiments.md §10.4)."""
    c = default.get_config()
    c.data.update(dict(tokenizer_workdir=tok, vae_workdir=vae))
    assert experiment.vae_dir(c, "runs/a") == expected
    assert experiment.data_paths(c, "runs/a").latents == f"{experiment.tokenizer_dir(c, 'runs/a')}/latents"
