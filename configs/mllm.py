"""Multimodal LatentLM at embedded scale (docs/experiments.md §10): text, text-to-image, image-to-text and interleaved
documents over MNIST and its captions in one causal model, and the study's baselines on the same data.

  python -m latent_lm.main --config=configs/mllm.py --workdir=runs/mllm_one --mode=all       # one arm, every stage
  python -m latent_lm.sweep --config=configs/mllm.py --root=runs/mllm                       # the study (make mllm)
Stages: the text tokenizer and the σ-VAE (the image tokenizer, as `make run` trains it), the latent caches, then the
generator on packed documents (`arm=latentlm`: training.tasks.MultimodalTask; `transfusion`, `vq`: the baselines of
docs/method.md §9.3–9.4), its held-out loss, generation on held-out prompts and their scores. `tiny=1` shrinks it for
smoke runs. Derived values (the latent grid, the gathered head capacity, the VQ vocabulary) are computed here.
"""

import ml_collections

from configs import args
from configs.default import get_config as image_config
from latent_lm.errors import ConfigError

ARMS = ("latentlm", "transfusion", "vq")  # the arms of the study (issue 15): same backbone, steps and data


ARGS = dict(arm="latentlm", role="all", seed=0, tiny=False, scale="embedded", size="1.3B")
# embedded: MNIST and its captions (docs/experiments.md §10.1–10.3); paper: COCO pairs and web text with the ImageNet
# σ-VAE and a LLaMA-style backbone of `size` (docs/experiments.md §10.4; `_paper_scale`).
SCALES = ("embedded", "paper")
ROLES = ("all", "tokenizer", "generator")
TOKENIZER_STAGES = ("train_tokenizer", "train_vae", "encode")
GENERATOR_STAGES = ("train", "eval_loss", "generate", "eval_mllm", "eval_curve")


