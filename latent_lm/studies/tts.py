"""Zero-shot TTS study of one speech run (the paper's Tables 4–5 at embedded scale; docs/method.md §12.4,
docs/experiments.md §11).

Reads what the run's stages wrote — eval/tts.json (judges' scores of both zero-shot modes, of the targets' real audio
and of their σ-VAE resynthesis; speed), eval/audio_vae.json (reconstruction), samples/tts/manifest.json (durations) —
and writes one table, one plot and a few WAVs:

  python -m latent_lm.studies.tts --workdir=runs/tts [--rates_root=runs/tts_rates] [--out=runs/tts/study]
      [--docs=docs/tts --wavs=2]

`--out` gets tts.md, tts.json and tts.png; `--docs` also gets them, with the first `--wavs` generations of each mode
and their prompts (what `make tts` puts in the repository's docs). `--rates_root`: the finished audio σ-VAE runs of
the frame-rate sweep (`make tts-rates`: `configs/tts.py`'s `get_sweep`); their reconstruction scores and the TTS
run's own make a second table, by frame rate.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from latent_lm import cli, storage
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.studies import new_figure, read_json, save_png, write_json, write_text

ROWS = (("real", "real audio of the targets"), ("resynthesis", "σ-VAE resynthesis (μ → decoder)"),
        ("continuation", "zero-shot: continuation"), ("reference", "zero-shot: reference utterance"))
COLUMNS = (("wer", "WER ↓", "{:.3f}"), ("per", "PER ↓", "{:.3f}"), ("sim", "SIM ↑", "{:.3f}"),
           ("duration_within_20pct", "duration ±20% ↑", "{:.0%}"), ("ended_by_eod", "ended by <eod>", "{:.0%}"),
           ("rtf", "RTF ↓", "{:.3f}"))


def collect(workdir: str) -> dict[str, Any]:
    """The run's scores: {"tts": eval/tts.json, "audio_vae": eval/audio_vae.json, "manifest": [...]}."""
    scores = read_json(f"{workdir}/eval/tts.json")
    missing = [name for name, _ in ROWS if name not in scores]
    if missing:
        raise DataError(f"{workdir}/eval/tts.json has no {missing} scores: re-run --mode=eval_tts")
    manifest_path = f"{workdir}/samples/tts/manifest.json"
    if not storage.exists(manifest_path):
        raise DataError(f"{manifest_path} is missing: run --mode=generate_tts")
    loss_path = f"{workdir}/eval/loss.json"  # eval_loss's, when it ran
    return {"tts": scores, "audio_vae": read_json(f"{workdir}/eval/audio_vae.json"),
            "manifest": json.loads(storage.read_text(manifest_path)),
            "loss": read_json(loss_path) if storage.exists(loss_path) else {}}


