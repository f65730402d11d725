# Two commands do everything: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build. On a GPU cluster use
# environment.yml (conda) or set TORCH_SPEC to the CUDA wheel you want.
TORCH_SPEC ?= torch==2.13.0
DEMO_PARAMS ?= params/demo.yaml
DEMO_RUN    ?= outputs/demo
NOTEBOOKS   = 00_data_inspection 01_prepare

.PHONY: demo test venv clean-demo

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

demo: venv
	mkdir -p $(DEMO_RUN)/notebooks
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/papermill --log-level WARNING notebooks/$$nb.ipynb $(DEMO_RUN)/notebooks/$$nb.ipynb \
	    -k python3 -p params_file $(DEMO_PARAMS) -p run_dir $(DEMO_RUN) || exit 1; \
	done
	@echo "demo finished: results in $(DEMO_RUN)/"

test: venv
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_RUN)
