"""Command-line entry point.

  python -m latent_lm.main --config=configs/default.py --workdir=runs/default --mode=all
  python -m latent_lm.main --config=configs/default.py:animal_mnist --config.train.steps=2000 --mode=train

Modes: train_vae | encode | train | sample | eval | all (the stages in order).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from latent_lm import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, latents, samples, metrics.")
_MODE = flags.DEFINE_enum("mode", "all", ["all", *experiment.RUNNERS], "Which stage to run.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax/grain INFO logs drown the progress lines
        logging.set_verbosity(logging.WARNING)
    experiment.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)
