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
# A mistyped model in a per-model goal (make train-vitt) stops make here, before any target builds data or a venv.
MODEL_GOALS := train tune seeds prune-structured prune quantize export-openvino export bench-compress
ALL_GOALS   := train-all tune-all seeds-all prune-all quantize-all $(addprefix export-openvino-,$(ALL_MODELS)) \
               $(addprefix prune-structured-,$(ALL_MODELS))
BAD_GOAL    := $(firstword $(foreach g,$(MODEL_GOALS),\
               $(filter-out $(addprefix $(g)-,$(ALL_MODELS)) $(ALL_GOALS),$(filter $(g)-%,$(MAKECMDGOALS)))))
BAD_MODEL   := $(firstword $(foreach g,$(MODEL_GOALS),$(patsubst $(g)-%,%,$(filter $(g)-%,$(BAD_GOAL)))))
ifneq ($(BAD_GOAL),)
$(error make $(BAD_GOAL): unknown model '$(BAD_MODEL)'; choose from $(ALL_MODELS))
endif
REPR       ?=
# A mistyped representation stops make too (which model takes which is checked by models.train, in one line).
ALL_REPRS  := seed rows leads strip signal
ifneq ($(filter-out $(ALL_REPRS),$(REPR)),)
$(error REPR=$(REPR): unknown representation; choose from $(ALL_REPRS))
endif
# TEACHER=a[,b]: train-<m>, seeds-<m> and tune-<m> distil from these models' runs of the same PROFILE, SEED and
# CONFIG (models.train trains a missing one first; a run folder path is used as it is); TEACHER=none trains without
# the teacher a profile names (deit and convnext on cpu). Names are checked here, before any work.
TEACHER    ?=
KD_TEACHER := $(filter-out none,$(TEACHER))
TEACHERS   := $(subst $(,), ,$(KD_TEACHER))
TEACHER_MODELS := $(foreach t,$(TEACHERS),$(if $(findstring /,$(t)),,$(t)))
BAD_TEACHER := $(firstword $(filter-out $(ALL_MODELS),$(TEACHER_MODELS)))
SELF_TAUGHT := $(firstword $(filter $(foreach g,train seeds tune,$(addprefix $(g)-,$(TEACHER_MODELS))),$(MAKECMDGOALS)))
KD_GOALS    := $(filter all train-all tune-all bakeoff demo,$(MAKECMDGOALS))
ifneq ($(BAD_TEACHER),)
$(error TEACHER=$(TEACHER): unknown model '$(BAD_TEACHER)'; choose from $(ALL_MODELS), or give a run folder path)
else ifneq ($(SELF_TAUGHT),)
$(error make $(SELF_TAUGHT) TEACHER=$(TEACHER): a model cannot be its own teacher)
else ifneq ($(and $(KD_TEACHER),$(KD_GOALS)),)
$(error make $(firstword $(KD_GOALS)) TEACHER=$(TEACHER): TEACHER applies to train-<model>, seeds-<model>, seeds-all and tune-<model> (TEACHER=none to all of them))
endif
CONFIG     ?= default
SET        ?=
SEED       ?=
SEEDS      ?= 1 2
TRAIN_ARGS  = --profile $(PROFILE) --config $(CONFIG) $(if $(REPR),--representation $(REPR)) $(if $(SEED),--set seed=$(SEED)) $(foreach s,$(SET),--set $(s)) $(if $(TEACHER),--set teacher=$(TEACHER))
# the compression targets pick the distilled run (<run>-kd) when TEACHER is given or the profile names one
KD_RUN      = $(if $(KD_TEACHER),--kd,$(if $(TEACHER),--no-kd))

