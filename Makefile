# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vtok-installed
# offline real data from Debian (labelled images for the eval ViT); installed on first use
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO   ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench clean tokenizer-data train-tokenizers bench-tokenizers eval-vit encoder-accuracy

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,plot,video,hf,tokenizers]"
	@touch $(STAMP)

# offline photos for the 1D tokenizers (training + held-out evaluation); see vtok/tokenizers_img/data.py
OPENCV_DOC := /usr/share/doc/opencv-doc/examples/data/baboon.jpg
TOKENIZERS := fsq_nested fsq_control fsq_tail binary_nested

$(OPENCV_DOC):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q opencv-doc

tokenizer-data: $(STAMP) $(OPENCV_DOC)

# long CPU runs (resumable: rerun to continue); outputs/tokenizers/<name>/, 5,500 steps each, ~1.7 CPU-hours on
# 2 cores in all (the committed runs went two at a time with OMP_NUM_THREADS=1; thread count can change the last
# digits, not the curves). configs/tokenizers/fsq_nested_plain.json is the ablation (nested dropout without also_full).
train-tokenizers: tokenizer-data
	for c in $(TOKENIZERS); do $(BIN)/vtok train-tokenizer --config configs/tokenizers/$$c.json || exit 1; done

bench-tokenizers: tokenizer-data
	$(BIN)/python benchmarks/tokenizer_rd.py $(patsubst %/model.safetensors,%,$(wildcard outputs/tokenizers/*/model.safetensors))

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# the committed eval ViT, in five resumable stages (2-core CPU: ~3 h; see docs/benchmarks.md)
EVT := $(BIN)/python benchmarks/train_eval_vit.py
eval-vit: $(STAMP) $(FMNIST)
	$(EVT) --stop-after 938 --work outputs/train_eval_vit
	$(EVT) --init outputs/train_eval_vit/last.pt --seed 1 --epochs 2.2 --low-res-epochs 2.0 --lr 6e-4 \
	  --warmup-epochs 0.1 --stop-after 938 --work outputs/train_eval_vit_stage2
	$(EVT) --init outputs/train_eval_vit_stage2/last.pt --seed 2 --epochs 0.25 --low-res-epochs 0 --lr 2e-4 \
	  --warmup-epochs 0.02 --work outputs/train_eval_vit_stage3 --out outputs/train_eval_vit_stage3.safetensors
	$(EVT) --init outputs/train_eval_vit_stage3.safetensors --seed 3 --epochs 2.0 --low-res-epochs 2.0 --lr 5e-4 \
	  --warmup-epochs 0.1 --work outputs/train_eval_vit_stage4 --out outputs/train_eval_vit_stage4.safetensors
	$(EVT) --init outputs/train_eval_vit_stage4/last.pt --seed 4 --epochs 0.3 --low-res-epochs 0 --lr 2e-4 \
	  --warmup-epochs 0.02 --work outputs/train_eval_vit_stage5

encoder-accuracy: $(STAMP) $(FMNIST)
	$(BIN)/python benchmarks/encoder_accuracy.py --out docs/encoder_accuracy --plot docs/encoder_accuracy.png --jobs 2

demo: $(STAMP)
	$(BIN)/vtok methods
	$(BIN)/vtok demo --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(FMNIST)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/strategies.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .hypothesis
