# Meta-Dropout (Lee et al., ICLR 2020) in TensorFlow 2: one target per experiment.
#
#   make omniglot-1shot                  train + evaluate MAML and meta-dropout, print the table
#   make omniglot-1shot ITERS=500        a shortened run (own workdirs: runs/<setting>_<model>_iters500)
#   make omniglot-5shot MODEL=metadrop EPISODES=100 ARGS="val_every=0"
#   make test | test-slow | bench | tensorboard | data | venv
#
# Variables: MODEL (default "maml metadrop"), ITERS (meta-iterations, default the
# config's 60000), EPISODES (meta-test episodes, default the config's 1000),
# ARGS (extra key=value overrides for src.train), EVAL_ARGS (for src.evaluate),
# BENCH_ARGS (for src.bench), OMNIGLOT_SRC (folder with the official archives).
# Rerunning a target resumes training from the last checkpoint and evaluates
# again only if the checkpoint or the test settings changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PY := .venv/bin/python
MODEL ?= maml metadrop
ITERS ?=
EPISODES ?=
ARGS ?=
EVAL_ARGS ?=
BENCH_ARGS ?=

# The shared copy of the official Omniglot archives if present, else download them.
SHARED_OMNIGLOT := ../shared/data/omniglot
OMNIGLOT_SRC ?= $(if $(wildcard $(SHARED_OMNIGLOT)/*.zip),$(SHARED_OMNIGLOT),data/omniglot_archives)
OMNIGLOT_DOWNLOAD := $(if $(filter $(SHARED_OMNIGLOT),$(OMNIGLOT_SRC)),,--download)

# A shortened run gets its own workdir, so it never resumes a full run or vice versa.
SUFFIX := $(if $(ITERS),_iters$(ITERS))
TRAIN_OVERRIDES := $(if $(ITERS),iterations=$(ITERS)) $(ARGS)
EVAL_OVERRIDES := $(if $(EPISODES),test_episodes=$(EPISODES)) $(EVAL_ARGS)

.PHONY: help venv data omniglot-1shot omniglot-5shot tensorboard test test-slow bench

help:
	@awk '!/^#/ {exit} {sub(/^# ?/, ""); print}' $(firstword $(MAKEFILE_LIST))

# --- environment and data --------------------------------------------------

venv: .venv/.installed

# Reinstalls when requirements.txt is newer than the stamp.
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	touch $@

data: data/omniglot/manifest.json

# The manifest is written last, so an interrupted preparation is redone.
data/omniglot/manifest.json: | .venv/.installed
	$(PY) -m data_prep.omniglot --src $(OMNIGLOT_SRC) --out data/omniglot $(OMNIGLOT_DOWNLOAD)

# --- experiments (paper Table 1) --------------------------------------------
# For each model: train (resumes), evaluate (unless results.json is up to date),
# then print our accuracies beside the paper's and save them as runs/<setting>.md.

omniglot-1shot: SETTING := omniglot_1shot
omniglot-5shot: SETTING := omniglot_5shot

omniglot-1shot omniglot-5shot: venv data
	@set -e; for m in $(MODEL); do \
	  w=runs/$(SETTING)_$${m}$(SUFFIX); \
	  echo "== $(SETTING) $${m}: training in $$w"; \
	  $(PY) -m src.train --config yaml/$(SETTING)_$${m}.yaml --workdir $$w $(TRAIN_OVERRIDES); \
	  if $(PY) -m src.report --is-fresh $$w $(EVAL_OVERRIDES); then \
	    echo "== $(SETTING) $${m}: $$w/results.json is up to date"; \
	  else \
	    echo "== $(SETTING) $${m}: evaluating $$w"; \
	    $(PY) -m src.evaluate --workdir $$w $(EVAL_OVERRIDES); \
	  fi; \
	done
	$(PY) -m src.report $(foreach m,$(MODEL),runs/$(SETTING)_$(m)$(SUFFIX)) --out runs/$(SETTING)$(SUFFIX).md

# --- tools -------------------------------------------------------------------

tensorboard: venv
	.venv/bin/tensorboard --logdir runs

# pytest exits 5 when it collected no tests: that is a failure too.
test: venv
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

test-slow: venv
	@$(PY) -m pytest -q -m slow tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no slow tests" >&2; fi; \
	exit $$rc

bench: venv
	$(PY) -m src.bench $(BENCH_ARGS)