# make demo: the whole pipeline in minutes, in its own artifacts folder, on PTBXL_DIR when given, else on the real
# PTB-XL subset shipped in tests/data/ptbxl-mini. Longer than the quick profile so the numbers mean something.
DEMO_ARTIFACTS ?= $(CURDIR)/artifacts/demo
MINI_DATA      := $(CURDIR)/tests/data/ptbxl-mini
DEMO_DATA      ?= $(or $(PTBXL_DIR),$(MINI_DATA))
DEMO_SET       := --set epochs=6 --set max_train_records=100000 --set max_train_batches=35
# JOBS: how many models train-all, compress-all and demo work on at once, each on NPROC/JOBS threads. On the
# 2-core machine two one-thread jobs did 1.3x the work of one two-thread job (docs/design.md); JOBS=1 runs
# one model at a time on every core (use it on a single GPU, or to reproduce a run's exact floating-point path).
NPROC       := $(shell nproc 2>/dev/null || echo 1)
JOBS        ?= $(if $(filter 1,$(NPROC)),1,2)
JOB_THREADS := $(shell j=$(JOBS); n=$(NPROC); t=$$((n / j)); [ $$t -ge 1 ] && echo $$t || echo 1)
JOB_ENV     := $(if $(filter 1,$(JOBS)),,OMP_NUM_THREADS=$(JOB_THREADS))
# costliest first, so the last job to start is a short one
TRAIN_ORDER := effnetv2 convnext deit vit xresnet1d101 resnet1d_wang
# demo's two models side by side when JOBS > 1 (a failed one stops the demo at the next `wait`)
BACKGROUND  := $(if $(filter 1,$(JOBS)),;,& pids="$$pids $$!";)
# stages that make all (or train-all) starts after `make data` skip the cache check
DATA_DEP    := $(if $(NO_DATA),$(VENV_STAMP),data)
# eval-all: score each run's bf16-autocast twin — auto: only where the CPU computes bf16 natively (yes / no)
BF16        ?= auto
TRIALS     ?= 20
TIMEOUT    ?= 3600
OPTUNA_STORAGE ?=
export OPTUNA_STORAGE

.PHONY: all help setup eval-all eval report results-doc predict demo data test bench-data synth clean-artifacts train-all bakeoff seeds-all summary prune-all quantize-all compress-all export

all: $(VENV_STAMP)  ## the whole pipeline: data → train-all → compress-all → eval-all → report (PTBXL_DIR, PROFILE, JOBS)
	@start=$$(date +%s); set -e; \
	$(MAKE) --no-print-directory data; \
	for stage in train-all compress-all eval-all report; do $(MAKE) --no-print-directory $$stage NO_DATA=1; done; \
	echo "make all finished in $$(( $$(date +%s) - start )) s (JOBS=$(JOBS), PROFILE=$(PROFILE))"

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

train-%: $(DATA_DEP)  ## train one model: vit deit effnetv2 convnext resnet1d_wang xresnet1d101 (PROFILE, REPR, CONFIG, SEED, RESUME=1, TEACHER)
	$(PYTHON) -m models.train --model $* $(TRAIN_ARGS)

train-all: $(DATA_DEP)  ## train every model with its default representation, JOBS at a time
	$(JOB_ENV) $(MAKE) --no-print-directory -j$(JOBS) NO_DATA=1 $(addprefix train-,$(TRAIN_ORDER))
	$(PYTHON) -m models.summarize --profile $(PROFILE)

bakeoff: train-all  ## also train the four 2-D families with the seed recipe, then compare
	$(foreach m,$(MODELS_2D),$(PYTHON) -m models.train --model $(m) --profile $(PROFILE) --representation seed &&) true
	$(PYTHON) -m models.summarize --profile $(PROFILE)

# extra seeds: each `model seed` pair is one job; xargs runs JOBS of them at once (each on JOB_THREADS threads)
SEED_JOBS = $(JOB_ENV) xargs -P $(JOBS) -L 1 sh -c '$(PYTHON) -m models.train --model "$$0" --set seed="$$1" $(TRAIN_ARGS) --no-progress'
# with TEACHER (or TEACHER=none): the seed-0 runs of that recipe as well (train-all made the profile's), of the 2-D
# students only; a student trains its teacher's run of the same seed first when missing
RUN_SEEDS   = $(if $(TEACHER),$(sort 0 $(SEEDS)),$(SEEDS))
SEED_MODELS = $(if $(TEACHER),$(filter $(MODELS_2D),$(TRAIN_ORDER)),$(TRAIN_ORDER))
seeds-%: $(DATA_DEP)  ## train SEEDS="1 2" more seeds of one model (beside seed 0; with TEACHER also seed 0), JOBS at a time, then the summary (mean ± sd)
	printf '$* %s\n' $(RUN_SEEDS) | $(SEED_JOBS)
	$(PYTHON) -m models.summarize --profile $(PROFILE)

