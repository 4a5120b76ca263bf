# Meta-Dropout (Lee et al., ICLR 2020) in TensorFlow 2: one target per experiment.
#
#   make omniglot-1shot                  train + evaluate MAML and meta-dropout, print the table
#   make omniglot-1shot ITERS=500        a shortened run (own workdirs: runs/<setting>_<model>_iters500)
#   make omniglot-5shot MODEL=metadrop EPISODES=100 ARGS="val_every=0"
#   make miniimagenet-1shot MODEL="maml metasgd metadrop metasgd_metadrop"
#   make miniimagenet-5shot MINIIMAGENET_IMAGES=/path/to/images   (prepares the data first)
#   make table1                          all 16 cells of the paper's Table 1 -> runs/table1.md, .json
#   make table1 ITERS=500 EPISODES=100   shortened runs (runs/*_iters500) -> runs/table1_iters500.md
#   make table1 COLLECT=1                only collect existing results (no training)
#   make bench BENCH_ARGS="--settings omniglot_1shot --models metadrop --eval"
#   make test | test-slow | bench | tensorboard | data | data-miniimagenet | venv
#
# Variables: MODEL (any of "maml metadrop metasgd metasgd_metadrop", default
# "maml metadrop"), ITERS (meta-iterations, default the config's 60000),
# EPISODES (meta-test episodes, default the config's 1000, or 100 with ITERS), ARGS (extra
# key=value overrides for src.train), EVAL_ARGS (for src.evaluate), BENCH_ARGS
# (for src.bench), COLLECT=1 (table1: collect only), OMNIGLOT_SRC (folder with
# the official archives), MINIIMAGENET_IMAGES (Ravi & Larochelle's images/
# folder) with MINIIMAGENET_SPLITS (their train/val/test.csv), or instead
# MINIIMAGENET_NPY (folder with the original code's train.npy / test.npy).
# Rerunning a target resumes training from the last checkpoint and evaluates
# again only if the checkpoint or the test settings changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PY := .venv/bin/python
MODEL ?= maml metadrop
ITERS ?=
# A shortened run is a quick look: its meta-test uses the first 100 of the
# 1000 fixed episodes unless EPISODES says otherwise (meta-dropout's meta-test,
# 30 noise samples per inner step, costs seconds per episode on a CPU).
EPISODES ?= $(if $(ITERS),100)
ARGS ?=
EVAL_ARGS ?=
BENCH_ARGS ?=

