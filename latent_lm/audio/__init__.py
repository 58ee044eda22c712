"""Audio for speech (docs/method.md §12): waveform features (`features`) and the espeak-ng driver behind the
embedded speech corpus (`espeak`). Import the submodules directly."""
