# `make soak`: relayd as a subprocess for SOAK_SECONDS (default 30 minutes) under
# 50 devices and 50 WebSocket clients that connect and leave at random; fails on
# a lost message or on RSS, fd or task growth beyond noise. Not part of `make test`.
# Included by the top-level Makefile.
#
#   make soak SOAK_SECONDS=180       a three-minute run
#   make soak SOAK_ARGS='--devices 100 --seed 7'   see tests/soak/soak.py --help

SOAK_SECONDS ?= 1800
SOAK_ARGS ?=

.PHONY: soak

soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python tests/soak/soak.py $(SOAK_ARGS)
