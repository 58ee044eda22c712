"""Model sizes of the paper and the official code (docs/method.md §4.6; official `Transformer_models`, `DiT_models`).

Each preset is (depth, width, heads, mlp_ratio, head_depth). `EXPECTED_PARAMS` is the official PyTorch parameter
count at input_size 16 (256 tokens), 16 latent channels and 1000 classes (+1 null row), for the count test.

DiT twins (docs/method.md §9): the DiT of a scaling-family size has the same depth, width and heads as the LatentLM of
that name but SwiGLU mlp_ratio 4 (LatentLM uses 6 there, which equalises the totals against DiT's adaLN) and no
diffusion head. `DIT_EXPECTED_PARAMS` are the exact official counts (of the official state dicts), which include
the frozen `pos_embed` [256, D].
"""

PRESETS: dict[str, tuple[int, int, int, float, int]] = {
    # ImageNet models (MAR-style B/L/H).
    "B": (24, 768, 12, 4.0, 6),
    "L": (32, 1024, 16, 4.0, 8),
    "H": (40, 1280, 20, 4.0, 12),
    # Scaling family (DiT-twin comparisons, tokenizer-variance and throughput studies).
    "Base": (12, 768, 12, 6.0, 3),
    "Medium": (24, 1024, 16, 6.0, 3),
    "Large": (24, 1536, 12, 6.0, 3),
    "XL": (24, 2048, 16, 6.0, 3),
    "3B": (32, 2560, 20, 6.0, 3),
    "7B": (32, 4096, 32, 6.0, 3),
    "13B": (40, 5120, 40, 6.0, 3),
}

EXPECTED_PARAMS: dict[str, float] = {
    "B": 212.2e6, "L": 495.2e6, "H": 1006.7e6, "Base": 143.2e6, "Medium": 455.4e6, "Large": 1023.6e6,
    "XL": 1818.8e6, "3B": 3.68e9, "7B": 9.42e9, "13B": 18.1e9,
}


def apply_preset(model_config, head_config, name: str) -> None:
    """Writes a preset's sizes into `config.model` / `config.head` (in place)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {list(PRESETS)}")
    depth, width, heads, ratio, head_depth = PRESETS[name]
    model_config.update(dict(depth=depth, width=width, num_heads=heads, mlp_ratio=ratio))
    head_config.depth = head_depth


DIT_MLP_RATIO = 4.0
DIT_SIZES = ("Base", "Medium", "Large", "XL", "3B", "7B", "13B")  # official `DiT_models`
DIT_EXPECTED_PARAMS: dict[str, int] = {
    "Base": 130_358_784, "Medium": 454_567_936, "Large": 1_028_668_416, "XL": 1_824_542_720,
}


def dit_preset(name: str) -> tuple[int, int, int, float]:
    """(depth, width, heads, mlp_ratio) of the DiT twin of the scaling-family size `name`."""
    if name not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {name!r}; the DiT twins are {list(DIT_SIZES)}")
    depth, width, heads, _, _ = PRESETS[name]
    return depth, width, heads, DIT_MLP_RATIO


def apply_dit_preset(model_config, name: str) -> None:
    """Writes the DiT twin of size `name` into `config.model` (in place) and selects it (`arch="dit"`)."""
    depth, width, heads, ratio = dit_preset(name)
    model_config.update(dict(arch="dit", depth=depth, width=width, num_heads=heads, mlp_ratio=ratio))
