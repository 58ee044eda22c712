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


ARGS = dict(arm="latentlm", role="all", seed=0, tiny=False)
ROLES = ("all", "tokenizer", "generator")
TOKENIZER_STAGES = ("train_tokenizer", "train_vae", "encode")
GENERATOR_STAGES = ("train", "eval_loss", "generate", "eval_mllm")


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
    c.text = ml_collections.ConfigDict(dict(vocab_size=1024, min_frequency=2))

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
    # λ of L = CE + λ·MSE (docs/method.md §6.3): 5, the Transfusion paper's value, for both continuous arms. Measured
    # here (docs/experiments.md §10.3): λ = 1 → text-to-image 60% / image-to-text 87.5% / PPL 32.1; λ = 5 → 90.5% /
    # 82% / 34.3.
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
    # images per class, captions of `caption_images` held-out images, `interleaved_samples` free documents.
    c.eval.update(dict(loss_batch=16 if a.tiny else 32, samples_per_class=2 if a.tiny else 20,
                       caption_images=8 if a.tiny else 200, interleaved_samples=4 if a.tiny else 50,
                       sample_batch=20 if a.tiny else 100))
    return c


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