# The shared copy of the official Omniglot archives if present, else download them.
SHARED_OMNIGLOT := ../shared/data/omniglot
OMNIGLOT_SRC ?= $(if $(wildcard $(SHARED_OMNIGLOT)/*.zip),$(SHARED_OMNIGLOT),data/omniglot_archives)
OMNIGLOT_DOWNLOAD := $(if $(filter $(SHARED_OMNIGLOT),$(OMNIGLOT_SRC)),,--download)

# miniImageNet cannot be downloaded automatically: give its images (or the
# original code's arrays). The split csvs default to the shared copy if present.
SHARED_MINIIMAGENET_SPLITS := ../shared/data/miniimagenet/splits
MINIIMAGENET_IMAGES ?=
MINIIMAGENET_NPY ?=
MINIIMAGENET_SPLITS ?= $(if $(wildcard $(SHARED_MINIIMAGENET_SPLITS)/train.csv),$(SHARED_MINIIMAGENET_SPLITS),data/miniimagenet_splits)

# A shortened run gets its own workdir, so it never resumes a full run or vice versa.
SUFFIX := $(if $(ITERS),_iters$(ITERS))
TRAIN_OVERRIDES := $(if $(ITERS),iterations=$(ITERS)) $(ARGS)
EVAL_OVERRIDES := $(if $(EPISODES),test_episodes=$(EPISODES)) $(EVAL_ARGS)

.PHONY: help venv data data-miniimagenet omniglot-1shot omniglot-5shot \
	miniimagenet-1shot miniimagenet-5shot table1 tensorboard test test-slow bench

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

# The manifest is written last, so an interrupted preparation is redone.  A
# changed data_prep/omniglot.py reruns the (idempotent) preparation, which
# rebuilds arrays of an older format version; touch marks them checked.
data/omniglot/manifest.json: data_prep/omniglot.py | .venv/.installed
	$(PY) -m data_prep.omniglot --src $(OMNIGLOT_SRC) --out data/omniglot $(OMNIGLOT_DOWNLOAD)
	touch $@

data-miniimagenet: data/miniimagenet/manifest.json

# Stops with instructions when neither MINIIMAGENET_IMAGES nor MINIIMAGENET_NPY
# names an existing folder.
data/miniimagenet/manifest.json: | .venv/.installed
	@if [ -n "$(MINIIMAGENET_NPY)" ] && [ -d "$(MINIIMAGENET_NPY)" ]; then \
	  echo "$(PY) -m data_prep.miniimagenet --npy $(MINIIMAGENET_NPY) --out data/miniimagenet"; \
	  $(PY) -m data_prep.miniimagenet --npy "$(MINIIMAGENET_NPY)" --out data/miniimagenet; \
	elif [ -n "$(MINIIMAGENET_IMAGES)" ] && [ -d "$(MINIIMAGENET_IMAGES)" ]; then \
	  echo "$(PY) -m data_prep.miniimagenet --images $(MINIIMAGENET_IMAGES) --splits $(MINIIMAGENET_SPLITS) --out data/miniimagenet"; \
	  $(PY) -m data_prep.miniimagenet --images "$(MINIIMAGENET_IMAGES)" \
	    --splits "$(MINIIMAGENET_SPLITS)" --out data/miniimagenet; \
	else \
	  { echo "error: no miniImageNet data: data/miniimagenet/manifest.json is missing and$(if $(MINIIMAGENET_IMAGES)$(MINIIMAGENET_NPY), no folder '$(strip $(MINIIMAGENET_NPY) $(MINIIMAGENET_IMAGES))' exists., neither MINIIMAGENET_IMAGES nor MINIIMAGENET_NPY is given.)"; \
	    echo "miniImageNet cannot be downloaded automatically. Get either"; \
	    echo "  (a) Ravi & Larochelle's images/ folder (60,000 JPEGs named like n0153282900000005.jpg)"; \
	    echo "      and their split files train.csv, val.csv, test.csv, then run"; \
	    echo "        make data-miniimagenet MINIIMAGENET_IMAGES=/path/to/images [MINIIMAGENET_SPLITS=/path/to/csvs]"; \
	    echo "      (default MINIIMAGENET_SPLITS: $(MINIIMAGENET_SPLITS)$(if $(wildcard $(SHARED_MINIIMAGENET_SPLITS)/train.csv),; the split files are in $(SHARED_MINIIMAGENET_SPLITS) here))"; \
	    echo "  (b) or the original Meta-Dropout code's train.npy [64, 600, 21168] and test.npy"; \
	    echo "      [20, 600, 21168] (val.npy optional) in one folder, then run"; \
	    echo "        make data-miniimagenet MINIIMAGENET_NPY=/path/to/folder"; \
	    echo "  (this runs python -m data_prep.miniimagenet --images DIR --splits DIR | --npy DIR --out data/miniimagenet)"; \
	  } >&2; exit 2; \
	fi

# --- experiments (paper Table 1) --------------------------------------------
# For each model: train (resumes), evaluate (unless results.json is up to date),
# then print our accuracies beside the paper's and save them as runs/<setting>.md.

omniglot-1shot: SETTING := omniglot_1shot
omniglot-5shot: SETTING := omniglot_5shot
miniimagenet-1shot: SETTING := miniimagenet_1shot
miniimagenet-5shot: SETTING := miniimagenet_5shot

omniglot-1shot omniglot-5shot: venv data
miniimagenet-1shot miniimagenet-5shot: venv data-miniimagenet

omniglot-1shot omniglot-5shot miniimagenet-1shot miniimagenet-5shot:
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

# All sixteen cells (4 settings x maml, metasgd, metadrop, metasgd_metadrop) in
# the same workdirs as the targets above; cells without data are skipped with
# a note. Prepares Omniglot (and miniImageNet if its source is given) first.
# MODEL restricts the models trained when given on the command line.
TABLE1_ARGS = $(if $(COLLECT),--collect-only) $(if $(ITERS),--iters $(ITERS)) \
	$(if $(EPISODES),--episodes $(EPISODES)) \
	$(if $(filter command line,$(origin MODEL)),--models "$(MODEL)") \
	$(if $(strip $(ARGS)),--args "$(ARGS)") $(if $(strip $(EVAL_ARGS)),--eval-args "$(EVAL_ARGS)")

table1: venv
	@if [ -z "$(COLLECT)" ]; then \
	  $(MAKE) --no-print-directory data || echo "warning: no Omniglot data; its cells are skipped" >&2; \
	  if [ -n "$(MINIIMAGENET_IMAGES)$(MINIIMAGENET_NPY)" ]; then \
	    $(MAKE) --no-print-directory data-miniimagenet || echo "warning: no miniImageNet data; its cells are skipped" >&2; \
	  fi; \
	fi
	$(PY) -m src.table1 $(strip $(TABLE1_ARGS))

# --- tools -------------------------------------------------------------------

tensorboard: venv
	.venv/bin/tensorboard --logdir runs

# pytest exits 5 when it collected no tests: that is a failure too.
test: venv
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

test-slow: venv
	@$(PY) -m pytest -q -rP -m slow tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no slow tests" >&2; fi; \
	exit $$rc

# Default: the four settings (Omniglot and miniImageNet, 1- and 5-shot) x MAML and
# meta-dropout; e.g. BENCH_ARGS="--settings omniglot_1shot,omniglot_5shot" for two
# (synthetic episodes: no dataset needed). The report is rewritten after each entry.
# --ceiling first measures the machine's float32 matrix-product rate (about 20 s),
# against which each meta-iteration's convolution rate is given.
bench: venv
	$(PY) -m src.bench --ceiling $(BENCH_ARGS)
