"""`python -m latent_lm.tts_cli` (docs/experiments.md §11.2): a user's recording read at the run's rate, and one clear
error line for bad input. The whole command on a trained tiny run is in tests/test_tts_pipeline.py (slow tier)."""

import json

import numpy as np
import pytest
import scipy.io.wavfile

from latent_lm import cli, tts_cli


def _tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * 220 * t)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_recording_any_format_becomes_mono_at_the_run_rate(tmp_path, dtype):
    rate, x = 22050, _tone(22050, 0.5)
    stereo = np.stack([x, x], axis=1)
    if np.issubdtype(dtype, np.integer):
        stereo = np.round(stereo * (np.iinfo(dtype).max + 1)).astype(dtype)
    else:
        stereo = stereo.astype(dtype)
    scipy.io.wavfile.write(tmp_path / "ref.wav", rate, stereo)
    audio = tts_cli.read_recording(str(tmp_path / "ref.wav"), 16000)
    assert audio.dtype == np.float32 and audio.shape == (8000,)
    expected = _tone(16000, 0.5)
    # The resampled tone is the 16 kHz tone (away from the filter's edge effects).
    np.testing.assert_allclose(audio[500:-500], expected[500:-500], atol=2e-3)


def test_unsigned_8bit_is_centred(tmp_path):
    scipy.io.wavfile.write(tmp_path / "u8.wav", 16000, np.full(100, 128, np.uint8))
    np.testing.assert_array_equal(tts_cli.read_recording(str(tmp_path / "u8.wav"), 16000), 0.0)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    (tmp_path / "not.wav").write_text("hello")
    assert cli.run(tts_cli.main, ["--workdir", str(tmp_path), "--text=hi"]) == 2  # no config.json
    assert "config.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": "mllm"}}))
    assert cli.run(tts_cli.main, ["--workdir", str(tmp_path), "--text=hi"]) == 2
    assert "TTS run" in capsys.readouterr().err
    assert cli.run(tts_cli.main, ["--workdir", str(tmp_path), "--text= "]) == 2
    assert cli.run(tts_cli.main, ["--workdir", str(tmp_path), "--text=hi", "--mode=continuation"]) == 2
    with pytest.raises(Exception, match="not a WAV"):
        tts_cli.read_recording(str(tmp_path / "not.wav"), 16000)
    with pytest.raises(Exception, match="not found"):
        tts_cli.read_recording(str(tmp_path / "none.wav"), 16000)
