"""Model sizes of the paper and the official code (spec §2.4; official `Transformer_models`).

Each preset is (depth, width, heads, mlp_ratio, head_depth). `expected_params` is the official PyTorch parameter
count at input_size 16 (256 tokens), 16 latent channels and 1000 classes (+1 null row), for the count test.
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
