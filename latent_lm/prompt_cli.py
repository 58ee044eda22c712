"""Generate from a trained multimodal run with your own prompts (docs/experiments.md §10.2).

  python -m latent_lm.prompt_cli --workdir=runs/mllm_one --task=text_to_image --text="a thick digit seven." --num=8
  python -m latent_lm.prompt_cli --workdir=runs/mllm_one --task=caption --image=digit.png
  python -m latent_lm.prompt_cli --workdir=runs/mllm_one --task=complete --text="The for statement" --temperature=0.8
  python -m latent_lm.prompt_cli --workdir=runs/mllm_one --task=free --text="the digit after" --num=4

text_to_image: `<bos> text <boi>` → N latents with text CFG against `<bos> <null> <boi>` → decoded PNGs.
caption: a 28×28 grayscale PNG, encoded by the run's σ-VAE (σ-noised and normalised like training latents), as
`<bos> <boi> z… <eoi>` → greedy caption. complete: `<bos> text` → text (images too, if the model opens one).
free: `<bos> text` → interleaved text and images (`<boi>` switches to the diffusion head for N latents), sampled.
Everything goes to --out (default `<workdir>/prompts/`): PNGs of the images and `generations.json`.
The run's config is `<workdir>/config.json`; its tokenizers are found as training finds them (`data.tokenizer_workdir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from latent_lm import cli, mllm_stages, stage_inputs, storage
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.evaluation.grids import save_image_grid
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.pixels import to_signed
from latent_lm.training.tasks import VAETask

TASKS = ("text_to_image", "caption", "complete", "free")


def _config(workdir: str) -> ml_collections.ConfigDict:
    path = f"{workdir}/config.json"
    if not storage.exists(path):
        raise MissingInputError(f"{path} not found: is --workdir a multimodal run (configs/mllm.py)?")
    config = ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    if config.model.get("arch") not in ("mllm", "vq", "transfusion"):
        raise ConfigError(f"{workdir} is a model.arch={config.model.get('arch')!r} run; prompts need a multimodal "
                          f"run (configs/mllm.py)")
    return config


def _image_latents(config, workdir: str, path: str, mesh, rules) -> np.ndarray:
    """A 28×28 grayscale PNG → the σ-VAE's μ [N, C] (what the latent cache holds)."""
    if not storage.exists(path):
        raise MissingInputError(f"--image={path} not found")
    with storage.open_file(path) as f:
        image = np.asarray(Image.open(f).convert("L"))
    size = config.data.image_size
    if image.shape != (size, size):
        raise DataError(f"--image={path} is {image.shape[1]}×{image.shape[0]}; the run's images are {size}×{size}")
    vae = VAETask.from_config(config).model
    params = stage_inputs.vae_params(config, workdir, mesh, rules)
    x = to_signed(image[None, :, :, None])
    return np.asarray(vae.apply(params, x, method=SigmaVAE.cache_latents))[0]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latent_lm.prompt_cli", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--text", default="", help="the prompt text (text_to_image, complete, free)")
    p.add_argument("--image", default=None, help="caption: a grayscale PNG of the run's image size")
    p.add_argument("--num", type=int, default=1, help="generations per prompt")
    p.add_argument("--max_new", type=int, default=64, help="complete / caption / free: items to generate")
    p.add_argument("--temperature", type=float, default=None, help="text sampling (default: 0 = greedy, 1 for free)")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--cfg_scale", type=float, default=None, help="text_to_image (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.num < 1 or args.max_new < 1:
        raise ConfigError("--num and --max_new must be ≥ 1")
    if args.task == "caption" and not args.image:
        raise ConfigError("--task=caption needs --image=PATH.png")
    if args.task == "text_to_image" and not args.text:
        raise ConfigError("--task=text_to_image needs --text")
    config = _config(args.workdir)
    if args.cfg_scale is not None:
        config.diffusion.cfg_scale = args.cfg_scale
    config.eval.sample_batch = args.num
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))), jax.devices()[:1])  # one device suffices
    rules = logical_rules(config.mesh)
    gen, split = mllm_stages.multimodal_generator(config, args.workdir, mesh, rules)
    tok = split.tokenizer
    c = gen.task.model.config.latent_dim
    out_dir = args.out or f"{args.workdir}/prompts"
    rng = jax.random.PRNGKey(args.seed)
    text_ids = [tok.bos_id, *tok.encode(args.text)]

    def doc(ids, latents=None):
        is_latent = np.zeros(len(ids), bool) if latents is None else np.asarray([i < 0 for i in ids])
        lat = np.zeros((len(ids), c), np.float32)
        if latents is not None:
            lat[is_latent] = latents
        return dict(tokens=np.asarray([max(i, 0) for i in ids], np.int32), is_latent=is_latent, latents=lat)

    record = dict(task=args.task, text=args.text, image=args.image, generations=[])
    if args.task == "text_to_image":
        z, eoi = gen.images([doc(text_ids + [tok.boi_id])] * args.num, rng, [tok.bos_id, tok.null_id, tok.boi_id])
        images = gen.decode(z)
        save_image_grid(images, f"{out_dir}/text_to_image.png", ncols=min(8, args.num))
        record["generations"] = [dict(png="text_to_image.png", index=i, eoi_after_image=None if eoi is None
                                      else bool(eoi[i])) for i in range(args.num)]
    elif args.task == "caption":
        mu = _image_latents(config, args.workdir, args.image, mesh, rules)
        n = len(mu)
        ids = [tok.bos_id, tok.boi_id] + [-1] * n + [tok.eoi_id]
        outs = gen.captions([doc(ids, mu)] * args.num, rng, args.max_new)
        record["generations"] = [tok.decode([t for t in o if t != tok.eos_id]) for o in outs]
    else:
        if not hasattr(gen, "generate"):
            raise ConfigError(f"--task={args.task} needs the interleaved loop; model.arch="
                              f"{config.model.arch!r} has none")
        temperature = args.temperature if args.temperature is not None else (1.0 if args.task == "free" else 0.0)
        settings = gen.settings(args.max_new, guided=False, temperature=temperature)
        settings = dataclasses.replace(settings, top_p=args.top_p)
        g = gen.generate([doc(text_ids)] * args.num, settings, rng)
        latents = gen.item_latents(g)
        for b in range(args.num):
            parts, images, j, k = [], [], 0, int(g.num_generated[b])
            while j < k:
                if g.is_latent[b, j]:
                    end = j
                    while end < k and g.is_latent[b, end]:
                        end += 1
                    if end - j == gen.task.num_latents:
                        name = f"{args.task}_{b}_{len(images)}.png"
                        images.append(name)
                        save_image_grid(gen.decode(latents[b, j:end][None]), f"{out_dir}/{name}", ncols=1)
                        parts.append(f"[image {name}]")
                    else:
                        parts.append(f"[{end - j} latents: unfinished image]")
                    j = end
                else:
                    parts.append(tok.decode([int(g.tokens[b, j])]))
                    j += 1
            record["generations"].append(dict(text="".join(parts), images=images))
    storage.makedirs(out_dir)
    storage.write_json_atomic(f"{out_dir}/generations.json", record, indent=1)
    for item in record["generations"]:
        print(item if isinstance(item, str) else json.dumps(item))
    print(f"wrote {out_dir}/generations.json")


if __name__ == "__main__":
    cli.main(main)
