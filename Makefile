# The two commands of the README. Both create .venv and install everything the project needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from its pinned CPU build, so nothing pulls a CUDA build in.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mixbits run --model smollm2-135m --target-bpw 3.25 --output-dir runs/demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
