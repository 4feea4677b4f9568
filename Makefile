# be-bench: `make setup run` on a fresh machine, `make test` for the tests.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-all bench bench-gpu report testbed-weights testbed-weights-endpad ddpm sync

setup:              ## create .venv and install everything (CPU torch on these machines)
	bash scripts/setup.sh

run:                ## the main job: build or reuse the testbed; detection, localization, mitigation on it; report
	@start=$$(date +%s); \
	$(PY) -m runners.detect && \
	$(PY) -m runners.mitigate && \
	$(PY) -m reports.leaderboard outputs/detect/testbed outputs/mitigate/testbed --out outputs/report && \
	echo "make run wall time: $$(( $$(date +%s) - start )) s (report: outputs/report/leaderboard.html)"

test:               ## ruff (the rule set in pyproject.toml), then the fast suite (what CI runs)
	.venv/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

test-all:           ## everything, including the minutes-long tests
	$(PY) -m pytest -q

report:             ## leaderboard (Markdown, CSV, LaTeX, HTML) from every job under outputs/
	$(PY) -m reports.leaderboard outputs --out outputs/report

bench:              ## side-by-side timings on SD v1-4's architecture, FLOPs per image of each family (runners/bench.py)
	$(PY) -m runners.bench
	$(PY) -m runners.bench --flops

bench-gpu:          ## GPU throughput suite, <= 14 min: SD v1-4 512 px fp16 + bf16 and SD 2.1 768 px fp16 (16 images per call), SDXL and PixArt-alpha 1024 px fp16 (4 per call); 50 steps
	$(PY) -m runners.bench --gpu-suite --device cuda --budget-s 300
	$(PY) -m runners.bench --gpu-suite --device cuda --model sd2-architecture --resolution 768 --dtypes float16 --budget-s 150
	$(PY) -m runners.bench --gpu-suite --device cuda --model sdxl-architecture --resolution 1024 --dtypes float16 --batch 4 --budget-s 60
	$(PY) -m runners.bench --gpu-suite --device cuda --model pixart-architecture --resolution 1024 --dtypes float16 --batch 4 --budget-s 60

testbed-weights:    ## retrain the shipped testbed weights from scratch (about 100 min on 2 idle cores)
	$(PY) -m runners.train_testbed testbed.training.steps=3000
	$(PY) -m runners.train_testbed testbed.training.steps=4500   # resumes at step 3000 (docs/testbed.md, attempt 7)
	$(PY) -m runners.train_testbed ship=true                     # resumes at step 4500 and goes on to 7500

testbed-weights-endpad: ## retrain the end-padded testbed's shipped weights (attempt 9, about 75 min on 2 idle cores)
	$(PY) -m runners.train_testbed testbed.architecture.pad_token=end testbed.training.steps=3000 out=artifacts/testbed-endpad-train/pipeline
	$(PY) -m runners.train_testbed testbed.architecture.pad_token=end testbed.training.steps=4500 out=artifacts/testbed-endpad-train/pipeline ship=true weights=testbed_endpad

ddpm:               ## train (first time) and measure the digits DDPM with planted duplicates
	$(PY) -m runners.ddpm

sync:               ## upload offline W&B runs of all jobs (needs `wandb login`)
	find outputs -type d -name "offline-run-*" -exec .venv/bin/wandb sync {} +
