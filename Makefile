# Two commands for a fresh machine (both create and reuse .venv):
#   make demo   - the main job (synthetic sites -> montage -> federated distillation simulation)
#   make test   - the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# each install's output goes to $(VENV)/pip.log and is shown when it fails (make stops there)
	$(PY) -m pip install --quiet --upgrade pip > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	# torch first and pinned: its CPU wheel is on disk; an unpinned resolve pulls CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0 > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -m pip install --quiet -e ".[test,onnx]" > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -c "import torch, monai, flwr, nibabel, common" && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedkd synth --out data/synthetic --sites 6 --cases 20 --seed 0 --if-missing
	$(VENV)/bin/fedkd montage --data data/synthetic --out runs/demo/montage.png
	$(VENV)/bin/fedkd simulate --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs data/synthetic
