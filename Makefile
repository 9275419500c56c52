# samebox front door. Every target creates or refreshes the virtualenv it needs: nothing to install first.
#   make image TORCH=2.3 [CUDA=12.1] [PYTHON=3.12] [ENGINE=docker] [BASE_IMAGE=...] [TAG=...] [CONDA_MIRROR=URL]
#              [ALLOW_STALE=1]
#   make test        the fast tier (a developer's loop)      make test-all   every test (what CI runs)
#   make demo        train and serve a tiny model on the CPU, nothing downloaded (under a minute)
#   make lock-dev    re-resolve the dev locks               make test-latest  trainer/serve tests on the newest releases
#   make results     README's numbers tables from bench/results/*.json
# The virtualenv is the committed dev lock, exactly: lockfiles/dev-builder.txt for the builder (any Python >= 3.10),
# lockfiles/dev.txt for the tests (Python 3.11, torch's CPU build), both installed with --require-hashes --no-deps.
PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
SAMEBOX    := $(VENV)/bin/samebox
PIP_LOCKED := -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r
PIP_SELF   := -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
# The dev lock's torch is the CPU build (2.13.0+cpu), published on the PyTorch index; where pip's configuration
# does not already find it (find-links), `make test DEV_TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
DEV_TORCH_INDEX ?=
# `make lock-dev PIP_FIND_LINKS=DIR` takes the CPU torch wheel from a directory instead of its index.
PIP_FIND_LINKS ?=
DEV_PYTHON := $(shell sed -n 's/^python = "\(.*\)"/\1/p' pyproject.toml)

TORCH  ?=
CUDA   ?=
PYTHON ?=
ENGINE ?= docker
IMAGE  ?=
# A Miniconda mirror (e.g. https://mirrors.tuna.tsinghua.edu.cn/anaconda/miniconda/); the installer's sha256 is
# still checked.
CONDA_MIRROR ?=
# image and render refuse a lockfile `samebox lock --check` finds stale; ALLOW_STALE=1 builds from it with a warning.
ALLOW_STALE ?=

.PHONY: help venv image render lock lock-check lock-dev images test test-all test-latest lint demo results clean

help:
	@echo "make image TORCH=2.3 [CUDA=12.1] [PYTHON=3.12] [ENGINE=docker|podman|buildah|none] [BASE_IMAGE=ref] [TAG=name]"
	@echo "           [CONDA_MIRROR=url] [ALLOW_STALE=1]"
	@echo "make images | make render TORCH=2.3 | make lock [IMAGE=id] | make lock-check | make lock-dev"
	@echo "make test (fast tier) | make test-all (every test, CI) | make test-latest | make lint"
	@echo "make demo (a tiny model trained and served on the CPU, under a minute) | make results (README tables)"

$(VENV)/.builder: lockfiles/dev-builder.txt pyproject.toml
	$(PYTHON_BIN) -m venv --clear $(VENV)
	$(PY) $(PIP_LOCKED) lockfiles/dev-builder.txt
	$(PY) $(PIP_SELF)
	touch $@

# A fresh venv whenever the lock changes: pip never removes what a lock dropped.
$(VENV)/.test: lockfiles/dev.txt lockfiles/dev-builder.txt pyproject.toml
	@$(PYTHON_BIN) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(DEV_PYTHON)" else \
		"samebox: the dev lock is for Python $(DEV_PYTHON), $(PYTHON_BIN) is " + v + ": make test PYTHON_BIN=python$(DEV_PYTHON)")'
	$(PYTHON_BIN) -m venv --clear $(VENV)
	$(PY) $(PIP_LOCKED) lockfiles/dev.txt $(if $(DEV_TORCH_INDEX),--extra-index-url $(DEV_TORCH_INDEX)) || { \
		echo "samebox: installing lockfiles/dev.txt failed; if torch 2.13.0+cpu was not found:" \
		     "make test DEV_TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2; rm -rf $(VENV); exit 1; }
	$(PY) $(PIP_SELF)
	touch $(VENV)/.builder $@

venv: $(VENV)/.builder

images: $(VENV)/.builder
	$(SAMEBOX) images

image: $(VENV)/.builder
	$(SAMEBOX) image --torch '$(TORCH)' $(if $(CUDA),--cuda $(CUDA)) $(if $(PYTHON),--python $(PYTHON)) \
		--engine $(ENGINE) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE)) $(if $(TAG),--tag $(TAG)) \
		$(if $(CONDA_MIRROR),--conda-mirror '$(CONDA_MIRROR)') $(if $(ALLOW_STALE),--allow-stale)

render: $(VENV)/.builder
	$(SAMEBOX) render --torch '$(TORCH)' $(if $(CUDA),--cuda $(CUDA)) $(if $(PYTHON),--python $(PYTHON)) \
		$(if $(ALLOW_STALE),--allow-stale)

lock: $(VENV)/.builder
	$(SAMEBOX) lock $(if $(IMAGE),--image $(IMAGE),--all)

lock-check: $(VENV)/.builder
	$(SAMEBOX) lock --all --check

# Re-resolve the dev locks to the newest releases and rewrite builder/data/supported.toml (the ranges the trainer,
# export and serve check at start). Runs uv from the builder venv.
lock-dev: $(VENV)/.builder
	$(SAMEBOX) lock --dev $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

# The fast tier: no test marked slow, integration or docker.
test: $(VENV)/.test
	$(PY) -m ruff check builder trainer tests bench
	$(PY) -m pytest -q -ra -m "not slow and not integration and not docker"

# Every test; where CI=true a Docker test that cannot reach an engine fails instead of skipping.
test-all: $(VENV)/.test
	$(PY) -m ruff check builder trainer tests bench
	$(PY) -m pytest -q -ra

# Not in CI: the trainer and serve tests in a scratch venv with the newest transformers, peft, accelerate and
# bitsandbytes; prints the versions and what broke.
test-latest: $(VENV)/.test
	$(PY) tests/latest.py $(if $(DEV_TORCH_INDEX),--extra-index-url $(DEV_TORCH_INDEX))

# samebox end to end on the CPU with nothing downloaded: a tiny random model made here, `samebox train` for a few
# steps, `samebox serve` on it, one question over HTTP. Everything it writes is under .demo/ (configs/demo/demo.py).
demo: $(VENV)/.test
	$(PY) configs/demo/demo.py

# The numbers tables of README.md and bench/README.md, rewritten from bench/results/*.json.
results: $(VENV)/.builder
	$(PY) bench/results.py

lint: $(VENV)/.test
	$(PY) -m ruff check builder trainer tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .demo