seeds-all: $(DATA_DEP)  ## SEEDS more seeds of every model (with TEACHER: seeds 0 and SEEDS of the 2-D students), JOBS at a time, then the summary
	for m in $(SEED_MODELS); do printf "$$m %s\n" $(RUN_SEEDS); done | $(SEED_JOBS)
	$(PYTHON) -m models.summarize --profile $(PROFILE)

summary: $(VENV_STAMP)  ## table of all training runs of PROFILE (artifacts/runs/summary-<profile>.md)
	$(PYTHON) -m models.summarize --profile $(PROFILE)

.PHONY: tune-all
tune-%: $(DATA_DEP)  ## Optuna-tune one model on validation AUC (PROFILE, TRIALS=20 in total, TIMEOUT=3600 s, OPTUNA_STORAGE, SET="k=v …" fixes keys, TEACHER)
	$(PYTHON) -m models.tune --model $* --profile $(PROFILE) --trials $(TRIALS) --timeout $(TIMEOUT) $(foreach s,$(SET),--set $(s)) $(if $(TEACHER),--set teacher=$(TEACHER))

tune-all: $(addprefix tune-,$(ALL_MODELS))  ## tune every model; then `make train-all CONFIG=tuned`

prune-%: $(VENV_STAMP)  ## L1-prune 40 % of the conv weights of a trained model, fine-tune, make permanent
	$(PYTHON) -m compression.compress --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN) --methods prune

# PT2E's X86 quantizer cannot annotate resnet1d_wang's Conv1d-BN-ReLU pattern, and inductor cannot lower
# xresnet1d101's converted int8 graph (docs/design.md): dynamic here, int8 convs via `make export-<model>`
QUANT_METHODS_resnet1d_wang := dynamic
QUANT_METHODS_xresnet1d101 := dynamic

quantize-%: $(VENV_STAMP)  ## dynamic, static (PT2E, calibrated) and QAT int8 variants of a trained model
	$(PYTHON) -m compression.compress --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN) --methods $(or $(QUANT_METHODS_$*),dynamic$(,)static$(,)qat)

bench-compress-%: $(VENV_STAMP)  ## size / MACs / AUC / CPU speed-ups of every variant of a model, side by side (ISA=AVX2 adds capped figures)
	$(PYTHON) -m compression.benchmark --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN) $(if $(ISA),--isa $(ISA))

prune-all: $(VENV_STAMP)  ## prune every trained model, JOBS at a time
	$(JOB_ENV) $(MAKE) --no-print-directory -j$(JOBS) $(addprefix prune-,$(TRAIN_ORDER))
quantize-all: $(VENV_STAMP)  ## quantize every trained model, JOBS at a time
	$(JOB_ENV) $(MAKE) --no-print-directory -j$(JOBS) $(addprefix quantize-,$(TRAIN_ORDER))
# compress-all starts the longest job first (effnetv2's structured pruning, ~13 min on one thread), so that the
# other jobs fill the second slot beside it instead of leaving it idle at the end
compress-all: $(VENV_STAMP)  ## every compression and export of every trained model (PyTorch, ONNX Runtime, OpenVINO), JOBS at a time
	$(JOB_ENV) $(MAKE) --no-print-directory -j$(JOBS) prune-structured-$(firstword $(TRAIN_ORDER)) \
	  $(addprefix quantize-,$(TRAIN_ORDER)) $(addprefix prune-,$(TRAIN_ORDER)) $(addprefix export-,$(TRAIN_ORDER)) \
	  $(addprefix export-openvino-,$(TRAIN_ORDER)) $(addprefix prune-structured-,$(wordlist 2,99,$(TRAIN_ORDER)))

