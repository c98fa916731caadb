# Every target sets up .venv itself: torch==2.13.0 first (a CPU build from local disk here;
# a looser torch requirement installed first would pull GBs of CUDA wheels), then the project.
PY := .venv/bin/python
PIP := .venv/bin/pip --disable-pip-version-check -q

.PHONY: test demo bench lint clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $@

test: .venv/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: .venv/.installed
	HF_HUB_OFFLINE=1 $(PY) -m mope demo

bench: .venv/.installed
	HF_HUB_OFFLINE=1 $(PY) bench/kernels.py
	HF_HUB_OFFLINE=1 $(PY) bench/rollout.py
	HF_HUB_OFFLINE=1 $(PY) bench/stacked_experts.py
	HF_HUB_OFFLINE=1 $(PY) bench/linear.py
	HF_HUB_OFFLINE=1 $(PY) bench/decoder_ops.py
	HF_HUB_OFFLINE=1 $(PY) bench/attention.py
	HF_HUB_OFFLINE=1 $(PY) bench/train.py

lint: .venv/.installed
	.venv/bin/ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks
