# Two commands matter: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := test,examples,onnx,plot

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# the LLVM backend's C runtime (gcc -O3 -march=native, ~5 s), built once here rather than in
	@# the first compile a user makes; cached per source, compiler and CPU
	$(PY) -c "from tdc.backends.llvm.runtime import build_runtime; build_runtime()"
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
	@echo "   ...and on the LLVM backend with --profile: where each call's time goes, kernel by kernel:"
	$(TDC) run examples/lenet.py --random-inputs --seed 0 --profile
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
	@echo
	@echo "== 5. Compile the trained model to a native executable (LLVM; no Python at run time)"
	$(TDC) compile examples/digits.py --batch 359 --weights out/digits.npz -o out/digits
	$(PY) -c "from tdc.runtime.data import load_digits; import numpy as np; d = load_digits(0); \
	    np.save('out/digits_x_test.npy', d.x_test); np.save('out/digits_y_test.npy', d.y_test)"
	@echo "   ldd out/digits/model:"; ldd out/digits/model | sed 's/^/   /'
	out/digits/model --input x=out/digits_x_test.npy --output out/digits_pred.npy --repeat 100
	$(PY) -c "import numpy as np; p = np.load('out/digits_pred.npy').argmax(1); y = np.load('out/digits_y_test.npy'); \
	    print(f'   native executable: test accuracy {(p == y).mean():.4f} ({(p == y).sum()}/{len(y)})')"
	@echo
	@echo "== 6. The training step as a native executable: 300 SGD steps on the training images, no Python"
	$(TDC) compile examples/digits.py --batch 16 --train --optimizer sgd -o out/digits_train
	$(PY) -c "from tdc.runtime.data import load_digits; import numpy as np; d = load_digits(0); n = len(d.x_train) // 16 * 16; \
	    np.save('out/digits_x_train.npy', d.x_train[:n]); np.save('out/digits_y_train.npy', d.y_train[:n])"
	out/digits_train/model --input x=out/digits_x_train.npy --input y=out/digits_y_train.npy --input lr=0.05 \
	    --steps 300 --print-every 50 --save out/digits_native.weights
	$(TDC) run examples/digits.py --batch 359 --backend llvm --weights out/digits_native.weights \
	    --input x=out/digits_x_test.npy --output out/digits_native_pred.npy > /dev/null
	$(PY) -c "import numpy as np; p = np.load('out/digits_native_pred.npy').argmax(1); y = np.load('out/digits_y_test.npy'); \
	    print(f'   trained natively, evaluated by the LLVM JIT: test accuracy {(p == y).mean():.4f}')"
	@echo
	@echo "== 7. Data parallelism: each step split over 2 MPI ranks, gradients averaged by allreduce"
	@echo "   The step of one rank, with its communication (buckets of gradients, started as soon as"
	@echo "   backprop has made them, waited for just before the optimizer reads them):"
	$(TDC) dump examples/digits.py --batch 32 --train --ranks 2 --optimizer sgd --after schedule_comm | grep allreduce
	@echo "   Training on 2 ranks (tdc starts them under mpiexec; rank 0 prints):"
	$(TDC) train examples/digits.py --batch 32 --lr 2e-3 --schedule cosine --epochs 4 --backend llvm --ranks 2 \
	    --no-progress --metrics out/digits_dp_metrics.jsonl
	@echo "   ...and natively: one executable, started on 2 ranks by mpiexec, no Python:"
	$(TDC) compile examples/digits.py --batch 16 --train --optimizer sgd --ranks 2 -o out/digits_dp
	$(VENV)/bin/mpiexec -n 2 out/digits_dp/model --input x=out/digits_x_train.npy --input y=out/digits_y_train.npy \
	    --input lr=0.05 --steps 300 --print-every 100 --save out/digits_dp.weights
	@echo
	@echo "== 8. A parameter server: 2 workers push gradients to 1 server, which applies each as it comes (async)"
	$(TDC) dump examples/digits.py --batch 32 --train --ranks 3 --ps 1 | grep -m 4 -E " (push|pull)\("
	$(TDC) train examples/digits.py --batch 32 --epochs 3 --backend llvm --ranks 3 --ps 1 --mode async --no-progress
	@echo "   Data parallelism with Deep Gradient Compression (0.1% of the gradient on the wire):"
	$(TDC) train examples/digits.py --batch 32 --epochs 3 --backend llvm --ranks 2 --compress dgc:0.001 \
	    --optimizer momentum --lr 0.03 --no-progress --metrics out/digits_dgc_metrics.jsonl
	$(PY) -c "import json; r = [json.loads(l) for l in open('out/digits_dgc_metrics.jsonl')]; \
	    b = sorted(x['bytes_sent'] for x in r if 'bytes_sent' in x); print(f'   median bytes sent per step: {b[len(b) // 2]}')"
	@echo
	@echo "== 9. Partitioning: the model itself split over 2 ranks, a 2-stage pipeline fed with micro-batches (1F1B)"
	$(TDC) dump examples/digits.py --batch 32 --train --ranks 2 --parallel pipeline --partition
	$(TDC) train examples/digits.py --batch 32 --lr 2e-3 --schedule cosine --epochs 3 --backend llvm --ranks 2 \
	    --parallel pipeline --no-progress
	@echo "   ...and natively, every feature map split by rows over 2 ranks (halos exchanged at the borders):"
	$(TDC) compile examples/digits.py --batch 16 --train --optimizer sgd --ranks 2 --parallel spatial -o out/digits_sp
	$(VENV)/bin/mpiexec -n 2 out/digits_sp/model --input x=out/digits_x_train.npy --input y=out/digits_y_train.npy \
	    --input lr=0.05 --steps 300 --print-every 100 --save out/digits_sp.weights
	@echo
	@echo "== 10. Deep Compression of the 784-300-100-10 MLP: prune, share weights by k-means, Huffman-code"
	$(PY) -c "from tdc.runtime.data import write_digits_as_mnist; write_digits_as_mnist('out/mnist')"
	$(TDC) train examples/mlp.py --data mnist:out/mnist --epochs 20 --weight-decay 1e-3 --save-weights out/mlp.npz \
	    --no-progress
	$(TDC) compress examples/mlp.py --weights out/mlp.npz --data mnist:out/mnist --prune 0.92 --prune-scope global \
	    --prune-schedule iterative:6 --epochs 20 --quantize kmeans:8 --huffman -o out/mlp.tdcz
	@echo "   The compressed file is a weights file: at batch 1 its pruned layers run as CSR products:"
	$(TDC) dump examples/mlp.py --batch 1 --backend llvm --weights out/mlp.tdcz | grep "sparsify"

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache    # the layers point down (pyproject.toml: [tool.importlinter])
	$(VENV)/bin/ruff check tdc tests benchmarks examples
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
