# moe-stack: containerized MoE fine-tuning on the Hugging Face transformers v5 API.
# `make demo` and `make test` need nothing installed beforehand: they create .venv and install into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints/ci.txt | cksum | cut -d' ' -f1)

MODEL ?= tiny-moe
GPUS ?= 8
NODES ?= 1
OVERRIDES ?=
RUN ?= runs/$(MODEL)
EXPORT ?= $(RUN)/export
PORT ?= 8000
COMPOSE ?= docker compose
IMAGE_TAG ?= 0.1.0

.PHONY: help demo test venv lint clean
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

demo: $(STAMP) ## the whole chain on a tiny MoE on CPU: train -> export -> reload -> generate
	$(VPY) -m trainer.demo

test: $(STAMP) ## run the test suite on CPU
	$(VPY) -m pytest -q -x --durations=15 tests

clean: ## remove the virtual environment and demo runs
	rm -rf $(VENV) runs/tiny-moe-demo
include docker/images.mk
