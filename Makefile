# PTB-XL ECG diagnosis with image models and compression. `make help` lists the targets.
# Every target depends on the virtual environment, so on a fresh machine `make <anything>` just works.
.DEFAULT_GOAL := help

PYTHON        ?= .venv/bin/python
PTBXL_DIR     ?=
SAMPLING_RATE ?= 100
PROFILE       ?= cpu
ARTIFACTS     ?= $(CURDIR)/artifacts
export ARTIFACTS PTBXL_DIR SAMPLING_RATE PROFILE

VENV_STAMP := .venv/.installed
, := ,

MODELS_2D  := vit deit effnetv2 convnext
MODELS_1D  := resnet1d_wang xresnet1d101
ALL_MODELS := $(MODELS_2D) $(MODELS_1D)
REPR       ?=
CONFIG     ?= default
SET        ?=
TRAIN_ARGS  = --profile $(PROFILE) --config $(CONFIG) $(if $(REPR),--representation $(REPR)) $(foreach s,$(SET),--set $(s))

# make demo: the whole pipeline in minutes on the PTB-XL sample beside the repo (or, without it, a synthetic
# PTB-XL), in its own artifacts folder. Longer than the quick profile so the numbers mean something.
DEMO_ARTIFACTS ?= $(CURDIR)/artifacts/demo
DEMO_DATA      ?= $(firstword $(wildcard $(CURDIR)/../shared/ptbxl-sample))
DEMO_SET       := --set epochs=6 --set max_train_records=100000 --set max_train_batches=35
TRIALS     ?= 20
TIMEOUT    ?= 3600
OPTUNA_STORAGE ?=
export OPTUNA_STORAGE

.PHONY: all help setup eval-all eval report predict demo data test bench-data synth clean-artifacts train-all bakeoff summary prune-all quantize-all compress-all export

all: data train-all compress-all eval-all report  ## the whole pipeline: data → train-all → compress-all → eval-all → report (PTBXL_DIR, PROFILE)

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 22

setup: $(VENV_STAMP)  ## create .venv and install requirements.txt

$(VENV_STAMP): requirements.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -r requirements.txt
	touch $@

data: $(VENV_STAMP)  ## build the PTB-XL cache (PTBXL_DIR=folder|zip, else download; SAMPLING_RATE=100|500)
	$(PYTHON) -m data_prep.build_cache

synth: $(VENV_STAMP)  ## write a synthetic PTB-XL folder (RECORDS=200, OUT=artifacts/synth-ptbxl)
	$(PYTHON) -m data_prep.synth --records $(or $(RECORDS),200) --out $(or $(OUT),$(ARTIFACTS)/synth-ptbxl)

bench-data: $(VENV_STAMP)  ## benchmark make data vs a wfdb.rdsamp loop, and a full-size synthetic build
	$(PYTHON) -m data_prep.benchmark

train-%: data  ## train one model: vit deit effnetv2 convnext resnet1d_wang xresnet1d101 (PROFILE, REPR, CONFIG, RESUME=1)
	$(PYTHON) -m models.train --model $* $(TRAIN_ARGS)

train-all: $(addprefix train-,$(ALL_MODELS))  ## train every model with its default representation
	$(PYTHON) -m models.summarize --profile $(PROFILE)

bakeoff: train-all  ## also train the four 2-D families with the seed recipe, then compare
	$(foreach m,$(MODELS_2D),$(PYTHON) -m models.train --model $(m) --profile $(PROFILE) --representation seed &&) true
	$(PYTHON) -m models.summarize --profile $(PROFILE)

summary: $(VENV_STAMP)  ## table of all training runs of PROFILE (artifacts/runs/summary-<profile>.md)
	$(PYTHON) -m models.summarize --profile $(PROFILE)

.PHONY: tune-all
tune-%: data  ## Optuna-tune one model on validation AUC (PROFILE, TRIALS=20 in total, TIMEOUT=3600 s, OPTUNA_STORAGE, SET="k=v …" fixes keys)
	$(PYTHON) -m models.tune --model $* --profile $(PROFILE) --trials $(TRIALS) --timeout $(TIMEOUT) $(foreach s,$(SET),--set $(s))

tune-all: $(addprefix tune-,$(ALL_MODELS))  ## tune every model; then `make train-all CONFIG=tuned`

