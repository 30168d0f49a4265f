# Benchmarks (issue 6). Included from the top-level Makefile; not part of `make test`.
#
#   make bench                 # all scenarios, relayd vs naive vs floor, 3 runs each (~30 min);
#                              # rewrites the generated part of bench/RESULTS.md
#   make bench-quick           # smoke test: every scenario once, small and short (~2 min)
#   make bench BENCH_ARGS='--scenarios fanout50,fanout200 --relays relayd,floor'
#   make bench-profile         # py-spy of relayd under throughput and fan-out 200
#   make bench BENCH_V1=/tmp/relayd-v1/.venv/bin/python
#                              # also an older relayd ("relayd-v1") in the same run: ratios now/v1.
#                              # Such a checkout: git archive REV | tar -x -C /tmp/relayd-v1;
#                              # python3 -m venv /tmp/relayd-v1/.venv; pip install -e it there,
#                              # with -c of this venv's `pip freeze` so the libraries are the same
#
# Besides issue 6's scenarios, `make bench` runs fanout50_wss, connect_none,
# connect_token (issue 11) and fanout50_pages (issue 16) on relayd, and compares
# them with fanout50 / connect_none (see bench/RESULTS.md). `--set KEY=VALUE` in
# BENCH_ARGS shortens a scenario (e.g. --set fanout_s=5) on a busy machine.
#
# Issue 17: relay "nodered" (Node-RED, installed by bench-deps when npm is there) joins
# the default relays; fanout1000, fanout5000 and idle10k run on relayd (make bench-scale).
# Downlink (issue 12): downlink50 and downlink_cost (relayd's CPU per command).
# BENCH_V1_V2=1 with BENCH_V1 = a checkout of an earlier commit of this relayd:
# configured as a v2 relayd and run in every scenario, for a before/after in one run.
#
# Bench-only dependencies (uvloop for the load generator, py-spy) are installed into
# .venv/bench-site, which only the generator puts on its path: relayd must not pick
# uvloop up by accident (uvicorn's loop="auto" would), so it is measured as shipped.

BENCH_PY   ?= .venv/bin/python
BENCH_SITE ?= .venv/bench-site
BENCH_ARGS ?=
BENCH_V1   ?=
BENCH_V1_ARG = $(if $(BENCH_V1),--relayd-v1 $(BENCH_V1))

.PHONY: bench bench-quick bench-profile bench-deps bench-scale bench-scale-profile

$(BENCH_SITE)/.stamp:
	$(BENCH_PY) -m pip install -q --target $(BENCH_SITE) 'uvloop>=0.19' 'py-spy>=0.3.14'
	@touch $@

bench-deps: $(BENCH_SITE)/.stamp
	@$(BENCH_PY) -c 'import relayd' 2>/dev/null || { \
	  echo "make bench: relayd is not installed in .venv (run: make test, or make run)" >&2; exit 1; }

# Issue 12: downlink50's command clients, compiled (bench/cmdgen.c: epoll, raw sockets,
# libc only) so that the generator's core is not the limit. $(CC) is gcc from Debian's
# build-essential.
BENCH_BIN     ?= .venv/bench-bin
CMDGEN_CFLAGS ?= -std=c11 -O2 -Wall -Wextra  # -Werror in tests/test_bench_cmdgen.py only

$(BENCH_BIN)/cmdgen: bench/cmdgen.c
	@command -v $(CC) >/dev/null || { \
	  echo "make bench-deps: no C compiler ($(CC)) for bench/cmdgen.c (apt install build-essential)" >&2; exit 1; }
	@mkdir -p $(BENCH_BIN)
	$(CC) $(CMDGEN_CFLAGS) -o $@ bench/cmdgen.c

bench-deps: $(BENCH_BIN)/cmdgen

bench: bench-deps
	$(BENCH_PY) -m bench.run --markdown bench/RESULTS.md $(BENCH_V1_ARG) $(BENCH_ARGS)

bench-quick: bench-deps
	$(BENCH_PY) -m bench.run --quick $(BENCH_V1_ARG) $(BENCH_ARGS)

bench-profile: bench-deps
	$(BENCH_PY) -m bench.run --repeat 1 --relays relayd --scenarios throughput,fanout200 \
	  --profile bench/results/profile $(BENCH_V1_ARG) $(BENCH_ARGS)

# Issue 17: Node-RED (relay "nodered", bench/nodered.py) into bench/node-red/ (git-ignored),
# pinned; the newest release that runs on Node.js 20. Without npm the runner leaves it out.
NODE_RED_VERSION ?= 4.1.8
NODE_RED_STAMP = bench/node-red/.stamp-$(NODE_RED_VERSION)