prune-structured-%: $(VENV_STAMP)  ## structured pruning (channels / heads / MLP units, 40 % of parameters, vit 50 %) + distillation fine-tune, then its OpenVINO fp32 IR and int8
	$(PYTHON) -m compression.prune_structured --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN) --then-int8

export-openvino-%: $(VENV_STAMP)  ## OpenVINO fp32 IR + NNCF int8 (calibrated as static int8) of a trained model's run
	$(PYTHON) -m compression.openvino_export --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN)

export-%: $(VENV_STAMP)  ## ONNX fp32 + ONNX Runtime static int8 (QDQ, calibrated) of a trained model's run
	$(PYTHON) -m compression.export_onnx --model $* --profile $(PROFILE) $(if $(REPR),--representation $(REPR)) $(KD_RUN)

export: $(VENV_STAMP)  ## ONNX fp32 + int8 of the best run of PROFILE by val macro AUC
	$(PYTHON) -m compression.export_onnx --best --profile $(PROFILE)

eval-all: $(VENV_STAMP)  ## score every artifact (AUC + CIs, F1, F2/G2, size, latency), JOBS at a time (BF16=auto/yes/no); skips up-to-date results
	$(PYTHON) -m eval.evaluate --all --jobs $(JOBS) --bf16 $(BF16)

eval: $(VENV_STAMP)  ## score ARTIFACT=<run or variant folder> on DATA=<PTB-XL-layout folder> (FOLDS=, IDS=)
	$(PYTHON) -m eval.evaluate --artifact $(ARTIFACT) $(if $(DATA),--data $(DATA)) $(if $(FOLDS),--folds $(FOLDS)) $(if $(IDS),--ids $(IDS))

results-doc: $(VENV_STAMP)  ## rewrite README.md's results table from RESULTS=<results.json> (default ARTIFACTS' eval-all)
	$(PYTHON) -m eval.results_doc $(if $(RESULTS),--results $(RESULTS))

report: $(VENV_STAMP)  ## HTML + Markdown report from the evaluation results (artifacts/report/)
	$(PYTHON) -m eval.report

predict: $(VENV_STAMP)  ## diagnose RECORDS="path/without/ext …" with MODEL=<run or variant folder> (JSON=1)
	$(PYTHON) -m eval.predict $(RECORDS) --model $(MODEL) $(if $(JSON),--json)

demo: $(VENV_STAMP)  ## data → train 2 models → compress → eval-all → report in minutes (PTBXL_DIR, else the shipped subset)
	@start=$$(date +%s); set -e; export ARTIFACTS=$(DEMO_ARTIFACTS); src="$(DEMO_DATA)"; \
	if [ "$$src" = "$(MINI_DATA)" ]; then echo "demo data: $$src (real PTB-XL records shipped with the repository; PTBXL_DIR=… for more)"; \
	else echo "demo data: $$src"; fi; \
	$(PYTHON) -m data_prep.build_cache --ptbxl-dir $$src; \
	pids=""; for m in vit resnet1d_wang; do \
	  $(JOB_ENV) $(PYTHON) -m models.train --model $$m --profile quick $(DEMO_SET) $(BACKGROUND) done; \
	for p in $$pids; do wait $$p; done; pids=""; \
	$(JOB_ENV) $(PYTHON) -m compression.compress --model vit --profile quick --methods prune,dynamic,static $(BACKGROUND) \
	$(JOB_ENV) $(PYTHON) -m compression.compress --model resnet1d_wang --profile quick --methods prune,dynamic $(BACKGROUND) \
	for p in $$pids; do wait $$p; done; \
	$(PYTHON) -m eval.evaluate --all --jobs $(JOBS) --bf16 $(BF16); \
	$(PYTHON) -m eval.report --out $(DEMO_ARTIFACTS)/report; \
	echo "demo finished in $$(( $$(date +%s) - start )) s on $$src: open $(DEMO_ARTIFACTS)/report/report.html"

test: $(VENV_STAMP)  ## run the test suite, JOBS test files at a time (pytest-xdist; most tests use one core)
	$(PYTHON) -m pytest -q -n $(JOBS) --dist loadfile

clean-artifacts:  ## delete everything under ARTIFACTS
	rm -rf $(ARTIFACTS)
