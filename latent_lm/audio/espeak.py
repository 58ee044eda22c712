"""espeak-ng through its C API (ctypes), without root: speech for the embedded corpus (docs/method.md §12).

The library comes from the `espeakng-loader` wheel (libespeak-ng 1.52 and its espeak-ng-data, voice variants
included), else from a system libespeak-ng.so.1. Audio is synthesised in synchronous mode, a callback collecting
the 22,050 Hz int16 samples; phonemes come from `espeak_TextToPhonemes` in IPA mode.

Determinism. libespeak-ng keeps synthesis state in C statics that neither `espeak_Terminate` nor a new
`espeak_Initialize` resets: the pitch-flutter index (`Flutter_ix` in wavegen.c's AdvanceParameters), the automatic
gain and the glottal cycle counter of `Wavegen`, and the breath-noise generator (`espeak_rand`). So the same text
synthesised twice in one process comes out a few samples longer or shorter, while a fresh process is always
identical. Here every call loads a private copy of the library (`dlopen`), synthesises, and unloads it
(`espeak_Terminate` + `dlclose`), so the statics start from their initial values each time; the noise generator is
also seeded. A call therefore is a pure function of its arguments (for one espeak-ng build: never compare audio
hashes across versions). Loading and initialising costs ≈ 1 ms; a 3 s utterance with its phonemes ≈ 15 ms.
"""

from __future__ import annotations

import _ctypes
import atexit
import contextlib
import ctypes
import ctypes.util
import dataclasses
import glob
import os
import re
import shutil
import tempfile
import threading
from typing import Iterator

import numpy as np

from latent_lm.errors import ConfigError, MissingInputError

SAMPLE_RATE = 22050  # what espeak-ng synthesises (checked at initialisation)
INSTALL_HINT = "pip install espeakng-loader"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a bad data path instead of calling exit()
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_PHONEMES_IPA = 0x02
_STRESS = re.compile("[ˈˌ]")
_LANGUAGE_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")  # "(fr)" when espeak switches language mid-text


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclasses.dataclass(frozen=True)
class Library:
    """Where libespeak-ng and its data are: `source` is "espeakng-loader" or "system"."""
    path: str
    data_path: str | None  # None: the library's compiled-in default (a system install)
    source: str


@dataclasses.dataclass(frozen=True)
class VoiceInfo:
    name: str        # "English (Scotland)"
    identifier: str  # "gmw/en-GB-scotland": what `synthesize(voice=...)` takes, optionally with "+variant"
    language: str    # "en-gb-scotland"


def _loader_library() -> Library | None:
    try:
        import espeakng_loader
    except ImportError:
        return None
    path, data = espeakng_loader.get_library_path(), os.path.join(os.path.dirname(espeakng_loader.__file__),
                                                                     "espeak-ng-data")
    return Library(path, data, "espeakng-loader") if os.path.isfile(path) and os.path.isdir(data) else None


def _system_library() -> Library | None:
    for pattern in ("/usr/lib/*/libespeak-ng.so.1", "/usr/lib/libespeak-ng.so.1", "/usr/lib64/libespeak-ng.so.1",
                    "/usr/local/lib/libespeak-ng.so.1", "/opt/homebrew/lib/libespeak-ng.1.dylib"):
        found = sorted(glob.glob(pattern))
        if found:
            return Library(found[0], None, "system")
    name = ctypes.util.find_library("espeak-ng")
    return Library(name, None, "system") if name else None


def find_library() -> Library:
    """The espeakng-loader wheel's library, else the system's; MissingInputError when there is neither."""
    library = _loader_library() or _system_library()
    if library is None:
        raise MissingInputError(f"espeak-ng is not installed (needed for the speech corpus): {INSTALL_HINT}")
    return library


_lock = threading.RLock()
_private: dict[str, str] = {}  # library path -> this process's private copy


def _private_copy(path: str) -> str:
    """A copy of the library that only this module loads, so `dlclose` really unloads it (another user of the same
    file in this process, e.g. a phonemizer, would otherwise keep it, and its statics, alive)."""
    if not os.path.isabs(path):
        return path  # a bare soname from find_library: load it as it is
    if path not in _private:
        folder = tempfile.mkdtemp(prefix="latent_lm_espeak-")
        atexit.register(shutil.rmtree, folder, True)
        copy = os.path.join(folder, os.path.basename(path))
        shutil.copyfile(path, copy)
        _private[path] = copy
    return _private[path]


