# Two commands: `make demo` and `make test`. Both build .venv first (see the `setup` target).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu bench bench-quick clean

setup: $(STAMP)

# Honour a torch that `$(PYTHON)` already imports (a .pth file points the venv at it); otherwise install
# the CPU build where there is no NVIDIA GPU, so a CPU machine never pulls the multi-GB CUDA wheels.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	@site=$$($(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	host=$$($(PYTHON) -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null); \
	if [ -n "$$host" ]; then \
		echo "setup: using the torch already installed in $$host"; echo "$$host" > "$$site/_host_torch.pth"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: NVIDIA GPU found, installing torch with CUDA"; $(VPY) -m pip install torch; \
	else \
		echo "setup: no CUDA here, installing the CPU build torch==2.13.0"; \
		$(VPY) -m pip install "torch==2.13.0+cpu" || \
		$(VPY) -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m dit_fast.demo --out demo_out

test: $(STAMP)
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(VPY) -m pytest -q -m gpu tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m bench

bench-quick: $(STAMP)
	$(VPY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
