# Container targets (included by the Makefile): build the images and run the chain through compose.yaml.
# MODEL names a recipe preset; GPUS, NODES, OVERRIDES (key=value ...), PORT, IMAGE_TAG come from the Makefile.
# Every target first checks for a Docker engine and says so in one line when there is none.

DOCKER ?= docker
PROFILE ?= gpu
MASTER_ADDR ?= localhost
BUILD_ARGS ?=
TRAINER_IMAGE ?= moe-stack/trainer:$(IMAGE_TAG)
SERVE_IMAGE ?= moe-stack/serve:$(IMAGE_TAG)
SERVE_CPU_IMAGE ?= moe-stack/serve-cpu:$(IMAGE_TAG)
# compose.yaml reads these for the commands it starts itself (serve, `up`); the run targets also pass them explicitly.
COMPOSE_RUN = MODEL=$(MODEL) GPUS=$(GPUS) NODES=$(NODES) PORT=$(PORT) IMAGE_TAG=$(IMAGE_TAG) $(COMPOSE) --profile $(PROFILE)
CPU_SUFFIX = $(if $(filter cpu,$(PROFILE)),-cpu,)
VALIDATE_ARGS = --export /runs/$(MODEL)/export --base-url http://serve:8000 --model moe-export \
	--report /runs/$(MODEL)/validate.json --timeout 600

# $(call need_docker,<the command to run without Docker>)
need_docker = @$(DOCKER) info >/dev/null 2>&1 || { echo "make $@: no Docker engine reachable (start Docker or run '$(strip $(1))' directly)"; exit 2; }

.PHONY: images doctor train export serve validate smoke

images: ## build the trainer and serving images, GPU and CPU (BUILD_ARGS="--build-arg KEY=VALUE ...")
	$(call need_docker,docker build .)
	$(DOCKER) build $(BUILD_ARGS) -t $(TRAINER_IMAGE) -f Dockerfile .
	$(DOCKER) build -t $(SERVE_IMAGE) -f docker/serve.Dockerfile .
	$(DOCKER) build -t $(SERVE_CPU_IMAGE) -f docker/serve-cpu.Dockerfile .

doctor: ## show which backends the trainer image has on this host's GPUs
	$(call need_docker,moe doctor)
	$(DOCKER) run --rm --gpus all $(TRAINER_IMAGE) moe doctor

train: ## fine-tune MODEL=<preset> on GPUS x NODES in the trainer image (OVERRIDES="key=value ...")
	$(call need_docker,moe train $(MODEL) $(OVERRIDES))
	$(COMPOSE_RUN) run --rm train torchrun --nnodes $(NODES) --nproc-per-node $(GPUS) \
		--rdzv-backend c10d --rdzv-endpoint $(MASTER_ADDR):29500 \
		-m trainer.cli train $(MODEL) output.dir=/runs/$(MODEL) output.export=false $(OVERRIDES)

export: ## write the Hugging Face checkpoint of MODEL's run to /runs/MODEL/export
	$(call need_docker,moe export $(RUN) $(EXPORT))
	$(COMPOSE_RUN) run --rm --no-deps export moe export /runs/$(MODEL) /runs/$(MODEL)/export --overwrite

serve: ## serve MODEL's export with vLLM on localhost:PORT (returns once /health answers)
	$(call need_docker,python -m eval serve --export $(EXPORT) --port $(PORT))
	$(COMPOSE_RUN) up --detach --no-deps --wait serve
	@echo "serving $(MODEL) at http://localhost:$(PORT)/v1 (model name: moe-export)"

validate: ## check the served model against transformers on the export; report in /runs/MODEL/validate.json
	$(call need_docker,python -m eval validate --export $(EXPORT) --base-url http://127.0.0.1:$(PORT) --report $(RUN)/validate.json)
	$(COMPOSE_RUN) run --rm --no-deps validate python -m eval validate $(VALIDATE_ARGS)

smoke: ## the whole chain train -> export -> serve -> validate (PROFILE=cpu: tiny model, vLLM CPU)
	$(call need_docker,make demo)
	$(COMPOSE_RUN) build
	$(COMPOSE_RUN) run --rm validate$(CPU_SUFFIX); status=$$?; $(COMPOSE_RUN) stop; exit $$status
