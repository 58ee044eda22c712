"""LatentLM: one causal Transformer over interleaved discrete tokens and latent vectors (spec §2–4).

Sequence contract (all arrays [B, T, ...]; position i's hidden state predicts position i+1):
  tokens      int   discrete ids in one table: classes 0..K-1, the null class K, then text ids from K+1
  latents     float input latent vectors (read where `is_latent`)
  is_latent   bool  which input positions are latent vectors (linear projection) vs tokens (embedding)
  text_targets, text_mask      next-token CE targets (raw text ids 0..V-1) and where they apply
  latent_targets, latent_mask  next-latent diffusion targets [B,T,C] and where they apply
Class-conditional image generation is the special case [class][z0..z_{N-2}] → targets z0..z_{N-1} (spec §4.1).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.diffusion import NoiseSchedule, add_noise, training_target
from latent_lm.models.diffusion_head import DiffusionHead
from latent_lm.models.layers import Dense, KVCache, rms_norm
from latent_lm.models.transformer import ConditionLayer, Transformer


@dataclasses.dataclass(frozen=True)
class LatentLMConfig:
    """Constructor arguments of LatentLM (built from `config.model` and `config.head`)."""

    width: int
    depth: int
    num_heads: int
    latent_dim: int
    head_depth: int
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    head_mlp_ratio: float | None = None  # None: same as the backbone (official)
    num_classes: int = 0
    text_vocab_size: int = 0
    max_len: int = 256
    posi_scale: float = 1.0
    remat: str = "none"  # a key of transformer.REMAT_POLICIES
    dtype: str = "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def text_offset(self) -> int:
        """Id of text token 0 in the shared embedding table (after the classes and the null class)."""
        return self.num_classes + 1 if self.num_classes else 0

    @property
    def embed_rows(self) -> int:
        return self.text_offset + self.text_vocab_size

    @classmethod
    def from_config(cls, config) -> "LatentLMConfig":
        m, h = config.model, config.head
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in m.items() if k in fields}
        return cls(head_depth=h.depth, head_mlp_ratio=h.get("mlp_ratio"), **kwargs)


class LatentLM(nn.Module):
    """Embeddings, causal backbone, ConditionLayer, optional LM head and the per-token diffusion head."""

    config: LatentLMConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.token_embed = nn.Embed(
            cfg.embed_rows, cfg.width, dtype=dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        # x_embedder: per-token Linear(C→D) with a zero bias (official PatchEmbed, patch 1).
        self.latent_embed = Dense(cfg.width, ("latent", "embed"), use_bias=True, dtype=dtype, name="x_embedder")
        self.backbone = Transformer(cfg.depth, cfg.num_heads, cfg.kv_heads, cfg.mlp_ratio, cfg.posi_scale,
                                    cfg.remat, dtype)
        self.condition_layer = ConditionLayer(dtype)
        self.head = DiffusionHead(cfg.latent_dim, cfg.head_depth, cfg.head_mlp_ratio or cfg.mlp_ratio, dtype)
        if cfg.text_vocab_size:
            self.lm_head = Dense(cfg.text_vocab_size, ("embed", "vocab"), dtype=dtype)

    def embed(self, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array) -> jax.Array:
        chex.assert_rank([tokens, latents, is_latent], [2, 3, 2])
        tok = self.token_embed(tokens)
        lat = self.latent_embed(latents)
        return nn.with_logical_constraint(jnp.where(is_latent[..., None], lat, tok), ("batch", "length", "embed"))

    def backbone_forward(self, h: jax.Array, positions: jax.Array, caches: KVCache | None = None
                         ) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """Runs the causal stack; returns (conditions, hidden, caches). Conditions feed the diffusion head."""
        hidden, caches = self.backbone(h, positions, caches)
        return self.condition_layer(hidden), hidden, caches

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Text logits from the backbone output: RMSNorm (no gain) → Linear(D→V), in fp32."""
        return self.lm_head(rms_norm(hidden)).astype(jnp.float32)

    def diffuse(self, x_t: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
        return self.head(x_t, t, condition).astype(jnp.float32)

    def __call__(self, tokens, latents, is_latent, positions=None):
        """Teacher-forced pass: (conditions [B,T,D], hidden [B,T,D]). Also used by `init`."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cond, hidden, _ = self.backbone_forward(self.embed(tokens, latents, is_latent), positions)
        if self.is_initializing():  # create every parameter once
            self.diffuse(latents, jnp.zeros(tokens.shape, jnp.int32), cond)
            if self.config.text_vocab_size:
                self.lm_logits(hidden)
        return cond, hidden


def init_cache(config: LatentLMConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zero KV caches for all layers, [depth, B, max_len, n_kv, d_head] each (spec §5.1; scanned with the blocks)."""
    shape = (config.depth, batch, max_len, config.kv_heads, config.width // config.num_heads)
    return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))


