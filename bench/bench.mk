# Benchmarks (issue 6). Included from the top-level Makefile; not part of `make test`.
#
#   make bench                 # all scenarios, relayd vs naive vs floor, 3 runs each (~25 min);
#                              # rewrites the generated part of bench/RESULTS.md
#   make bench-quick           # smoke test: every scenario once, small and short (~2 min)
#   make bench BENCH_ARGS='--scenarios fanout50,fanout200 --relays relayd,floor'
#   make bench-profile         # py-spy of relayd under throughput and fan-out 200
#
# Bench-only dependencies (uvloop for the load generator, py-spy) are installed into
# .venv/bench-site, which only the generator puts on its path: relayd must not pick
# uvloop up by accident (uvicorn's loop="auto" would), so it is measured as shipped.

BENCH_PY   ?= .venv/bin/python
BENCH_SITE ?= .venv/bench-site
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-profile bench-deps

$(BENCH_SITE)/.stamp:
	$(BENCH_PY) -m pip install -q --target $(BENCH_SITE) 'uvloop>=0.19' 'py-spy>=0.3.14'
	@touch $@

bench-deps: $(BENCH_SITE)/.stamp
	@$(BENCH_PY) -c 'import relayd' 2>/dev/null || { \
	  echo "make bench: relayd is not installed in .venv (run: make test, or make run)" >&2; exit 1; }

bench: bench-deps
	$(BENCH_PY) -m bench.run --markdown bench/RESULTS.md $(BENCH_ARGS)

bench-quick: bench-deps
	$(BENCH_PY) -m bench.run --quick $(BENCH_ARGS)

bench-profile: bench-deps
	$(BENCH_PY) -m bench.run --repeat 1 --relays relayd --scenarios throughput,fanout200 \
	  --profile bench/results/profile $(BENCH_ARGS)
