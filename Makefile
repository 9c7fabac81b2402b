# Two commands matter: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := test,examples,onnx

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

TDC := $(VENV)/bin/tdc

demo: $(STAMP)
	@echo "== 1. LeNet-5 written in the DSL, as IR:  tdc dump examples/lenet.py"
	$(TDC) dump examples/lenet.py
	@echo
	@echo "== 2. Run it (seeded params, random inputs):  tdc run examples/lenet.py --random-inputs"
	$(TDC) run examples/lenet.py --random-inputs --seed 0 --backend reference
	@echo "   ...and compiled by the numba backend (fused kernels, planned memory), same outputs:"
	$(TDC) run examples/lenet.py --random-inputs --seed 0 --backend numba
	@echo
	@echo "== 3. The digits CNN's training step after fusion (forward, backward and Adam in one graph)"
	$(TDC) dump examples/digits.py --batch 16 --train --after fuse -o out/digits_step.tdc
	@head -n 40 out/digits_step.tdc; echo "    ..."
	@echo "   ($$(grep -c ' = ' out/digits_step.tdc) ops in $$(grep -c 'kernel k' out/digits_step.tdc) kernels;" \
	    "the whole step is in out/digits_step.tdc. Its memory table:)"
	$(TDC) dump examples/digits.py --batch 16 --train --memory
	@echo
	@echo "== 4. Train it on real data: the 8x8 handwritten digits scikit-learn ships (1797 images)"
	$(TDC) train examples/digits.py --batch 16 --lr 2e-3 --schedule cosine --epochs 8 --backend reference \
	    --metrics out/digits_metrics.jsonl --save-weights out/digits.npz --no-progress

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
