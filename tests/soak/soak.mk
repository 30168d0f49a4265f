# `make soak-timing`: the tests marked `timing` (full-size floods with their p99 and
# refusal-time bounds, CPU while out of file descriptors) plus the longer variants of
# some `make test` cases; they measure performance, so run them on an idle machine.
#
# `make soak`: the above, then relayd as a subprocess for SOAK_SECONDS (default 30 minutes) under
# 50 devices and 50 WebSocket clients that connect and leave at random; fails on
# a lost message or on RSS, fd or task growth beyond noise. Not part of `make test`.
# Included by the top-level Makefile.
#
#   make soak SOAK_SECONDS=180       a three-minute run
#   make soak SOAK_ARGS='--devices 100 --seed 7'   see tests/soak/soak.py --help

SOAK_SECONDS ?= 1800
SOAK_ARGS ?=

.PHONY: soak soak-timing

soak-timing: $(STAMP)
	$(BIN)/pytest -m timing -o timeout=600 $(PYTEST_ARGS) tests/test_robustness.py
	RELAYD_TEST_LONG_STREAM_MB=1024 RELAYD_TEST_KILLS=20 RELAYD_TEST_FUZZ_EXAMPLES=1000 \
	  RELAYD_TEST_STORM=500 $(BIN)/pytest -o timeout=1800 $(PYTEST_ARGS) \
	  tests/test_robustness.py::test_endless_line_keeps_memory_bounded \
	  tests/test_admin_robustness.py::test_storms_of_changes_leave_api_sockets_and_state_in_agreement \
	  tests/test_admin_robustness.py::test_kill_9_during_admin_changes_keeps_the_last_acknowledged_state \
	  tests/test_api.py::test_fuzzed_admin_requests_never_get_a_5xx

soak: soak-timing
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python tests/soak/soak.py $(SOAK_ARGS)