def tokenizer_run(arm: str) -> str:
    """The sweep's tokenizer run an arm reads: the σ-VAE for LatentLM and Transfusion, the FSQ tokenizer for VQ."""
    return "tok_fsq" if arm == "vq" else "tok_sigma"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`mllm.py:arm=latentlm,tiny=1`. `role=all` (default) runs every stage in one workdir; the study's sweep splits
    it into `role=tokenizer` runs (text tokenizer, image tokenizer, latent caches) and `role=generator` runs that read
    them through `data.tokenizer_workdir`."""
    a = args.parse(arg, ARGS)
    if a.arm not in ARMS:
        raise ConfigError(f"unknown arm {a.arm!r}; choose one of {list(ARMS)}")
    if a.role not in ROLES:
        raise ConfigError(f"unknown role {a.role!r}; choose one of {list(ROLES)}")
    c = image_config("mnist,tiny=1" if a.tiny else "mnist")
    c.stages = {"all": TOKENIZER_STAGES + GENERATOR_STAGES, "tokenizer": TOKENIZER_STAGES,
                "generator": GENERATOR_STAGES}[a.role]
    if a.role == "generator":
        c.data.tokenizer_workdir = f"../{tokenizer_run(a.arm)}"
    c.train.seed = a.seed

    # Byte-level BPE (docs/method.md §7.3): `vocab_size` counts the 8 special tokens and the 256 bytes.
    c.text = ml_collections.ConfigDict(dict(vocab_size=1024, min_frequency=2, split="words"))

    grid = (c.data.image_size // c.vae.patch_size) ** 2
    seq_len = 128  # the longest document (two images, "the digit after … is …") fits one row
    # Packed documents (data_pipelines/mllm_documents.py): kinds and their weights, the rate at which a
    # text-to-image caption is dropped to <null> (classifier-free guidance, docs/method.md §8.3).
    c.documents = ml_collections.ConfigDict(dict(
        mix=(("text_to_image", 0.3), ("image_to_text", 0.3), ("question", 0.1), ("successor", 0.1),
             ("paragraph", 0.1), ("caption", 0.1)),
        null_prompt_rate=0.1))
    c.model.update(dict(arch="mllm", num_classes=0, text_vocab_size=c.text.vocab_size, max_len=seq_len,
                        class_dropout=0.0))
    # The diffusion head runs on at most this many latent targets per row, gathered (docs/method.md §7.3): as many
    # whole images as a row can hold, so the packer never has to drop one.
    c.model.head_capacity = grid * max(1, seq_len // (grid + 2))
    if not a.tiny:
        c.model.update(dict(width=128, depth=4, num_heads=4))
        c.train.update(dict(steps=2000, batch_size=32))
        # Peak learning rate for every arm (cosine to 0.05·lr after 100 warm-up steps). Measured on LatentLM seed 0
        # with training-noised caption prompts (docs/experiments.md §10.3): 1e-3 (configs/default.py's) left
        # image-to-text underfit (82% held out, 86.5% on train images); 2e-3 → text-to-image 88.0% / image-to-text
        # 89.5% / PPL 27.0 (seed 1: 86.0% / 87.5% / 25.3); 3e-3 → 84.0% / 90.5% / 24.4. The study at 2e-3 with
        # mean prompts: 91.5% / 92.0% / 26.8 (seed 1: 88.5% / 92.0% / 25.4).
        c.optim.lr = 2e-3
    # λ of L = CE + λ·MSE (docs/method.md §6.3): 5, the Transfusion paper's value, for both continuous arms. Measured
    # here (docs/experiments.md §10.3): λ = 1 → text-to-image 60% / image-to-text 87.5% / PPL 32.1; λ = 5 → 90.5% /
    # 82% / 34.3 (seed 1: 82.5% / 80% / 31.8); λ = 3 with image-to-text at 0.4 of the mix → 60% / 85.5% / 35.6.
    c.diffusion.diffusion_weight = 5.0
    if a.arm == "transfusion":  # whole-image diffusion in the backbone (docs/method.md §9.3)
        c.model.arch = "transfusion"
    if a.arm == "vq":
        # VQ-MLLM (docs/method.md §9.4): the run's own FSQ tokenizer (train_vae trains it into this run's vae/; never
        # point data.tokenizer_workdir at a σ-VAE run) at the same 7×7 grid, latent_dim = len(levels) = the σ-VAE's
        # 4 channels; its ∏ L_i codes follow the text ids in the LM head's vocabulary; CE only.
        from latent_lm.models.fsq import codebook_size
        c.vae.update(dict(kind="fsq", latent_dim=len(c.vae.fsq_levels)))
        c.model.update(dict(arch="vq", latent_dim=c.vae.latent_dim,
                            text_vocab_size=c.text.vocab_size + codebook_size(c.vae.fsq_levels)))
    # generate / eval_mllm (docs/method.md §10.5): text-to-image from the captions of `samples_per_class` held-out
    # images per class, captions of `caption_images` held-out images, `interleaved_samples` free documents. Caption
    # prompts show the σ-VAE's mean μ: on LatentLM seed 0, held-out test images 200–999 (not the scored 0–199) were
    # captioned 89.4% right from μ against 87.6% from latents σ-noised as in training (docs/experiments.md §10.3).
    c.eval.update(dict(loss_batch=16 if a.tiny else 32, samples_per_class=2 if a.tiny else 20,
                       caption_images=8 if a.tiny else 200, interleaved_samples=4 if a.tiny else 50,
                       sample_batch=20 if a.tiny else 100, prompt_latents="mean"))
    # eval_curve scores every checkpoint the run keeps (the study's metrics against training tokens): keep them all.
    c.checkpoint.max_to_keep = -(-c.train.steps // c.checkpoint.every)
    if a.scale != "embedded":
        _paper_scale(c, a)
    return c


# LLaMA-style backbones of the paper-scale model: (depth, width, heads, SwiGLU mlp_ratio, diffusion-head depth). The
# paper's MLLM sizes (its Table 8) are not recovered: "1.3B" is the reference spec's suggestion, 24 × 2048, 16 heads,
# SwiGLU hidden 5,440 (⌊8/3·D/64⌋·64, docs/method.md §4.2), RoPE θ 10⁴, 3 head blocks. The sizes of
# latent_lm/models/presets.py are accepted too (e.g. `size=Medium` for a smaller trial).
PAPER_SIZES = {"1.3B": (24, 2048, 16, 4.0, 3)}
# What `scale=paper` runs: the image tokenizer is an ImageNet σ-VAE run's, read from <tokenizer dir>/vae, not trained;
# generate and the scores read the embedded captions' grammar and classifiers, so they do not run here.
PAPER_STAGES = ("train_tokenizer", "encode", "train", "eval_loss")


def _paper_scale(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    """`scale=paper` (docs/experiments.md §10.4): COCO 2014 image–caption pairs and C4 web text read from tfds
    ArrayRecord files (`data.data_dir`; data_pipelines/coco_documents.py), the ImageNet σ-VAE of
    configs/imagenet_vae.py as the image tokenizer (256² → 16×16 latents of 16 channels), and a LLaMA-style backbone
    of `size` on rows of 2,048 positions. The paper's data mix, model size and recipe (its Table 8) are not
    recovered: the values below are our defaults, and the comments say where they come from."""
    from configs import imagenet_vae
    from data_pipelines import coco_captions, coco_documents
    from latent_lm.models.presets import PRESETS

    if a.scale not in SCALES:
        raise ConfigError(f"unknown scale {a.scale!r}; choose one of {list(SCALES)}")
    if a.tiny:
        raise ConfigError("tiny=1 is the embedded smoke run; it does not combine with scale=paper")
    if a.arm == "vq":
        raise ConfigError("arm=vq has no paper-scale tokenizer: it needs an FSQ tokenizer at the ImageNet σ-VAE's "
                          "16×16 grid, which no config trains yet; use arm=latentlm or arm=transfusion")
    sizes = {**PAPER_SIZES, **PRESETS}
    if a.size not in sizes:
        raise ConfigError(f"unknown size {a.size!r}; choose one of {list(sizes)}")
    depth, width, heads, mlp_ratio, head_depth = sizes[a.size]

    # The image tokenizer: the ImageNet σ-VAE's sections as configs/imagenet_vae.py trains it (ViT-B, patch 16,
    # C_σ 0.75, its GAN and optimizer), so that its checkpoint restores for `encode` from the ImageNet run's vae/
    # (`data.vae_workdir`; the latents and the text tokenizer go to this run's tokenizer dir).
    tok = imagenet_vae.get_config()
    for section in ("vae", "vae_loss", "vae_train", "vae_optim"):
        c[section] = tok[section]
    c.data.update(dict(dataset=coco_captions.NAME, image_size=tok.data.image_size, channels=tok.data.channels,
                       num_classes=0, data_dir="", num_workers=8, cache_shards=64,
                       encode_batch_size=tok.data.encode_batch_size))
    grid = (c.data.image_size // c.vae.patch_size) ** 2  # 256 latents per image
    # COCO pairs and web text (data_pipelines/coco_documents.py: its defaults, ours). One data dir for both tfds
    # datasets: `documents.data_dir` follows `data.data_dir` (a field reference), which `encode` reads.
    c.documents = ml_collections.ConfigDict(coco_documents.default_config())
    c.documents.data_dir = c.data.get_ref("data_dir")
    # LLaMA's vocabulary size, for our byte-level BPE trained on captions and web text.
    c.text.update(dict(vocab_size=32_000, min_frequency=2))

    seq_len = 2048  # 7 pairs (≈ 256 + 15 positions each) or one long text chunk per row
    c.model.update(dict(depth=depth, width=width, num_heads=heads, num_kv_heads=None, mlp_ratio=mlp_ratio,
                        latent_dim=c.vae.latent_dim, text_vocab_size=c.text.vocab_size, max_len=seq_len,
                        dtype="bfloat16", remat="full"))
    c.head.depth = head_depth
    # The head runs on at most 4 images' latents per row (gathered, docs/method.md §7.3): the mix averages ≈ 2.5
    # images per row; a row whose images would pass 4 packs the next document into another row, none is dropped.
    c.model.head_capacity = 4 * grid
    # A LLaMA-like recipe for 1B models (ours): 256 rows × 2,048 = 0.5 M positions per step, 200k steps ≈ 105 B
    # positions; AdamW β₂ 0.95, weight decay 0.1, clip 1, cosine to 0.1·lr after 2k warm-up steps; bf16, FSDP over
    # every device.
    c.train.update(dict(steps=200_000, batch_size=256, log_every=100))
    c.optim.update(dict(lr=3e-4, warmup_steps=2000, final_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1,
                        clip_norm=1.0, ema_decay=0.9999))
    c.mesh.shape = (1, -1, 1)
    c.checkpoint.update(dict(every=2000, max_to_keep=3))
    c.eval.update(dict(loss_batch=64, loss_repeats=2))
    c.stages = tuple(s for s in c.stages if s in PAPER_STAGES)


def get_sweep(arg: str | None = None) -> list[dict]:
    """The study (`make mllm`, docs/experiments.md §10): the two tokenizer runs, then each arm on the same data,
    backbone and steps; `seeds` > 1 repeats the LatentLM arm with other seeds (the seed spread of its row)."""
    a = args.parse(arg, dict(seeds=1, tiny=False))
    base = "tiny=1," if a.tiny else ""
    points = [{"name": "tok_sigma", "config_arg": f"{base}role=tokenizer,arm=latentlm"},
              {"name": "tok_fsq", "config_arg": f"{base}role=tokenizer,arm=vq"}]
    for arm in ARMS:
        for seed in range(a.seeds if arm == "latentlm" else 1):
            name = arm if seed == 0 else f"{arm}_seed{seed}"
            points.append({"name": name, "config_arg": f"{base}role=generator,arm={arm},seed={seed}"})
    return points
