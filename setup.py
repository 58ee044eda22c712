"""latent-lm: LatentLM (next-token diffusion) in JAX/Flax."""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # exact pin: an unpinned torch resolves to a multi-GB CUDA build
# libtpu must match jax exactly (jax[tpu]==X brings the libtpu built for X): this is the jax the project is tested
# with. Move it with jax.
JAX_TPU = "jax[tpu]==0.10.2"

setup(
    name="latent-lm",
    version="0.1.0",
    description="LatentLM: multimodal latent language modeling with next-token diffusion, in JAX/Flax",
    python_requires=">=3.10",
    # configs/ is a package of ml_collections .py files so installed copies can import them too.
    packages=find_packages(include=["latent_lm", "latent_lm.*", "data_pipelines", "data_pipelines.*", "configs"]),
    install_requires=[
        "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "tensorflow-datasets",
        "einops", "chex", "absl-py", "tensorboardX", "importlib_resources", "array_record", "numpy", "scipy",
        "matplotlib", "safetensors", "pillow", "tokenizers",
        "espeakng-loader",  # libespeak-ng 1.52 and its voices, no root: the speech corpus (docs/method.md §12.1)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "diffusers", TORCH],
        "torch": [TORCH],
        # gs:// workdirs: epath reaches buckets through fsspec's gcsfs (without TensorFlow); orbax lists checkpoint
        # steps in a bucket with google-cloud-storage (orbax.checkpoint gcs_utils.get_bucket).
        "gcs": ["gcsfs", "google-cloud-storage"],
        # The TPU compiler (libtpu, ≈ 140 MB): TPU VMs, and AOT plans for named TPU topologies on any machine
        # (docs/scaling_out.md §6.4). Without a TPU attached the entry points keep jax on the CPU (cli.py).
        "tpu": [JAX_TPU],
    },
)
