# samebox front door. Every target creates or refreshes the virtualenv it needs: nothing to install first.
#   make image TORCH=2.3 [CUDA=12.1] [PYTHON=3.12] [ENGINE=docker] [BASE_IMAGE=...] [TAG=...] [CONDA_MIRROR=URL]
#              [ALLOW_STALE=1]
#   make test
PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
SAMEBOX    := $(VENV)/bin/samebox
# torch for the test suite (the trainer's tests run on the CPU). From PyPI this is the CUDA build (several GB);
# on a laptop, `make test TEST_TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the small CPU build.
TEST_TORCH ?= torch==2.13.0
TEST_TORCH_INDEX ?=

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

.PHONY: help venv image render lock lock-check images test lint clean

help:
	@echo "make image TORCH=2.3 [CUDA=12.1] [PYTHON=3.12] [ENGINE=docker|podman|buildah|none] [BASE_IMAGE=ref] [TAG=name]"
	@echo "           [CONDA_MIRROR=url] [ALLOW_STALE=1]"
	@echo "make images | make render TORCH=2.3 | make lock [IMAGE=id] | make lock-check | make test | make lint"

$(VENV)/.builder: pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[lock]'
	touch $@

$(VENV)/.test: $(VENV)/.builder
	$(PY) -m pip install -q $(if $(TEST_TORCH_INDEX),--index-url $(TEST_TORCH_INDEX)) '$(TEST_TORCH)'
	$(PY) -m pip install -q -e '.[lock,test,train,serve]'
	touch $@

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

test: $(VENV)/.test
	$(PY) -m ruff check builder trainer tests bench
	$(PY) -m pytest -q -ra

lint: $(VENV)/.test
	$(PY) -m ruff check builder trainer tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
