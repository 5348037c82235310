# mailfilter: `make run` serves SMTP on embedded defaults, `make test` runs the suite.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard _core/*.pyx _core/*.pxi _core/*.pxd _core/*.h)

.PHONY: all build run test test-slow test-reliability bench compile clean

all: build

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

build: $(STAMP)

compile: build
	$(VENV)/bin/mailfilter compile rules -o var/rules.mfb

run: build
	$(VENV)/bin/mailfilter run

test: build
	$(VPY) -m pytest -q

test-slow: build
	$(VPY) -m pytest -q -m slow

# the attack and crash battery, figures in docs/reliability.md
test-reliability: build
	$(VPY) -m pytest -q -m slow tests/reliability

bench: build
	$(VPY) -m pip install -q -e '.[bench]'
	$(VPY) -m pytest -q bench --benchmark-only --benchmark-columns=min,median,mean,ops,rounds

clean:
	rm -rf build var $(VENV) mailfilter/_core*.so _core/_core.c *.egg-info
