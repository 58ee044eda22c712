"""Config-file arguments: `--config=configs/x.py:size=L,arch=dit` → typed values, and the `tiny` shrink.

Every experiment config takes `key=value` pairs after the colon; a bare first word sets the first key (so
`configs/imagenet.py:L` still means size=L). Unknown keys and untypable values are one clear error.
"""

from __future__ import annotations

import ml_collections

from latent_lm.experiment import IMAGE_STAGES
from latent_lm.errors import ConfigError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
    """'a=1,b=x' over `defaults` (their types decide the parse); returns a locked ConfigDict of the values."""
    values = dict(defaults)
    for i, item in enumerate(p for p in (arg or "").split(",") if p.strip()):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            if i:
                raise ConfigError(f"config argument {item!r} is not key=value")
            key, raw = next(iter(defaults)), key
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}")
        values[key] = _typed(key, raw, defaults[key])
    return ml_collections.ConfigDict(values)


def _typed(key: str, raw: str, default):
    try:
        if isinstance(default, bool):
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError
            return raw.lower() in _TRUE
        return type(default)(raw) if default is not None else raw
    except ValueError:
        raise ConfigError(f"config argument {key}={raw!r} is not a {type(default).__name__}") from None


def shrink_to_embedded(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `tiny` variant of any experiment: the same recipe (arch, objective, sampler, stages) on the embedded
    MNIST data at a size that trains in seconds on a CPU. Used by tests and by `:tiny=1` smoke runs."""
    c.data.update(dict(dataset="mnist", image_size=28, channels=1, num_classes=10, data_dir="", mixture=(),
                       num_workers=0, cache_shards=4, encode_batch_size=500))
    c.vae.update(dict(patch_size=4, width=32, depth=1, num_heads=4, latent_dim=4))
    c.vae_train.update(dict(steps=20, batch_size=16, log_every=10))
    c.model.update(dict(width=32, depth=2, num_heads=4, num_kv_heads=None, latent_dim=4, num_classes=10, max_len=49,
                        dtype="float32"))
    c.head.depth = 1
    c.train.update(dict(steps=20, batch_size=16, log_every=10))
    c.optim.update(dict(warmup_steps=2))
    c.vae_optim.update(dict(warmup_steps=2))
    c.diffusion.num_sampling_steps = 4
    c.checkpoint.update(dict(every=10, max_to_keep=2))
    c.eval.update(dict(samples_per_class=2, sample_batch=20, classifier_steps=50, loss_batch=200, loss_repeats=1))
    c.mesh.shape = (-1, 1, 1)
    c.mesh.dcn_shape = (1, 1, 1)
    if not c.data.tokenizer_workdir:  # standalone: train its own tokenizer first
        c.stages = IMAGE_STAGES
    return c
