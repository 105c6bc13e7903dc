# aivh-ens: `make demo` (install, build the demo dataset, inspect, cv x2, blend, submit, report) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline-safe: no hub look-ups (each costs ~47 s offline before failing), no albumentations update check.
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
export NO_MKDOCS_2_WARNING := 1
DEMO ?= demo
DEMO_N ?= 2000

.PHONY: install demo serve test test-deps docs bench bench-auto bench-gpu lint clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned here only to the versions this machine serves from disk; pyproject allows a range.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,ray,slurm,serve]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/aivh-ens demo-data $(DEMO)/data --n $(DEMO_N) --force
	$(VENV)/bin/aivh-ens inspect --data $(DEMO)/data --workdir $(DEMO) --quiet
	$(VENV)/bin/aivh-ens cv --recipe tiny --model test_efficientnet --name tiny-effnet --data $(DEMO)/data --group pairs --workdir $(DEMO) --quiet
	$(VENV)/bin/aivh-ens cv --recipe tiny --model test_convnext --name tiny-convnext --data $(DEMO)/data --group pairs --workdir $(DEMO) --quiet
	$(VENV)/bin/aivh-ens blend --workdir $(DEMO) --quiet
	$(VENV)/bin/aivh-ens submit --data $(DEMO)/data --workdir $(DEMO) --out $(DEMO)/submission.csv --quiet
	$(PY) -c "import pandas as pd; s = pd.read_csv('$(DEMO)/data/solution.csv').merge(pd.read_csv('$(DEMO)/submission.csv'), on='id', suffixes=('', '_pred')); from aivh_ens.metrics import f1; print(f'demo test F1 against solution.csv: {f1(s.label, s.label_pred):.4f} ({len(s)} images)')"
	$(VENV)/bin/aivh-ens report --workdir $(DEMO)
	@echo "submission: $(DEMO)/submission.csv"
	@echo "inspect page: $(DEMO)/runs/inspect/report.html"
	@echo "report page: $(DEMO)/runs/report.html"

# The demo blend over HTTP at http://127.0.0.1:8000/ (a page, POST /predict, /docs); needs `make demo` first.
serve: install
	$(VENV)/bin/aivh-ens serve --workdir $(DEMO)

# The browser test drives Debian's headless Chromium through its chromedriver: installed here when missing
# (as root), else one line naming the packages.
TEST_DEBS := chromium chromium-driver

test-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEBS) >/dev/null; \
		else \
			echo "make test needs the Debian packages $(TEST_DEBS) (chromium and chromedriver for the browser test): sudo apt-get install $(TEST_DEBS)" >&2; \
			exit 2; \
		fi; \
	fi

test: install test-deps
	$(PY) -m pytest -q -n 2 --dist loadfile  # two workers: many tests wait on subprocesses, and a file stays on one worker (module fixtures)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q  # broken links, anchors and API references fail the suite

# The documentation site (MkDocs, Material theme) into site/; `$(VENV)/bin/mkdocs serve` previews it live.
docs: install
	$(VENV)/bin/mkdocs build --strict

# Every bench but bench_auto.py, which takes three 20-minute budgets (`make bench-auto`): the CPU first, then each
# bench's output, then its `bench <name>:` lines again. BENCH_ARGS=--smoke: every bench at its smallest, in minutes.
BENCH_ARGS ?=
# The CPU named with every bench figure: its model, family and model number (a bare "AMD EPYC" names several
# generations), the cores, and whether it has native bf16 (AMX/AVX512-BF16: bf16 autocast about 2x faster).
CPU_LINE = $$(lscpu | sed -n 's/^Model name: *//p' | head -1) (family $$(lscpu | sed -n 's/^CPU family: *//p' | head -1), \
	model $$(lscpu | sed -n 's/^Model: *//p' | head -1)), $$(nproc) cores, native bf16: \
	$$(grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo yes || echo no)

bench: install
	@echo "CPU: $(CPU_LINE)"
	@log=$$(mktemp); trap 'rm -f $$log' EXIT; set -o pipefail; \
	for b in bench/bench_*.py; do \
		[ "$$b" = bench/bench_auto.py ] && continue; echo "== $$b"; \
		$(PY) $$b $(BENCH_ARGS) 2>&1 | tee -a $$log || { echo "$$b failed" >&2; exit 1; }; \
	done; \
	echo "== CPU: $(CPU_LINE)"; grep '^bench ' $$log

# auto vs the best single run vs a plain torch script, 20 minutes each on cifake-dev (about an hour on 2 cores);
# e.g. BENCH_AUTO_ARGS="--budget 2m --n-train 2000 --n-test 1000" for a smoke check of a few minutes.
BENCH_AUTO_ARGS ?=
bench-auto: install
	$(PY) bench/bench_auto.py $(BENCH_AUTO_ARGS)

# On a CUDA machine: training img/s of efficientnet_b4 at 224 (bf16, channels_last, eager and compiled) fed
# by synthetic batches, by aivh-ens's pipeline and by the seed-000 pipeline (bench/gpu_train.py).
bench-gpu: install
	$(PY) bench/gpu_train.py

lint: install
	$(VENV)/bin/ruff check aivh_ens tests bench
	$(VENV)/bin/ruff format --check aivh_ens tests bench

clean-demo:
	rm -rf $(DEMO)
