# ERP event pipeline — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install kafka mariadb run test test-unit test-integration test-tansu bench lint fmt clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

# Apache Kafka 4.4.0's jars and Apicurio Registry 3 (the tests' Schema Registry) from Maven
# Central into ~/.cache/erp-pipeline (PIPELINE_CACHE_DIR); nothing is built, nothing lands in the
# work tree. With no Java or Maven this says so: the embedded broker is then tansu.
kafka: $(STAMP) ## fetch Apache Kafka and Apicurio Registry (needs Java 17+ and Maven; else tansu)
	@if command -v java >/dev/null && command -v mvn >/dev/null; then \
		$(BIN)/python -m pipeline.embedded fetch; \
	else echo "no Java/Maven here: the embedded broker is tansu"; fi

# MariaDB (ERPNext's database) for the MariaDB tests, from Debian's packages, where apt runs as
# root; its service is not started (policy-rc.d): the tests run mariadbd on a data directory of
# their own. Elsewhere this says so and the MariaDB tests are skipped (CI requires them).
mariadb: ## install Debian's mariadb-server when missing (root + apt); the MariaDB tests run it
	@if command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's mariadb-server (log: /tmp/pipeline-apt-mariadb.log)"; \
		made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q --no-install-recommends mariadb-server || \
		  { apt-get update -q && apt-get install -y -q --no-install-recommends mariadb-server; }; \
		} >/tmp/pipeline-apt-mariadb.log 2>&1; rc=$$?; \
		[ -n "$$made" ] && rm -f /usr/sbin/policy-rc.d; \
		if [ $$rc != 0 ]; then echo "apt-get could not install mariadb-server (exit $$rc): see /tmp/pipeline-apt-mariadb.log"; fi; \
	else echo "no MariaDB here and no apt as root: the MariaDB tests are skipped"; fi

run: kafka ## run the pipeline (embedded PostgreSQL and broker when none is configured)
	$(BIN)/pipeline up $(ARGS)

test: kafka mariadb ## every test on Apache Kafka (tansu without Java), then the tansu smoke set
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if $(BIN)/python -m pipeline.embedded kafka-available; then $(MAKE) --no-print-directory test-tansu; fi

test-tansu: $(STAMP) ## the smoke set on tansu, the Python-only broker
	PIPELINE_TEST_BROKER=tansu $(BIN)/python -m pytest -m tansu_smoke $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit tests only (no servers)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: kafka mariadb ## integration tests only
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: kafka ## relay benchmarks (JSON figures, baseline measured in the same run)
	$(BIN)/pipeline bench relay --events 50000 --json
	$(BIN)/pipeline bench relay --rate 1000 --seconds 20 --json

lint: $(STAMP) ## ruff + mypy (strict on pipeline/)
	$(BIN)/ruff check pipeline connectors tests
	$(BIN)/mypy

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format pipeline connectors tests
	$(BIN)/ruff check --fix pipeline connectors tests

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
