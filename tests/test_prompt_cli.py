"""`python -m latent_lm.prompt_cli` (docs/experiments.md §10.2): a user's own prompts against a multimodal run, on a
tiny run with random parameters (what is checked is the plumbing: files, shapes, one clear error line)."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.embedded import load_embedded
from data_pipelines.latent_cache import write_latent_cache
from latent_lm import cli, prompt_cli
from test_convert_mllm import write_tiny_mllm_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    made = write_tiny_mllm_run(str(tmp_path_factory.mktemp("prompt")))
    config = made["config"]
    config.diffusion.num_sampling_steps = 2
    with open(f"{made['run']}/config.json", "w") as f:
        f.write(config.to_json())
    _, labels = load_embedded("mnist", "test")  # the held-out cache the generator's stages read
    latents = np.random.default_rng(0).normal(size=(len(labels), 49, 4)).astype(np.float32)
    write_latent_cache(f"{made['tok']}/latents/test", latents, labels, {})
    write_latent_cache(f"{made['tok']}/latents/train", latents[:10], labels[:10],
                       {"latent_norm": {"scale": 0.8, "bias": 0.1}})
    return made


def test_text_to_image_writes_a_grid_and_a_record(run, tmp_path, capsys):
    out = tmp_path / "t2i"
    prompt_cli.main(["--workdir", run["run"], "--task=text_to_image", "--text=a thick digit seven.", "--num=2",
                     f"--out={out}"])
    assert Image.open(out / "text_to_image.png").size[0] > 28
    record = json.loads((out / "generations.json").read_text())
    assert record["task"] == "text_to_image" and len(record["generations"]) == 2
    assert "wrote" in capsys.readouterr().out


def test_caption_and_free_generation(run, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(load_embedded("mnist", "test")[0][0, :, :, 0]).save(image)
    prompt_cli.main(["--workdir", run["run"], "--task=caption", f"--image={image}", "--max_new=5",
                     f"--out={tmp_path / 'cap'}"])
    captions = json.loads((tmp_path / "cap" / "generations.json").read_text())["generations"]
    assert len(captions) == 1 and isinstance(captions[0], str)
    prompt_cli.main(["--workdir", run["run"], "--task=free", "--text=the digit after", "--max_new=6", "--num=2",
                     f"--out={tmp_path / 'free'}"])
    free = json.loads((tmp_path / "free" / "generations.json").read_text())["generations"]
    assert len(free) == 2 and all(isinstance(g["text"], str) for g in free)


def test_bad_input_is_one_error_line(run, tmp_path, capsys):
    assert cli.run(prompt_cli.main, ["--workdir", str(tmp_path), "--task=complete", "--text=x"]) == 2
    assert cli.run(prompt_cli.main, ["--workdir", run["run"], "--task=caption"]) == 2
    assert cli.run(prompt_cli.main, ["--workdir", run["run"], "--task=caption", "--image=/nope.png"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
