"""Multimodal LatentLM at embedded scale (docs/experiments.md §9): text, text-to-image, image-to-text and interleaved
documents over MNIST and its captions in one causal model.

Stages: the text tokenizer and the σ-VAE (the image tokenizer, as `make run` trains it), the latent caches, then
LatentLM on packed documents (`training.tasks.MultimodalTask`), and its held-out loss. `tiny=1` shrinks it for smoke
runs. Derived values (the latent grid, the gathered head capacity) are computed here.
"""

import ml_collections

from configs import args
from configs.default import get_config as image_config
from latent_lm.errors import ConfigError

ARMS = ("latentlm",)  # the Transfusion and VQ arms of the study come next (issue 15)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`mllm.py:arm=latentlm,tiny=1`."""
    a = args.parse(arg, dict(arm="latentlm", tiny=False))
    if a.arm not in ARMS:
        raise ConfigError(f"unknown arm {a.arm!r}; choose one of {list(ARMS)}")
    c = image_config("mnist,tiny=1" if a.tiny else "mnist")
    c.stages = ("train_tokenizer", "train_vae", "encode", "train", "eval_loss", "generate", "eval_mllm")

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
    # generate / eval_mllm (docs/method.md §10.5): text-to-image from the captions of `samples_per_class` held-out
    # images per class, captions of `caption_images` held-out images, `interleaved_samples` free documents.
    c.eval.update(dict(loss_batch=16 if a.tiny else 32, samples_per_class=2 if a.tiny else 20,
                       caption_images=8 if a.tiny else 200, interleaved_samples=4 if a.tiny else 50,
                       sample_batch=20 if a.tiny else 100))
    return c
