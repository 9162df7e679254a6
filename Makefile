# The README's two commands: `make reference` (set up, train, evaluate, report) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
RUN ?= runs/reference-$(shell date +%Y%m%d-%H%M%S)

SUDO = $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# The published label files of NIH, CheXpert, PadChest and RSNA that the importer tests read (data
# files of the torchxrayvision wheel, fetched without torch, never imported).
LABELS = $(VENV)/published-labels/torchxrayvision-1.5.7-py3-none-any.whl

.PHONY: setup reference test system

$(BIN)/lungxray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(LABELS): | $(BIN)/lungxray
	$(BIN)/python -m pip download -q --no-deps torchxrayvision==1.5.7 -d $(dir $@)

# torch for `convert-backbone` and its parity test (which runs torchxrayvision's own DenseNet from the
# wheel above). 2.13.0 is the CPU build these machines keep on disk; elsewhere pip takes PyPI's build.
TORCH = $(VENV)/lib/torch.installed
$(TORCH): | $(BIN)/lungxray
	$(BIN)/python -m pip install -q torch==2.13.0
	touch $@

setup: $(BIN)/lungxray

# Data: $LUNGXRAY_DATA if set (e.g. ../shared/cxr), else the reference Dataset.zip, downloaded once.
# Weights: $LUNGXRAY_WEIGHTS if set (a weights file, for machines without internet), else ImageNet.
reference: setup
	data="$${LUNGXRAY_DATA:-$$($(BIN)/lungxray data fetch --print-path)}" && \
	$(BIN)/lungxray train --data "$$data" --out $(RUN)

# One worker per core (pytest-xdist), each test file on one worker so that its fixtures are made once,
# in the order conftest.py gives them (the longest files first).
test: setup system $(LABELS) $(TORCH)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# What the tests run beside lungxray, from Debian's packages, installed where missing: Chromium (the
# browser test, through Selenium), Orthanc (a real PACS) with its DICOMweb plugin, DCMTK (a second
# DICOM implementation), dicom3tools' dciodvfy and PixelMed's DicomSRValidator (on Java: the reports'
# validators) and openssl (certificates for the TLS test).
system:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v Orthanc >/dev/null && \
	command -v storescu >/dev/null && command -v openssl >/dev/null && command -v dciodvfy >/dev/null && \
	command -v java >/dev/null && [ -f /usr/share/java/pixelmed.jar ] && \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver orthanc orthanc-dicomweb dcmtk \
			dicom3tools libpixelmed-java default-jre-headless openssl >/dev/null; }