$(NODE_RED_STAMP):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --prefix bench/node-red --no-audit --no-fund --save-exact \
	    node-red@$(NODE_RED_VERSION) && touch $@; \
	else echo "make bench-deps: no npm here, relay nodered is left out" >&2; fi

bench-deps: $(NODE_RED_STAMP)

# Issue 17: the scale scenarios alone (relayd), and py-spy of relayd and of one generator process
bench-scale: bench-deps
	$(BENCH_PY) -m bench.run --repeat 1 --relays relayd --scenarios fanout1000,fanout5000,idle10k \
	  $(BENCH_ARGS)

bench-scale-profile: bench-deps
	$(BENCH_PY) -m bench.run --repeat 1 --relays relayd --scenarios fanout1000,fanout5000 \
	  --profile bench/results/profile-scale $(BENCH_ARGS)

# MQTT uplink (issue 15): publish rate at QoS 0/1 to a local Mosquitto, fanout50
# with the uplink on vs off, spool write and replay rates; rewrites the
# "MQTT uplink" section of bench/RESULTS.md (~5 min; fanout50 off and on alternate,
# medians of 3; `BENCH_MQTT_ARGS=--quick`: ~1 min; `--only fanout50_mqtt_off,fanout50_mqtt_on`).
BENCH_MQTT_ARGS ?= --repeat 3
.PHONY: bench-mqtt
bench-mqtt: bench-deps
	@command -v mosquitto >/dev/null && command -v mosquitto_sub >/dev/null || { \
	  echo "make bench-mqtt: needs mosquitto and mosquitto_sub (apt install mosquitto mosquitto-clients)" >&2; exit 1; }
	$(BENCH_PY) -m bench.mqtt --markdown bench/RESULTS.md $(BENCH_MQTT_ARGS)

# Issue 15: the MQTT disk spool's write, replay and live rates (bench/spool.py; ~1 min).
#   make bench-spool BENCH_SPOOL_ARGS='--messages 100000'    # shorter
BENCH_SPOOL_ARGS ?=
.PHONY: bench-spool
bench-spool:
	$(BENCH_PY) -m bench.spool $(BENCH_SPOOL_ARGS)

# Sources (issue 14): a `connect` source flat out vs the same load on a listener
# (lines/s and per relayd CPU-second, target connect/listen >= 0.9), and a serial
# pty at 115200 baud for 20 s (no loss, in order). `BENCH_SOURCES_ARGS='--seconds 2
# --repeat 1 --serial-s 3'` for a smoke run.
BENCH_SOURCES_ARGS ?=
.PHONY: bench-sources
bench-sources: bench-deps
	$(BENCH_PY) -m bench.sources $(BENCH_SOURCES_ARGS)

# Footprint (issue 17 part 2): idle RSS, exec -> READY=1 and `relayctl status` wall time
# with the packaged config (medians of 5), and the -X importtime breakdown of both.
.PHONY: bench-footprint
bench-footprint: bench-deps
	$(BENCH_PY) -m bench.footprint --repeat 5 $(BENCH_FOOTPRINT_ARGS)

# Issue 17: the floor under fanout1000/fanout5000 here: one small loopback send to each of
# 1,000 / 5,000 clients, no relay around it (bench/sendcost.py; ~30 s). SCHED_FIFO as the bench.
.PHONY: bench-sendcost
bench-sendcost: bench-deps
	chrt -f 10 $(BENCH_PY) -m bench.sendcost $(BENCH_SENDCOST_ARGS)

# Idle RSS of relayd by part (issue 17): what each group of imports adds.
.PHONY: bench-footprint-parts
bench-footprint-parts: bench-deps
	$(BENCH_PY) -m bench.footprint_parts $(BENCH_FOOTPRINT_PARTS_ARGS)

# Issue 17 part 2, on the real package: the .deb installed in the booted Debian 13 machine
# of `make e2e` (Python 3.13, Debian's python3-* libraries, systemd, /etc/relayd/relayd.toml):
# medians of BENCH_FOOTPRINT_DEB_STARTS restarts of relayd.service (idle RSS, exec -> READY=1
# from systemd's timestamps, relayctl status), -X importtime of both, RSS by part. Needs root.
BENCH_FOOTPRINT_DEB_STARTS ?= 3
.PHONY: bench-footprint-deb
bench-footprint-deb: $(RELAYD_DEB)
	bash packaging/e2e/run.sh --footprint $(BENCH_FOOTPRINT_DEB_STARTS) $(RELAYD_DEB)
