# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := out/demo

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install demo test clean
install: $(BIN)/.installed

## Synthesise a small dataset, build shards, train LeNet-5 for one epoch, print loader throughput.
demo: install
	rm -rf $(DEMO)
	$(BIN)/tinyin data synth --out $(DEMO)/release
	$(BIN)/tinyin shard build --src $(DEMO)/release --out $(DEMO)/shards
	$(BIN)/python train.py --shards $(DEMO)/shards --arch lenet5 --size 28 --epochs 1 -b 16 --lr 0.05 --output-dir $(DEMO)/run
	$(BIN)/tinyin bench loader --shards $(DEMO)/shards --images $(DEMO)/release --passes 3 --pass-images 4096

# Spread over the cores (at most 4): most tests wait on a subprocess (train.py, a server), so two
# workers on 2 cores take ~2/3 of the time one does. `--dist worksteal`: a worker that runs out takes
# tests queued for the other (under the default `load`, one sat idle ~50 s while the other worked
# through its queue of multi-rank runs). One file alone: `$(BIN)/python -m pytest tests/FILE`.
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal

clean:
	rm -rf $(VENV) out *.egg-info
