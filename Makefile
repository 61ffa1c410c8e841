# backend-ai-manager: `make demo` shows it working, `make test` runs every test.
PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
LIBDIR := $(PREFIX)/lib/backend-ai-manager
UNITDIR ?= /etc/systemd/system
# Every supported interpreter found here: Debian's own, and pyenv's 3.9 to 3.13.
PYTHONS := $(wildcard /usr/bin/python3 $(HOME)/.pyenv/versions/3.9*/bin/python3 \
	$(HOME)/.pyenv/versions/3.1[0-3]*/bin/python3)

.PHONY: test demo install lint bench clean

# TESTS: what `make test` runs (default: everything), e.g. make test TESTS='tests/test_units.py'
TESTS ?= tests

test:
	@$(PYTHON) -c 'import pytest' 2>/dev/null || { echo "make test needs pytest for $(PYTHON): on Debian 12 'apt-get install python3-pytest', or a venv: python3 -m venv ~/.venv-bam && ~/.venv-bam/bin/pip install pytest && make test PYTHON=~/.venv-bam/bin/python" >&2; exit 1; }
	$(PYTHON) -m pytest -q $(TESTS)

demo:
	$(PYTHON) tests/demo.py

install:
	install -D -m 0755 backend_ai_manager.py $(DESTDIR)$(LIBDIR)/backend_ai_manager.py
	install -d $(DESTDIR)$(UNITDIR)
	for unit in ai-hub-manager.service ai-agent-manager.service; do \
		sed 's|/usr/local/lib/backend-ai-manager|$(LIBDIR)|g' systemd/$$unit \
			> $(DESTDIR)$(UNITDIR)/$$unit && chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit || exit 1; \
		install -D -m 0644 systemd/$$unit.d/hardening.conf \
			$(DESTDIR)$(UNITDIR)/$$unit.d/hardening.conf || exit 1; \
	done
	@echo "installed, with the hardening drop-ins (in a Proxmox container without nesting, remove them, or use 'backend_ai_manager.py install', which probes); now: systemctl daemon-reload && systemctl enable --now ai-hub-manager (or ai-agent-manager)"

lint:
	@for py in $(PYTHONS); do \
		echo "$$py: $$($$py --version 2>&1)"; \
		$$py -c 'import ast,sys; compile(open("backend_ai_manager.py").read(), "backend_ai_manager.py", "exec")' || exit 1; \
		$$py backend_ai_manager.py --version >/dev/null || exit 1; \
	done
	@$(PYTHON) -c 'import ast,sys; t=ast.parse(open("backend_ai_manager.py").read()); \
		m={a.name.split(".")[0] for n in ast.walk(t) if isinstance(n,ast.Import) for a in n.names} | \
		{n.module.split(".")[0] for n in ast.walk(t) if isinstance(n,ast.ImportFrom) and n.module}; \
		bad=sorted(m-set(sys.stdlib_module_names)); print("imports outside the standard library:", bad) if bad else None; sys.exit(1 if bad else 0)'
	@# contrib/ansible/rollout.yml: --syntax-check and ansible-lint, from a venv of the lab
	@$(PYTHON) tests/ansible_env.py lint
	@echo "lint ok"

bench:
	$(PYTHON) bench/bench_update.py
	$(PYTHON) bench/bench_status.py
	$(PYTHON) bench/bench_fleet.py

clean:
	rm -rf .pytest_cache tests/__pycache__ __pycache__
