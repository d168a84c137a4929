# TorchServe packaging of the cam / ddpm / sd15 models. `make help` lists the targets.
PROFILE ?= demo
TARGET ?= cpu
PY := .venv/bin/python
UI_PY := .venv-ui/bin/python
export HF_HUB_OFFLINE ?= 1
# Targets are discovered: every model_configs/<model>/<target>.yaml (archive.sh checks TARGET).
TARGETS := $(sort $(basename $(notdir $(wildcard model_configs/*/*.yaml))))
# The venv's activate exports TS_CONFIG_FILE (see setup); TorchServe lets it override
# --ts-config, so recipes (tests, benchmarks: private servers with their own config) never see it.
unexport TS_CONFIG_FILE

.PHONY: help setup weights archive kserve image test-image quality start stop ui browser demo lint test test-unit test-integration test-arm64 bench bench-real reliability compare clean

help:
	@echo "make setup                    create .venv: pip install -e '.[serve,train,dev,grpc]' (pins: pyproject.toml; checks Java 17)"
	@echo "make weights  [PROFILE=demo|pretrained]   build/prepare the weights directories"
	@echo "make archive  [PROFILE=..] [TARGET=$(subst $(eval) ,|,$(TARGETS))]   build .mar archives into model_store/"
	@echo "make kserve   [PROFILE=..] [TARGET=..]   KServe storage layout -> outputs/kserve/<target>/ (docs/kserve.md)"
	@echo "make image    [TARGET=..]     the serving image (deploy/Dockerfile) with podman, base rootfs built here; prints its size"
	@echo "make test-image               the image run with podman: served checks, SIGTERM drain, restart (docs/containers.md)"
	@echo "make start [CONFIG=..] / make stop   run TorchServe with config.properties or CONFIG (waits until READY)"
	@echo "make ui [UI_ARGS=...]         web playground on http://127.0.0.1:7860 (starts TorchServe if none answers)"
	@echo "make demo                     everything on a fresh machine; outputs in outputs/"
	@echo "make lint                     ruff check . (config in pyproject.toml)"
	@echo "make test                     lint, then unit + integration + browser tests (offline, starts its own TorchServe)"
	@echo "make test-arm64 [ARM64_UNIT=..]   the arm64 archives on aarch64 (qemu; needs root + apt): unit, served, x86 vs aarch64"
	@echo "make bench                    benchmarks -> benchmarks/results/latest.{json,md}, then make quality"
	@echo "make bench-real               real-size models (random weights) served on cpu + CPU knobs -> benchmarks/results/real-size.* (10-15 min)"
	@echo "make quality                  sd15 demo model judged by the cam classifier -> benchmarks/results/sd15-quality.*"
	@echo "make reliability              load + faults + bad input -> docs/reliability.md"
	@echo "make compare                  fine-tuning lab (lab/): cam 2.0 on shifted digits vs 1.0 -> outputs/compare.*"

# Editable: the packages of pyproject.toml (not handlers: the workers import those from the archives).
.venv/.installed: pyproject.toml
	@command -v java >/dev/null 2>&1 || { echo "Java 17 is required by TorchServe and was not found. Install it: 'sudo apt-get install openjdk-17-jre-headless' (Debian/Ubuntu), 'brew install openjdk@17' (macOS)"; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	  [ "$${v:-0}" -ge 17 ] || { echo "TorchServe needs Java 17 or newer; found Java $${v:-unknown}. Install openjdk-17-jre-headless."; exit 1; }
	@[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/pip install --disable-pip-version-check -q -e '.[serve,train,dev,grpc]'
	@touch $@

# `source .venv/bin/activate && torchserve --start` then uses config.properties (TorchServe reads
# it only from --ts-config or TS_CONFIG_FILE); idempotent, rewritten if the repo moved.
setup: .venv/.installed
	@grep -qxF 'export TS_CONFIG_FILE="$(CURDIR)/config.properties"  # added by make setup' .venv/bin/activate || { \
	  sed -i '/# added by make setup$$/d' .venv/bin/activate && \
	  sed -i 's/^deactivate () {$$/&\n    unset TS_CONFIG_FILE  # added by make setup/' .venv/bin/activate && \
	  echo 'export TS_CONFIG_FILE="$(CURDIR)/config.properties"  # added by make setup' >> .venv/bin/activate && \
	  echo "make setup: .venv/bin/activate now exports TS_CONFIG_FILE=$(CURDIR)/config.properties"; }

weights: setup
	$(PY) -m weights.build_all --profile $(PROFILE)

archive: weights
	./archive.sh --profile $(PROFILE) --target $(TARGET)

# KServe storage layout: config/config.properties (model_snapshot with the target's batch
# settings) + model-store/ (hard links to the archives); upload it to the InferenceService's storageUri.
kserve: archive
	$(PY) -m deploy.kserve_layout --profile $(PROFILE) --target $(TARGET)

# The serving image (deploy/Dockerfile, docs/containers.md) built with podman and no registry: its
# base is a Debian bookworm rootfs debootstrapped once into IMAGE_CACHE (outside the clone) and
# imported (deploy/image/base_rootfs.sh, which also installs podman, runc and debootstrap with apt).
# PyPI is reached from the build with --network host. The size goes to benchmarks/results/image.json.
IMAGE ?= localhost/torchserve-models:0.12.0-$(TARGET)
IMAGE_BASE ?= localhost/torchserve-models-base:bookworm
IMAGE_CACHE ?= $(HOME)/.cache/torchserve-models/image-base
PODMAN = CONTAINERS_CONF=$(CURDIR)/deploy/image/containers.conf podman
image: kserve
	deploy/image/base_rootfs.sh $(IMAGE_CACHE) $(IMAGE_BASE)
	@log=$$(mktemp); start=$$(date +%s); \
	  { $(PODMAN) build --network host -f deploy/Dockerfile --build-arg BASE_IMAGE=$(IMAGE_BASE) \
	      --build-arg TARGET=$(TARGET) -t $(IMAGE) . 2>&1; echo $$? > $$log.rc; } | tee $$log; \
	  [ "$$(cat $$log.rc)" = 0 ] || { rm -f $$log $$log.rc; echo "make image: podman build of deploy/Dockerfile failed (above)"; exit 1; }; \
	  $(PY) -m harness.image $(IMAGE) --base $(IMAGE_BASE) --build-seconds $$(( $$(date +%s) - start )) --log $$log; \
	  rc=$$?; rm -f $$log $$log.rc; exit $$rc

# The image run as an operator runs it (tests/image; not part of make test). Needs `make image`.
test-image: archive
	@command -v podman >/dev/null 2>&1 || { echo "make test-image: podman is missing: run make image first"; exit 1; }
	@$(PODMAN) image exists $(IMAGE) || { echo "make test-image: no image $(IMAGE): run make image first"; exit 1; }
	TS_IMAGE=$(IMAGE) $(PY) -m pytest tests/image -v -p no:cacheprovider

# Workers import the handlers from the archives, not from this tree (no PYTHONPATH). CONFIG:
# config.production.properties to serve other machines (docs/security.md).
CONFIG ?= config.properties
start: setup
	@mkdir -p logs
	env -u PYTHONPATH .venv/bin/torchserve --start --ncs --ts-config $(CONFIG) > logs/torchserve.out 2>&1
	$(PY) -m clients.manage wait --timeout 600

stop:
	-.venv/bin/torchserve --stop

# The web playground's own venv: gradio's dependencies must not move the serving pins (pyproject.toml's ui extra).
.venv-ui/.installed: pyproject.toml
	@[ -x $(UI_PY) ] || python3 -m venv .venv-ui
	.venv-ui/bin/pip install --disable-pip-version-check -q -e '.[ui]'
	@touch $@

# Gradio app (ui/app.py) on 127.0.0.1:7860; UI_ARGS="--host 0.0.0.0 --auth user:password" etc.
# When no TorchServe answers, one is started as `make start` does; it keeps running (make stop).
ui: archive .venv-ui/.installed
	@$(PY) -m clients.manage list >/dev/null 2>&1 || $(MAKE) --no-print-directory start
	$(UI_PY) -m ui.app $(UI_ARGS)

# Debian's headless chromium and its driver, for the browser tests (tests/browser).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "the browser tests need chromium and chromedriver: install them"; exit 1; }; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver; }

# The cam inputs (a few held-out digits) are written first: the clients import nothing of weights/.
demo: archive
	$(PY) -m weights.digits outputs/inputs >/dev/null
	$(PY) -m clients.demo

lint: setup
	$(PY) -m ruff check .

test: lint archive .venv-ui/.installed browser
	$(PY) -m pytest tests -q

test-unit: weights
	$(PY) -m pytest tests/unit -q

test-integration: archive
	$(PY) -m pytest tests/integration -q

# aarch64 under qemu user-mode emulation on an x86 machine (docs/targets.md). The userland
# (Debian bookworm + a venv with pyproject.toml's pins, ~4 GB) is built once into ARM64_ROOT; .ci/run
# points it outside the clone so fresh CI clones reuse it. ARM64_UNIT: the unit tests run on
# aarch64 (the handlers' real code paths); `ARM64_UNIT=` skips them, `ARM64_UNIT=tests/unit`
# runs them all (~26 min emulated).
ARM64_ROOT ?= $(CURDIR)/.arm64/rootfs
ARM64_UNIT ?= tests/unit/test_cam_handler.py tests/unit/test_ddpm_handler.py tests/unit/test_sd15_handler.py
test-arm64: weights
	harness/arm64_userland.sh $(ARM64_ROOT)
	./archive.sh --profile demo --target arm64 --store .arm64/model_store
	@if [ -n "$(strip $(ARM64_UNIT))" ]; then \
	  echo "[arm64] unit tests on aarch64: $(ARM64_UNIT)"; \
	  ARM64_ROOT=$(ARM64_ROOT) $(PY) -m harness.arm64 -c 'import platform; print("[arm64] pytest runs on", platform.machine())' && \
	  ARM64_ROOT=$(ARM64_ROOT) $(PY) -m harness.arm64 -m pytest -q -p no:cacheprovider $(ARM64_UNIT); fi
	@echo "[arm64] TorchServe with aarch64 workers: served checks, x86 vs aarch64, worker memory"
	ARM64_ROOT=$(ARM64_ROOT) $(PY) -m pytest tests/arm64 -v -s -p no:cacheprovider

bench: archive
	$(PY) -m benchmarks.run
	@$(MAKE) --no-print-directory quality || echo "make quality: a goal is missed, see benchmarks/results/sd15-quality.md"

# What the sd15 demo model draws, judged by the cam classifier (~5 min): benchmarks/results/sd15-quality.*
quality: weights
	$(PY) -m benchmarks.eval_sd15_quality

reliability: archive
	$(PY) -m benchmarks.reliability

compare: setup
	$(PY) -m lab.run

clean:
	rm -rf model_store/*.mar model_store/sd15 model_store/.*.fingerprint outputs logs data weights/finetuned

# The three models at their real sizes with random weights (weights/build_realsize.py), archived
# through the pretrained path and served on the cpu target, plus the CPU knobs at real size:
# benchmarks/results/real-size.{json,md}. 10-15 min on 2 cores, ~10 GB of disk. Not part of make bench.
bench-real: setup
	$(PY) -m benchmarks.bench_real