def drop_class_tokens(rng: jax.Array, config: LatentLMConfig, tokens: jax.Array, is_latent: jax.Array,
                      prob: float) -> jax.Array:
    """CFG training: per example, replace class tokens by the null class with probability `prob` (spec §4.4)."""
    if not config.num_classes or prob <= 0:
        return tokens
    drop = jax.random.uniform(rng, (tokens.shape[0], 1)) < prob
    is_class = (~is_latent) & (tokens < config.num_classes)
    return jnp.where(drop & is_class, config.null_class, tokens)


def latent_lm_loss(model: LatentLM, params, batch: dict[str, jax.Array], rng: jax.Array, *,
                   schedule: NoiseSchedule, prediction_type: str, batch_mul: int, class_dropout: float,
                   diffusion_weight: float = 1.0, train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = CE (over text targets) + λ·MSE (over latent targets), each averaged over its own targets (spec §4.3).

    The backbone runs once; conditions are repeated `batch_mul`× (adjacent copies, repeat_interleave) and every
    copy of every target token gets its own uniform t and ε (spec §3.4–3.5). The MSE is in fp32.
    """
    cfg = model.config
    rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
    tokens = batch["tokens"]
    if train:
        tokens = drop_class_tokens(rng_drop, cfg, tokens, batch["is_latent"], class_dropout)
    cond, hidden = model.apply(params, tokens, batch["latents"], batch["is_latent"])
    metrics = {}
    loss = jnp.zeros((), jnp.float32)

    b, t_len = tokens.shape
    # Every [B·mul, T, ...] tensor is pinned to the batch sharding: left alone, GSPMD builds t and ε whole on every
    # device and the head then runs on all rows of an fsdp group (measured: 2.4× the temporaries at fsdp 8).
    rows = lambda x, *names: nn.with_logical_constraint(x, ("batch", "length", *names))
    x0 = rows(jnp.repeat(batch["latent_targets"].astype(jnp.float32), batch_mul, axis=0), "latent")
    cond_rep = rows(jnp.repeat(cond, batch_mul, axis=0), "embed")
    mask = jnp.repeat(batch["latent_mask"], batch_mul, axis=0).astype(jnp.float32)
    t = rows(jax.random.randint(rng_t, (b * batch_mul, t_len), 0, schedule.num_train_steps))
    noise = rows(jax.random.normal(rng_eps, x0.shape, jnp.float32), "latent")
    x_t = add_noise(schedule, x0, noise, t)
    out = model.apply(params, x_t, t, cond_rep, method=LatentLM.diffuse)
    err = jnp.mean(jnp.square(out - training_target(prediction_type, x0, noise, t, schedule)), axis=-1)
    diff_loss = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    metrics["diffusion_loss"] = diff_loss
    loss = loss + diffusion_weight * diff_loss

    if cfg.text_vocab_size:
        logits = model.apply(params, hidden, method=LatentLM.lm_logits)
        tmask = batch["text_mask"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["text_targets"][..., None], axis=-1)[..., 0]
        ce = jnp.sum(nll * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
        acc = jnp.sum((jnp.argmax(logits, -1) == batch["text_targets"]) * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
        metrics.update(ce_loss=ce, text_accuracy=acc)
        loss = loss + ce
    metrics["loss"] = loss
    return loss, metrics


def class_conditional_batch(latents: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """[class][z0..z_{N-2}] → targets z0..z_{N-1}: the ImageNet-style sequence (spec §4.1)."""
    chex.assert_rank([latents, labels], [3, 1])
    b, n, c = latents.shape
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(labels.astype(jnp.int32))
    inputs = jnp.concatenate([jnp.zeros((b, 1, c), latents.dtype), latents[:, :-1]], axis=1)
    is_latent = jnp.arange(n)[None, :].repeat(b, 0) > 0
    return dict(tokens=tokens, latents=inputs, is_latent=is_latent,
                latent_targets=latents, latent_mask=jnp.ones((b, n), bool),
                text_targets=jnp.zeros((b, n), jnp.int32), text_mask=jnp.zeros((b, n), bool))
