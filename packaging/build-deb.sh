#!/usr/bin/env bash
# Build relayd's .deb with Debian 13's own tools and check it.
#
#   packaging/build-deb.sh [OUTDIR]      (default: build/deb in the repo)
#
# The tracked tree of the repository (plus new files not ignored by git) is
# copied to OUTDIR/src and built with `dpkg-buildpackage -us -uc -b` in a
# cached `mmdebstrap --variant=buildd` trixie root under systemd-nspawn,
# with a clean environment and no network. In the same root it then runs
# `mandoc -T lint -W warning` on the man pages, `lintian --fail-on
# error,warning` on the result, and `systemd-analyze verify` and
# `systemd-analyze security --offline=true` (exposure <= 2.0) on the unit
# as installed by the package.
#
# Result: OUTDIR/relayd_VERSION_all.deb (and the .changes, .buildinfo).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
LOG_TAG=deb
# shellcheck source=packaging/lib.sh
. "$here/lib.sh"

# Debian 13 tools used to build and check; keep in sync with the
# Build-Depends of debian/control (dpkg-buildpackage checks them).
BUILDD_INCLUDE=debhelper,dh-python,pybuild-plugin-pyproject,python3-all,python3-setuptools,lintian,mandoc,man-db,systemd

out=${1:-$repo/build/deb}
need_root
ensure_host_tools systemd-nspawn:systemd-container mmdebstrap:mmdebstrap
started=$SECONDS
root=$(ensure_root trixie-buildd buildd "$BUILDD_INCLUDE")

version=$(sed -n '1s/^relayd (\([^)]*\)).*/\1/p' "$repo/debian/changelog")
[ -n "$version" ] || die "cannot read the version from debian/changelog"
deb=relayd_${version}_all.deb

# Stage the source: what git tracks, plus new files it does not ignore, so
# a local build sees the same tree as a clean clone (no .venv, no build/).
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/src"
mkdir -p "$out/src/relayd"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	# shellcheck disable=SC2016 # the sh -c script is quoted on purpose
	git -C "$repo" ls-files -z --cached --others --exclude-standard |
		(cd "$repo" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; true' sh) |
		tar -C "$repo" --null -T - -cf - | tar -C "$out/src/relayd" -xf -
else
	tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build \
		--exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$out/src/relayd" -xf -
fi
rm -f "$out"/relayd_*

log "building $deb in $root"
nspawn_pipe "$root" --private-network --bind="$out:/build" --chdir=/build/src/relayd -- \
	bash packaging/deb-inside.sh

cp "$out"/src/relayd_"$version"_* "$out/"
[ -f "$out/$deb" ] || die "$out/$deb was not built"
log "ok: $out/$deb ($((SECONDS - started)) s)"