def _declare(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_Callback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_void_p  # a static buffer: read as UTF-8 bytes ourselves
    lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Terminate.argtypes = []


class _Session:
    """One load of the library: initialised in synchronous mode, its callback appending to `chunks`."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.chunks: list[np.ndarray] = []

        def collect(wav, count, events):
            if count > 0 and wav:
                self.chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
            return 0

        self.callback = _Callback(collect)  # kept alive while the library may call it

    def set_voice(self, voice: str) -> None:
        status = self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if status != 0:
            raise ConfigError(f"espeak-ng has no voice {voice!r} (status {status}); list them with "
                              f"latent_lm.audio.espeak.english_voices() and variants()")


@contextlib.contextmanager
def _session() -> Iterator[_Session]:
    """Loads a fresh copy of the library (initial C statics), yields it initialised, then unloads it."""
    library = find_library()
    with _lock:
        try:
            lib = ctypes.CDLL(_private_copy(library.path))
        except OSError as e:
            raise MissingInputError(f"cannot load espeak-ng from {library.path} ({e}): {INSTALL_HINT}") from None
        rate = 0
        try:
            _declare(lib)
            data = library.data_path.encode("utf-8") if library.data_path else None
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
            if rate != SAMPLE_RATE:
                raise MissingInputError(f"espeak-ng at {library.path} did not initialise (returned {rate}, expected "
                                        f"{SAMPLE_RATE} Hz): is its espeak-ng-data complete? {INSTALL_HINT}")
            session = _Session(lib)
            lib.espeak_SetSynthCallback(session.callback)
            if hasattr(lib, "espeak_ng_SetRandSeed"):  # breath noise of the variants that have it (1.52+)
                lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
            yield session
        finally:
            if rate > 0:
                lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)  # the next load starts from the library's initial statics


def version() -> str:
    """The library's version string, e.g. "1.52.0" (part of every corpus fingerprint)."""
    with _session() as s:
        return s.lib.espeak_Info(None).decode("utf-8", "replace").split()[0]


def _languages(ptr: int) -> list[str]:
    # espeak_VOICE.languages: (priority byte, NUL-terminated name) pairs, ended by a zero priority byte.
    out, at = [], ptr
    while ctypes.string_at(at, 1) != b"\0":
        name = ctypes.string_at(at + 1)
        out.append(name.decode("utf-8"))
        at += 2 + len(name)
    return out


def _list_voices(lib: ctypes.CDLL, spec: _Voice | None) -> list[_Voice]:
    array = lib.espeak_ListVoices(ctypes.byref(spec) if spec is not None else None)
    voices, i = [], 0
    while array[i]:
        voices.append(array[i].contents)
        i += 1
    return voices


def english_voices() -> list[VoiceInfo]:
    """The English accents of this espeak-ng (1.52: gmw/en, en-029, en-GB-scotland, en-GB-x-gbclan,
    en-GB-x-gbcwmd, en-GB-x-rp, en-US, en-US-nyc), without the Shavian-alphabet voice; sorted by identifier."""
    with _session() as s:
        out = []
        for v in _list_voices(s.lib, None):
            langs = _languages(v.languages)
            if langs and (langs[0] == "en" or langs[0].startswith("en-")) and "shaw" not in langs[0]:
                out.append(VoiceInfo(v.name.decode("utf-8"), v.identifier.decode("utf-8"), langs[0]))
    return sorted(out, key=lambda v: v.identifier)


def variants() -> list[str]:
    """Names of the voice variants ("f3", "m7", "klatt4", "belinda", …): append as `voice + "+" + name`."""
    with _session() as s:
        spec = _Voice()
        spec.languages = ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)
        names = [v.identifier.decode("utf-8").split("/", 1)[-1] for v in _list_voices(s.lib, spec)]
    return sorted(set(names))


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= int(value) <= high:
        raise ConfigError(f"espeak-ng {name} must be in [{low}, {high}], got {value}")
    return int(value)


def _synthesize_in(s: _Session, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                   volume: int) -> np.ndarray:
    params = ((_PARAM_RATE, _check_range("rate", rate, 80, 450)),
              (_PARAM_PITCH, _check_range("pitch", pitch, 0, 100)),
              (_PARAM_RANGE, _check_range("pitch_range", pitch_range, 0, 100)),
              (_PARAM_VOLUME, _check_range("volume", volume, 0, 200)))
    data = text.encode("utf-8") + b"\0"
    s.set_voice(voice)
    for key, value in params:
        s.lib.espeak_SetParameter(key, value, 0)
    status = s.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
    s.lib.espeak_Synchronize()
    return np.concatenate(s.chunks).astype(np.int16) if s.chunks else np.zeros((0,), np.int16)


def _phonemes_in(s: _Session, text: str, voice: str) -> str:
    buffer = ctypes.create_string_buffer(text.encode("utf-8"))
    pointer = ctypes.c_void_p(ctypes.addressof(buffer))
    clauses = []
    s.set_voice(voice)
    while pointer.value:
        out = s.lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
        if out:
            clauses.append(ctypes.string_at(out).decode("utf-8", "replace"))
    return clean_phonemes(" ".join(clauses))


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
               volume: int = 100) -> np.ndarray:
    """Speech for `text`: int16 [samples] at 22,050 Hz, silence included (trim it yourself).

    `voice`: an accent identifier or language ("gmw/en-GB-scotland", "en-us"), optionally "+variant" ("+f3");
    `rate` words per minute (80–450), `pitch` and `pitch_range` 0–100 (50 is the voice's own), `volume` 0–200.
    Deterministic: the same arguments give the same samples, in any order, in any process (same espeak build).
    """
    with _session() as s:
        return _synthesize_in(s, text, voice, rate, pitch, pitch_range, volume)


def synthesize_with_phonemes(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
                             pitch_range: int = 50, volume: int = 100) -> tuple[np.ndarray, str]:
    """`synthesize(...)` and `phonemes(text, accent)` in one load of the library (≈ 40% faster than both), where
    the accent is `voice` without its "+variant": equal to the two calls."""
    with _session() as s:
        audio = _synthesize_in(s, text, voice, rate, pitch, pitch_range, volume)
        return audio, _phonemes_in(s, text, voice.split("+", 1)[0])


def clean_phonemes(ipa: str) -> str:
    """Stress marks and language-switch tags removed, the ASCII length mark some accents leak ("pa:stʌ") written
    as IPA "ː", words separated by single spaces."""
    return " ".join(_LANGUAGE_SWITCH.sub("", _STRESS.sub("", ipa)).replace(":", "ː").split())


def phonemes(text: str, voice: str = "en-us") -> str:
    """IPA for `text` as `voice`'s accent speaks it, without stress marks, words separated by single spaces.

    espeak joins some unstressed function words to their neighbour ("in the" → "ɪnðə", "there are" → "ðeəɹɑː"),
    so the phoneme words are espeak's phonological words: there can be fewer of them than the text's words.
    """
    with _session() as s:
        return _phonemes_in(s, text, voice)
