# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv (seeing an already installed torch), install what is missing and build the
# extension; nothing has to be installed by hand first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xraydeconv-installed
TORCH_PIN ?= torch==2.13.0
export OMP_WAIT_POLICY ?= passive

.PHONY: demo test lint bench install browser clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q --upgrade "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xraydeconv demo $(DEMO_ARGS)

test: $(STAMP) browser
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The gallery test drives a real headless chromium; install Debian's when we are root with apt.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } \
	  || echo "chromium not installed: the gallery browser test will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/xraydeconv bench

clean:
	rm -rf build $(VENV) xraydeconv/*.so *.egg-info
