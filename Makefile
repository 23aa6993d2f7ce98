# The two commands a newcomer needs: `make lab` opens the course, `make test` runs every test.
# Both create .venv on first use (only python3 and pip are required) and refresh it when pyproject.toml or
# constraints.txt changes; the versions installed are the exact ones of constraints.txt.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.gpt2lab-installed
LAB_ARGS ?=
# make test runs pytest in 2 processes (pytest-xdist): most of the suite is notebook kernels running Python code on one
# core each; each file stays in one process (--dist loadfile), so a notebook's cells run in order in one kernel.
# One torch thread per process (OMP_NUM_THREADS=1, in make solutions too, so the stored outputs come from the same
# arithmetic): two processes with two threads each on two cores spend most of their time waiting for each other.
TEST_WORKERS ?= 2
# Jupyter refuses to run as root unless told; containers and cloud notebooks often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

# Data: GPT2LAB_DATA if set, else ../shared/data beside the checkout when it exists, else <repo>/data.
SHARED_DATA := $(wildcard $(abspath ../shared/data))
ifeq ($(origin GPT2LAB_DATA), undefined)
  ifneq ($(SHARED_DATA),)
    export GPT2LAB_DATA := $(SHARED_DATA)
  endif
endif

.PHONY: lab test lint student solutions bench grade experiments help
help:
	@echo "make lab       open the course in JupyterLab (notebooks/00_welcome.ipynb)"
	@echo "make test      lint, check notebooks/ is in step, run pytest and nbval (quick mode)"
	@echo "make student   regenerate notebooks/ from solutions/, keeping your answers (FORCE=1: backup, then write)"
	@echo "make solutions re-execute solutions/ in quick mode (refreshes the outputs nbval checks)"
	@echo "make experiments  every method on both tasks over seeds, then the report (GPU: full grid; CPU: quick grid)"
	@echo "make bench     our GPT-2 and AdamW against transformers and torch.optim, side by side (ratios)"
	@echo "make grade     run your notebooks/ as the grader does and show where you stand (build/grades/)"

# Your notebooks are only read (run as copies, in quick mode); exit status 1 until every check passes.
grade: $(STAMP)
	$(PY) -m gpt2lab.course grade notebooks --out build/grades

# constraints.txt holds the exact versions (pyproject.toml only declares ranges, for GPU machines; see README).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

lab: $(STAMP)
	$(PY) -m ipykernel install --user --name gpt2lab --display-name "Python (gpt2lab)" >/dev/null
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" notebooks/00_welcome.ipynb $(ROOT_FLAG) $(LAB_ARGS)

# notebooks/ is not linted: it holds the student's own answers (a lint warning there is not a broken course);
# the handouts generated from solutions/ are checked by the sync check and tests/test_student_notebooks.py.
lint: $(STAMP)
	$(PY) -m ruff check lib tests solutions

test: lint
	$(PY) -m gpt2lab.course build --check
	OMP_NUM_THREADS=1 GPT2LAB_QUICK=1 MPLBACKEND=Agg $(PY) -m pytest tests solutions --nbval-lax --nbval-current-env -p no:cacheprovider \
	  -n $(TEST_WORKERS) --dist loadfile

# Keeps the answers in notebooks/, or refuses naming the cells; FORCE=1 backs up to notebooks/.backup/, then writes.
student: $(STAMP)
	$(PY) -m gpt2lab.course build $(if $(FORCE),--force,)

solutions: $(STAMP)
	OMP_NUM_THREADS=1 GPT2LAB_QUICK=1 $(PY) -m gpt2lab.course execute
	$(PY) -m gpt2lab.course build

bench: $(STAMP)
	$(PY) -m gpt2lab.bench model $(BENCH_ARGS)
	$(PY) -m gpt2lab.bench optim $(BENCH_ARGS)

# The main job (notebook 09): every method on both tasks over seeds, then the tables, tests and plots. On a CUDA GPU
# the default grid at gpt2-small size (hours); elsewhere the quick grid (a tiny random model, about a minute), and the
# first line says which. Finished runs are skipped and interrupted ones resumed: after an interruption, run it again.
EXPERIMENTS_OUT ?= $(or $(GPT2LAB_RESULTS),results)/experiments
experiments: $(STAMP)
	$(PY) -m gpt2lab.experiments run --grid auto --out "$(EXPERIMENTS_OUT)" $(EXPERIMENTS_ARGS)
	$(PY) -m gpt2lab.experiments report "$(EXPERIMENTS_OUT)"
