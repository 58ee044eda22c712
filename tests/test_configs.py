"""Every experiment config instantiates, validates, has the model size it claims, and its tiny variant lowers.

The list covers each config file's documented arguments and every point of every `get_sweep()`; the tiny variant
(`:...,tiny=1`, the same recipe on the embedded data) of each validates, and each distinct train-step program among
them is traced and lowered through the real train step.
"""

import importlib
import json
import math

import flax.linen as nn
import jax
import pytest

from configs import args, imagenet, scaling, tokenizer_variance
from latent_lm.config_validation import validate
from latent_lm.experiment import STAGES
from latent_lm.errors import ConfigError
from latent_lm.models.presets import EXPECTED_PARAMS
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.planning import abstract_batch
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.latents import cache_shape, LatentNormalization
from latent_lm.training.tasks import make_generator_task, VAETask
from latent_lm.training.train_loop import build_state_fns, jit_train_step

IMAGENET_ARGS = [f"size={s},arch={a}" for s in ("B", "L", "H", "Base", "Medium", "Large", "XL", "3B", "7B", "13B")
                 for a in ("latent_lm", "dit")] + ["size=XL,resolution=384"]


def _cases():
    cases = [("default", None), ("default", "animal_mnist"), ("imagenet_vae", None)]
    cases += [("imagenet", a) for a in IMAGENET_ARGS]
    for module, scale in ((scaling, "embedded"), (scaling, "imagenet"), (tokenizer_variance, "embedded"),
                          (tokenizer_variance, "imagenet")):
        cases += [(module.__name__.split(".")[-1], p["config_arg"]) for p in module.get_sweep(f"scale={scale}")]
    return cases


CASES = _cases()


def _load(name: str, arg: str | None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def _task(config):
    if "train" in config.stages:
        return make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0)), config.train, config.optim
    return VAETask.from_config(config), config.vae_train, config.vae_optim


def _num_params(task) -> int:
    shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_instantiates_and_validates(name, arg):
    config = _load(name, arg)
    validate(config, STAGES)
    json.loads(config.to_json())  # the resolved config is what the workdir and every checkpoint store
    assert _num_params(_task(config)[0]) > 0


# Official PyTorch counts (official_state_dict_keys.md; DiT's include its fixed pos_embed, 256·D, ours is a constant).
OFFICIAL_DIT = {"Base": 130_358_784, "Medium": 454_567_936, "Large": 1_028_668_416}


@pytest.mark.parametrize("size", list(OFFICIAL_DIT))
def test_scaling_configs_have_the_official_parameter_counts(size):
    """The ImageNet configs build the official model sizes: LatentLM (docs/method.md §4.6) and its DiT twin
    (docs/method.md §9)."""
    latent_lm = _num_params(_task(imagenet.get_config(f"size={size}"))[0])
    assert abs(latent_lm - EXPECTED_PARAMS[size]) / EXPECTED_PARAMS[size] < 0.001
    dit = _num_params(_task(imagenet.get_config(f"size={size},arch=dit"))[0])
    width = imagenet.get_config(f"size={size}").model.width
    assert dit in (OFFICIAL_DIT[size], OFFICIAL_DIT[size] - 256 * width)


def _tiny_cases():
    """The distinct tiny variants (many sizes shrink to the same tiny config)."""
    seen, out = set(), []
    for name, arg in CASES:
        config = _load(name, f"{arg},tiny=1" if arg else "tiny=1")
        key = config.to_json()
        if key not in seen:
            seen.add(key)
            out.append((name, arg, config))
    return out


TINY = _tiny_cases()


def _train_step_key(config) -> str:
    """Everything the tiny variant's train step is built from (its task, optimizer, schedule, batch and mesh); the
    rest (dataset name, paths, eval, checkpointing, the σ-VAE's nonzero std, a constant) leaves the program's
    structure as it is."""
    if "train" in config.stages:
        sections = ("model", "head", "diffusion", "optim", "train")
        vae = dict(kind=config.vae.get("kind", "sigma"), zero_std=config.vae.std == 0, latent_dim=config.vae.latent_dim,
                   patch_size=config.vae.patch_size)
    else:
        sections = ("vae", "vae_loss", "vae_optim", "vae_train")
        vae = {}
    key = {s: config[s].to_dict() for s in sections}
    key.update(mesh=config.mesh.to_dict(), vae_shape=vae, images=(config.data.image_size, config.data.channels,
                                                                  config.data.num_classes))
    for s in ("train", "vae_train"):
        if s in key:
            key[s] = {k: v for k, v in key[s].items() if k not in ("log_every", "seed")}
    return json.dumps(key, sort_keys=True, default=str)


