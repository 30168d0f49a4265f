#!/bin/bash
# Runs inside the trixie buildd root (see packaging/build-deb.sh), in the
# staged source tree, as root in a throw-away overlay: build the package,
# then lint the man pages, the package and the installed unit.
set -euo pipefail
say() { printf '[deb] %s\n' "$*" >&2; }

say "dpkg-buildpackage -us -uc -b (debhelper $(dpkg-query -W -f='${Version}' debhelper), dh-python $(dpkg-query -W -f='${Version}' dh-python))"
dpkg-buildpackage -us -uc -b

version=$(dpkg-parsechangelog -S Version)
deb=../relayd_${version}_all.deb
changes=$(ls ../relayd_"${version}"_*.changes)

say "mandoc -T lint -W warning man/*; man --warnings (groff, as lintian runs it)"
mandoc -T lint -W warning man/*.[158]
for page in man/*.[158]; do
	warnings=$(man --warnings -E UTF-8 -l -Tutf8 -Z "$page" 2>&1 >/dev/null)
	[ -z "$warnings" ] || { printf '%s: %s\n' "$page" "$warnings" >&2; exit 1; }
done

say "lintian $(dpkg-query -W -f='${Version}' lintian) --fail-on error,warning"
# As an unprivileged user, as lintian recommends.
runuser -u nobody -- lintian --fail-on error,warning --display-info --tag-display-limit 0 "$changes"

# The unit as the package installs it, with its man pages, so that
# `systemd-analyze verify` also checks ExecStart= and Documentation=.
say "systemd-analyze verify relayd.service (systemd $(dpkg-query -W -f='${Version}' systemd))"
dpkg-deb -x "$deb" /
unit=/usr/lib/systemd/system/relayd.service
verify=$(systemd-analyze verify "$unit" 2>&1) || true
if [ -n "$verify" ]; then
	printf '%s\n' "$verify" >&2
	say "FAIL: systemd-analyze verify printed the above"
	exit 1
fi

say "systemd-analyze security --offline=true"
security=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1) || true
printf '%s\n' "$security" | grep -E '^(✗|→)' >&2 || true
exposure=$(printf '%s\n' "$security" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || { printf '%s\n' "$security" >&2; say "FAIL: no exposure level"; exit 1; }
if ! awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
	say "FAIL: exposure $exposure > 2.0"
	exit 1
fi
say "ok: lintian clean, man pages clean, unit verified, exposure $exposure"