def table(run: dict[str, Any]) -> str:
    """Markdown: the four rows of ROWS, then the tokenizer's reconstruction, the judges' baselines and the floors."""
    t, v = run["tts"], run["audio_vae"]
    lines = ["| audio | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, label in ROWS:
        cells = [fmt.format(t[name][k]) if t[name].get(k) is not None else "–" for k, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    split = t["split"]
    sim, rec = t["floors"]["speaker"][split], t["floors"]["recogniser"][split]
    met = {mode: t[mode]["floors_met"] for mode in ("continuation", "reference")}
    lines += [
        "",
        f"Autoregressive steps per second of audio: {t['ar_steps_per_second']:g} (the audio σ-VAE's "
        f"{t['frame_rate']:g} Hz frames, {t['frame_rate'] / t['ar_steps_per_second']:g} per step) "
        f"against {t['codec_ar_steps_per_second']:g} for a codec LM: {t['fewer_ar_steps_than_codec']:.1f}× fewer. "
        f"Audio σ-VAE at {v['frame_rate']:g} Hz, {v['latent_dim']} channels: mel distance {v['mel_distance']:.3f}, "
        f"STOI {v['stoi']:.3f}, variance-collapse ratio {v['variance_collapse_ratio']:.2f} on {v['num_utterances']} "
        f"held-out-speaker utterances.",
        f"Judges on all real {split} audio: WER {rec['wer']:.3f}, PER {rec['per']:.3f}; speaker cosine same "
        f"{sim['same']:.3f}, different {sim['different']:.3f}.",
        "Floors (WER ≤ 2× the judge's on real audio; SIM nearer same than different; duration ±20% for ≥ 95%): "
        + "; ".join(f"{mode} " + ", ".join(f"{k} {'met' if ok else 'not met'}" for k, ok in m.items())
                    for mode, m in met.items()) + ".",
    ]
    loss = run.get("loss", {})
    if "null_text" in loss:  # how much the model's latents depend on the text (eval_loss, docs/method.md §12.4)
        with_text, without = loss["metrics"]["diffusion_loss"], loss["null_text"]["metrics"]["diffusion_loss"]
        lines.append(f"Held-out diffusion loss with the text {with_text:.4f}, with every text dropped to <null> "
                     f"{without:.4f} ({(without - with_text) / without:.1%} lower with the text).")
    return "\n".join(lines) + "\n"


RATE_COLUMNS = (("frame_rate", "frame rate (Hz)", "{:g}"), ("hop", "hop", "{:d}"), ("latent_dim", "C", "{:d}"),
                ("audio_vae_params", "params", "{:,d}"), ("audio_vae_steps", "steps", "{:,d}"),
                ("mel_distance", "mel distance ↓", "{:.3f}"), ("stoi", "STOI ↑", "{:.3f}"),
                ("variance_collapse_ratio", "collapse ratio", "{:.3f}"),
                ("judges.wer", "resynthesis WER ↓", "{:.3f}"), ("judges.sim", "resynthesis SIM ↑", "{:.3f}"))


def _cell(scores: dict[str, Any], key: str, fmt: str) -> str:
    """A table cell from a dotted key of eval/audio_vae.json; "–" where a run has no such score (no judges)."""
    for part in key.split("."):
        if not isinstance(scores, dict) or part not in scores:
            return "–"
        scores = scores[part]
    return fmt.format(scores)


def rate_runs(workdir: str, rates_root: str | None) -> list[dict[str, Any]]:
    """eval/audio_vae.json of the TTS run and of every finished run under `rates_root`, by frame rate."""
    # Not `finished_run_dirs`: it keeps the runs that train a generator, and these train only a σ-VAE.
    if rates_root and not storage.isdir(rates_root):
        raise MissingInputError(f"--rates_root={rates_root} is not a directory")
    runs = [storage.join(rates_root, n) for n in sorted(storage.listdir(rates_root))
            if storage.exists(storage.join(rates_root, n, "done.json"))] if rates_root else []
    scores = [read_json(f"{d}/eval/audio_vae.json") for d in [workdir, *runs]]
    return sorted(scores, key=lambda v: v["frame_rate"])


def rate_table(scores: list[dict[str, Any]]) -> str:
    """Markdown: the audio σ-VAE's reconstruction of held-out speakers by frame rate (and, where its run had the
    judges, its resynthesis's WER and SIM: eval_audio_vae)."""
    lines = ["| " + " | ".join(t for _, t, _ in RATE_COLUMNS) + " |", "|" + "---|" * len(RATE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(v, k, fmt) for k, _, fmt in RATE_COLUMNS) + " |" for v in scores]
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: str) -> None:
    """WER and SIM by row against the judges' baselines, and generated against real duration per mode."""
    t = run["tts"]
    fig = new_figure(13, 3.8)
    axes = fig.subplots(1, 3)
    labels = [name for name, _ in ROWS]
    colors = ["tab:gray", "tab:olive", "tab:blue", "tab:orange"]
    rec, sim = t["floors"]["recogniser"][t["split"]], t["floors"]["speaker"][t["split"]]
    axes[0].bar(labels, [t[n]["wer"] for n in labels], color=colors)
    axes[0].axhline(2 * rec["wer"], ls="--", c="k", lw=1, label="floor: 2× judge WER on real audio")
    axes[0].set_title("word error rate (in-repo recogniser)")
    axes[1].bar(labels, [t[n]["sim"] for n in labels], color=colors)
    axes[1].axhline(sim["same"], ls="--", c="tab:green", lw=1, label="same speaker (real)")
    axes[1].axhline(sim["different"], ls=":", c="tab:red", lw=1, label="different speaker (real)")
    axes[1].set_title("speaker similarity to the prompt")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        ax.legend(fontsize=7)
    ax = axes[2]
    top = 0.0
    for mode, color in (("continuation", "tab:blue"), ("reference", "tab:orange")):
        rows = [m for m in run["manifest"] if m["mode"] == mode]
        real = np.asarray([m["real_duration"] for m in rows])
        gen = np.asarray([m["duration"] for m in rows])
        ax.scatter(real, gen, s=8, c=color, label=mode)
        top = max(top, real.max(initial=0), gen.max(initial=0))
    x = np.linspace(0, top * 1.05, 2)
    ax.plot(x, x, c="k", lw=1)
    ax.fill_between(x, 0.8 * x, 1.2 * x, color="k", alpha=0.08, label="±20%")
    ax.set_xlabel("real duration (s)")
    ax.set_ylabel("generated duration (s)")
    ax.set_title("where <eod> stops")
    ax.legend(fontsize=7)
    save_png(fig, path)


def copy_wavs(workdir: str, manifest: list[dict], count: int, out: str) -> list[str]:
    """The first `count` generations of each mode and their prompts, copied to `out`."""
    copied = []
    for mode in ("continuation", "reference"):
        for m in [m for m in manifest if m["mode"] == mode][:count]:
            for name in (m["file"], m["prompt_file"]):
                storage.write_bytes_atomic(f"{out}/{name}", storage.read_bytes(f"{workdir}/samples/tts/{name}"))
                copied.append(name)
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latent_lm.studies.tts", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a speech run whose stages up to eval_tts ran (configs/tts.py)")
    p.add_argument("--rates_root", default=None, help="the audio σ-VAE frame-rate sweep's root (a second table)")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/study)")
    p.add_argument("--docs", default=None, help="also write the table, plot and --wavs WAVs per mode here")
    p.add_argument("--wavs", type=int, default=2)
    args = p.parse_args(argv)
    if args.wavs < 0:
        raise ConfigError("--wavs must be ≥ 0")
    run = collect(args.workdir)
    text = table(run)
    if args.rates_root:
        run["rates"] = rate_runs(args.workdir, args.rates_root)
        text += "\nThe audio σ-VAE by frame rate (held-out speakers; same widths, loss and budget):\n\n"
        text += rate_table(run["rates"])
    for out in filter(None, (args.out or os.path.join(args.workdir, "study"), args.docs)):
        plot(run, f"{out}/tts.png")
        write_text(f"{out}/tts.md", text)
        write_json(f"{out}/tts.json", {k: run[k] for k in ("tts", "audio_vae", "rates") if k in run})
    if args.docs:
        copy_wavs(args.workdir, run["manifest"], args.wavs, args.docs)
    print(text, end="")
    print(f"wrote {args.out or os.path.join(args.workdir, 'study')}/tts.{{md,json,png}}"
          + (f" and {args.docs}/" if args.docs else ""))


if __name__ == "__main__":
    cli.main(main)
