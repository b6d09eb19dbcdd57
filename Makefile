# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench gpu-wheels clean

$(BIN)/recnext: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/recnext
	$(BIN)/recnext setup

demo: setup
	$(BIN)/recnext demo

# Three test processes (pytest-xdist) on a 2-core machine: many tests wait on start-ups, subprocesses and gloo, so two
# left the cores idle about a fifth of the time (163% CPU); three kept them busy (191%) and ended 35 s sooner. The
# trained detector several tests share is trained once per run, whichever process asks first (tests/conftest.py).
TEST_JOBS ?= 3
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_JOBS)

test-fast: $(BIN)/recnext
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) -m "not slow"

# Raw results (JSON) under benchmarks/results/, then the README's table from them. A missed goal does not stop the
# others (the leading -); its line in the table says so.
RESULTS := benchmarks/results
bench: setup
	-$(BIN)/python benchmarks/latency.py --threads 1 --bf16 --out $(RESULTS)/latency-1-thread.json
	-$(BIN)/python benchmarks/latency.py --threads 2 --bf16 --out $(RESULTS)/latency-2-threads.json
	-$(BIN)/python benchmarks/detector.py --threads 1 --rounds 3 --out $(RESULTS)/detector-1-thread.json
	-$(BIN)/python benchmarks/detector.py --threads 2 --rounds 3 --out $(RESULTS)/detector-2-threads.json
	-$(BIN)/python benchmarks/test_loop.py --threads 1 --out $(RESULTS)/test_loop.json
	-$(BIN)/python benchmarks/bf16_accuracy.py --threads 1 --out $(RESULTS)/bf16.json
	-$(BIN)/python benchmarks/coco_eval.py --images 200 --out $(RESULTS)/coco_eval.json
	-$(BIN)/python benchmarks/startup.py --out $(RESULTS)/startup.json
	$(BIN)/python benchmarks/render_table.py

# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine, which has no network (README, "GPU check").
gpu-wheels: $(BIN)/recnext
	$(BIN)/python benchmarks/gpu_check.py wheels --dest .whl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
