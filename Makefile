# The two commands of the README. Both create .venv and install everything the project needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install browser demo demo-full test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from its pinned CPU build, so nothing pulls a CUDA build in.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian's Chromium, for the tests that open a run's report.html headless and check every plot renders.
# Where it cannot be installed (not root, no apt), those tests say so and skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed here: the browser tests will skip"

# The main job, sized to finish in about 10 minutes on 2 CPU cores: Fisher sensitivity, allocation at 3.25 bpw on
# round-to-nearest's damage (--damage rtn: 5x cheaper than measuring GPTQ's gain per layer and config, and as good
# on this plan: docs/results/demo.md), GPTQ, perplexity/KL/top-1 of the mixed and the uniform models, and
# runs/demo/report.html. `make demo-full` is the thorough run: allocation on GPTQ's own damage (--damage follow) and
# the four embedded zero-shot tasks the original scores above chance on (100 documents each), about an hour here.
DEMO_TASKS := bb_social_iqa_cloze,bb_goal_step_wikihow_goal_inference_cloze,bb_goal_step_wikihow_step_inference_cloze,bb_general_knowledge_cloze

demo: install
	$(VENV)/bin/mixbits run --model smollm2-135m --target-bpw 3.25 --damage rtn --output-dir runs/demo --overwrite

demo-full: install
	$(VENV)/bin/mixbits run --model smollm2-135m --target-bpw 3.25 --damage follow --tasks $(DEMO_TASKS) --task-limit 100 \
	  --output-dir runs/demo-full --overwrite

test: install browser
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs
