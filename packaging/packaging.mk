# Debian package and systemd end-to-end test; included by the top-level
# Makefile. Both need root (mmdebstrap, systemd-nspawn) and install
# systemd-container and mmdebstrap with apt when missing. Debian 13 roots are
# cached under $(RELAYD_CI_CACHE) (default /var/cache/relayd-ci).
#
#   make deb        build/deb/relayd_VERSION_all.deb, built with Debian 13's
#                   debhelper and dh-python and checked with its lintian,
#                   mandoc and systemd-analyze (verify, security <= 2.0)
#   make e2e        install that .deb into a booted Debian 13 (systemd-nspawn)
#                   and test it with systemctl, relayctl and real clients;
#                   builds the .deb first when it is missing or out of date
#   make man-lint   mandoc -T lint -W warning on man/ (quick, on the host)
#   make deb-clean  remove build/deb; `make deb-clean-cache` also the roots

RELAYD_DEB_VERSION := $(shell awk -F'[()]' '{ print $$2; exit }' debian/changelog)
RELAYD_DEB_DIR ?= build/deb
RELAYD_DEB := $(RELAYD_DEB_DIR)/relayd_$(RELAYD_DEB_VERSION)_all.deb
# What the package is built from: the files git knows, minus build output.
RELAYD_DEB_SOURCES := $(filter-out build/%,$(shell git ls-files --cached --others --exclude-standard 2>/dev/null))

.PHONY: deb e2e man-lint deb-clean deb-clean-cache

deb:
	bash packaging/build-deb.sh $(RELAYD_DEB_DIR)

$(RELAYD_DEB): $(wildcard $(RELAYD_DEB_SOURCES))
	bash packaging/build-deb.sh $(RELAYD_DEB_DIR)

e2e: $(RELAYD_DEB)
	bash packaging/e2e/run.sh $(RELAYD_DEB)

man-lint:
	@command -v mandoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mandoc; }
	mandoc -T lint -W warning man/relayd.8 man/relayctl.1 man/relayd.toml.5

deb-clean:
	rm -rf $(RELAYD_DEB_DIR)

deb-clean-cache: deb-clean
	rm -rf $${RELAYD_CI_CACHE:-/var/cache/relayd-ci}