prune-%: $(VENV_STAMP)  ## L1-prune 40 % of the conv weights of a trained model, fine-tune, make permanent
	$(PYTHON) -m compression.compress --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) --methods prune

# PT2E's X86 quantizer cannot annotate resnet1d_wang's Conv1d-BN-ReLU pattern, and inductor cannot lower
# xresnet1d101's converted int8 graph (README, Compression): dynamic here, int8 convs via `make export-<model>`
QUANT_METHODS_resnet1d_wang := dynamic
QUANT_METHODS_xresnet1d101 := dynamic

quantize-%: $(VENV_STAMP)  ## dynamic, static (PT2E, calibrated) and QAT int8 variants of a trained model
	$(PYTHON) -m compression.compress --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) --methods $(or $(QUANT_METHODS_$*),dynamic$(,)static$(,)qat)

bench-compress-%: $(VENV_STAMP)  ## size / AUC / CPU throughput of fp32, bf16 and every variant of a model
	$(PYTHON) -m compression.benchmark --run $*-$$($(PYTHON) -c "from shared.config import resolve; print(resolve('$*', '$(PROFILE)')['representation'])")-$(PROFILE)

prune-all: $(addprefix prune-,$(ALL_MODELS))  ## prune every trained model
quantize-all: $(addprefix quantize-,$(ALL_MODELS))  ## quantize every trained model
compress-all: prune-all quantize-all  ## every compression of every trained model

export-%: $(VENV_STAMP)  ## ONNX fp32 + ONNX Runtime static int8 (QDQ, calibrated) of a trained model's run
	$(PYTHON) -m eval.export_onnx --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR))

export: $(VENV_STAMP)  ## ONNX fp32 + int8 of the best run of PROFILE by val macro AUC
	$(PYTHON) -m eval.export_onnx --best --profile $(PROFILE)

eval-all: $(VENV_STAMP)  ## score every artifact (AUC + CIs, F1, F2/G2, size, latency); skips up-to-date results
	$(PYTHON) -m eval.evaluate --all

eval: $(VENV_STAMP)  ## score ARTIFACT=<run or variant folder> on DATA=<PTB-XL-layout folder> (FOLDS=, IDS=)
	$(PYTHON) -m eval.evaluate --artifact $(ARTIFACT) $(if $(DATA),--data $(DATA)) $(if $(FOLDS),--folds $(FOLDS)) $(if $(IDS),--ids $(IDS))

report: $(VENV_STAMP)  ## HTML + Markdown report from the evaluation results (artifacts/report/)
	$(PYTHON) -m eval.report

predict: $(VENV_STAMP)  ## diagnose RECORDS="path/without/ext …" with MODEL=<run or variant folder> (JSON=1)
	$(PYTHON) -m eval.predict $(RECORDS) --model $(MODEL) $(if $(JSON),--json)

demo: $(VENV_STAMP)  ## data → train 2 models → compress → eval-all → report in minutes (artifacts/demo/report)
	@start=$$(date +%s); set -e; export ARTIFACTS=$(DEMO_ARTIFACTS); src="$(DEMO_DATA)"; \
	if [ -z "$$src" ]; then src=$(DEMO_ARTIFACTS)/synth-ptbxl; \
	  $(PYTHON) -m data_prep.synth --records 600 --out $$src; fi; \
	$(PYTHON) -m data_prep.build_cache --ptbxl-dir $$src; \
	for m in resnet1d_wang vit; do $(PYTHON) -m models.train --model $$m --profile quick $(DEMO_SET); done; \
	$(PYTHON) -m compression.compress --model vit --profile quick --methods prune,dynamic,static; \
	$(PYTHON) -m compression.compress --model resnet1d_wang --profile quick --methods prune,dynamic; \
	$(PYTHON) -m eval.evaluate --all; \
	$(PYTHON) -m eval.report --out $(DEMO_ARTIFACTS)/report; \
	echo "demo finished in $$(( $$(date +%s) - start )) s: open $(DEMO_ARTIFACTS)/report/report.html"

test: $(VENV_STAMP)  ## run the test suite
	$(PYTHON) -m pytest -q

clean-artifacts:  ## delete everything under ARTIFACTS
	rm -rf $(ARTIFACTS)
