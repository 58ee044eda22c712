"""Small CNN classifier for 28×28×1 images: sample accuracy and the feature space of the Fréchet distance."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_lm import storage
from latent_lm.pixels import to_signed

Params = Any
_EVAL_BATCH = 500  # fixed batch for `classify`: one compile per number of classes


class CNNClassifier(nn.Module):
    """Two stride-2 3×3 convs (32, 64 channels), a 128-d feature layer, logits."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))  # 14×14
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))  # 7×7
        features = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(features), features


def _augment(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Random integer shifts of up to 2 pixels (edge-padded with background -1)."""
    b = x.shape[0]
    pad = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    dy, dx = jax.random.randint(rng, (2, b), 0, 5)
    crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(im, (i, j, 0), x.shape[1:]))
    return crop(pad, dy, dx)


def train_classifier(images_uint8: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 1500,
                     batch_size: int = 128, seed: int = 0, learning_rate: float = 2e-3,
                     augment: bool = True) -> Params:
    """Trains the CNN with Adam (cosine decay) on uint8 images [N,28,28,1]; returns params."""
    model = CNNClassifier(num_classes)
    rng = jax.random.PRNGKey(seed)
    params = model.init(rng, jnp.zeros((1, *images_uint8.shape[1:]), jnp.float32))
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
    opt_state = tx.init(params)
    images = jnp.asarray(images_uint8)
    labels = jnp.asarray(labels, jnp.int32)
    n = images.shape[0]

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_aug = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)  # sampling with replacement: no epoch bookkeeping
        x = to_signed(images[idx])
        if augment:
            x = _augment(k_aug, x)

        def loss_fn(p):
            logits, _ = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        params, opt_state, _ = step(params, opt_state, jax.random.fold_in(rng, i))
    return jax.device_get(params)


@functools.lru_cache(maxsize=None)
def _apply_fn(num_classes: int):
    model = CNNClassifier(num_classes)
    return jax.jit(lambda p, x: model.apply(p, to_signed(x)))


def classify(params: Params, images_uint8: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (logits [N,K], features [N,128]) as numpy, in fixed-size jitted batches."""
    images_uint8 = np.asarray(images_uint8, np.uint8)
    apply = _apply_fn(num_classes)
    n = len(images_uint8)
    logits, feats = [], []
    for i in range(0, n, _EVAL_BATCH):
        chunk = images_uint8[i:i + _EVAL_BATCH]
        m = len(chunk)
        if m < _EVAL_BATCH:  # pad to the fixed batch to reuse the compiled function
            chunk = np.concatenate([chunk, np.zeros((_EVAL_BATCH - m, *chunk.shape[1:]), np.uint8)])
        lo, fe = apply(params, chunk)
        logits.append(np.asarray(lo)[:m])
        feats.append(np.asarray(fe)[:m])
    if not logits:
        return np.zeros((0, num_classes), np.float32), np.zeros((0, 128), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


def save_classifier(params: Params, path: str) -> None:
    """Writes params as msgpack, atomically (temp file + rename; `path` may be a URL)."""
    storage.write_bytes_atomic(path, flax.serialization.msgpack_serialize(jax.device_get(params)))


def load_classifier(path: str) -> Params:
    return flax.serialization.msgpack_restore(storage.read_bytes(path))
