# Two entry points for users: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# The lock is the whole environment, resolved once: install it as is.
	$(VENV)/bin/pip install --quiet --no-deps -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/capfilt run --preset tiny

test: install
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The packages of the lock that benchmarks/gpu_check.sh needs on a GPU machine without them (CPython 3.12, x86-64).
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 -d .whl \
		$(shell grep -E '^(open_clip_torch|ftfy|wcwidth|universal_pathlib|pathlib_abc)==' requirements.lock)

.PHONY: install demo test lint gpu-wheels