def _programs():
    """One tiny variant per distinct train-step program, with the other variants that build the same one."""
    groups: dict[str, list] = {}
    for name, arg, config in TINY:
        groups.setdefault(_train_step_key(config), []).append((name, arg, config))
    return list(groups.values())


PROGRAMS = _programs()


@pytest.mark.parametrize("name,arg,config", TINY, ids=[f"{n}:{a}" for n, a, _ in TINY])
def test_tiny_variant_validates_on_embedded_data(name, arg, config):
    validate(config, STAGES)
    assert config.data.dataset in ("mnist", "animal_mnist")  # embedded data


@pytest.mark.parametrize("group", PROGRAMS, ids=[f"{g[0][0]}:{g[0][1]}" + (f"(+{len(g) - 1})" if len(g) > 1 else "")
                                                 for g in PROGRAMS])
def test_tiny_variant_lowers_the_train_step(group):
    """Traced and lowered through the real train step, once per distinct program: the variants in `group` build
    the same one (`_train_step_key`), so lowering the first lowers them all."""
    _, _, config = group[0]
    task, train_cfg, optim_cfg = _task(config)
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh)
    tx = make_optimizer(optim_cfg, train_cfg.steps)
    _, abstract, shardings = build_state_fns(task, tx, mesh, rules, 0)
    if "train" in config.stages:
        batch = abstract_batch(mesh, train_cfg.batch_size, *cache_shape(config))
    else:
        d = config.data
        batch = {"image": jax.ShapeDtypeStruct((train_cfg.batch_size, d.image_size, d.image_size, d.channels),
                                               jax.numpy.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jit_train_step(task, tx, learning_rate_schedule(optim_cfg, train_cfg.steps), optim_cfg.ema_decay,
                              shardings, mesh)
        hlo = step.lower(abstract, batch).as_text()
    assert "stablehlo.dot_general" in hlo


def test_train_step_key_tells_programs_apart():
    """The grouping above merges only what builds one program: the default's tiny variant shares its key with the
    animal-silhouette one, and a change to the model, the optimizer or the posterior splits it."""
    base = _load("default", "tiny=1")
    assert _train_step_key(base) == _train_step_key(_load("default", "animal_mnist,tiny=1"))
    for section, field, value in (("model", "width", 64), ("optim", "lr", 0.5), ("vae", "kind", "kl"),
                                  ("vae", "std", 0.0), ("train", "batch_size", 8), ("mesh", "shape", (1, -1, 1))):
        other = _load("default", "tiny=1")
        other[section][field] = value
        assert _train_step_key(other) != _train_step_key(base), (section, field)


@pytest.mark.parametrize("name,arg,message", [
    ("imagenet", "size=Q", "unknown model size"),
    ("imagenet", "sizes=L", "unknown config argument 'sizes'"),
    ("imagenet", "resolution=big", "is not a int"),
    ("scaling", "scale=moon", "scale='moon'"),
    ("tokenizer_variance", "tokenizer=sigma", "tokenizer"),
])
def test_bad_config_arguments_are_one_clear_error(name, arg, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _load(name, arg)


def test_args_parse_types_and_bare_first_word():
    a = args.parse("L,resolution=384,tiny=1", imagenet.ARGS)
    assert (a.size, a.resolution, a.tiny, a.arch) == ("L", 384, True, "latent_lm")


def test_imagenet_eval_checks_its_fid_inputs_before_any_stage(tmp_path):
    """A run whose stages end in FID fails at once, not after training, when the Inception inputs are absent."""
    from latent_lm import experiment
    from latent_lm.errors import MissingInputError

    config = imagenet.get_config("size=L")
    with pytest.raises(ConfigError, match="eval.reference_stats"):
        experiment.run(config, str(tmp_path), "all")
    config.eval.reference_stats = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    with pytest.raises(MissingInputError, match="VIRTUAL_imagenet256_labeled.npz does not exist"):
        experiment.run(config, str(tmp_path), "all")
    assert not (tmp_path / "lm").exists()
