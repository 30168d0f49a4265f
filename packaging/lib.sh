# shellcheck shell=bash
# Shared helpers for packaging/build-deb.sh and packaging/e2e/run.sh.
# Source it from bash with `set -euo pipefail` in effect.
#
# Debian 13 (trixie) root file systems are built with mmdebstrap and cached
# under $RELAYD_CI_CACHE (default /var/cache/relayd-ci). A root is rebuilt
# when it is missing, when the package list it was built with changed, or
# when it is older than $RELAYD_CI_ROOT_MAX_AGE_DAYS (default 30) days.
#
# Mirrors: by default mmdebstrap picks them itself (the suite, its -updates and
# its -security). $RELAYD_CI_MIRROR (e.g. a local apt cache) replaces them with
# that mirror for the suite and -updates, plus $RELAYD_CI_SECURITY_MIRROR for
# -security when it is set too (without it the root has no security updates).

RELAYD_CI_CACHE=${RELAYD_CI_CACHE:-/var/cache/relayd-ci}
RELAYD_CI_SUITE=${RELAYD_CI_SUITE:-trixie}
RELAYD_CI_MIRROR=${RELAYD_CI_MIRROR:-}
RELAYD_CI_SECURITY_MIRROR=${RELAYD_CI_SECURITY_MIRROR:-}
RELAYD_CI_ROOT_MAX_AGE_DAYS=${RELAYD_CI_ROOT_MAX_AGE_DAYS:-30}

# The clean environment every command in a root runs with.
CLEAN_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive)

log() { printf '[%s] %s\n' "${LOG_TAG:-relayd-ci}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
	[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap and systemd-nspawn need it)"
}

# ensure_host_tools CMD:PACKAGE...: apt-get install the packages whose
# command is missing, with one `apt-get update` before the first install.
_apt_updated=
ensure_host_tools() {
	local spec missing=()
	for spec in "$@"; do
		command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
	if [ -z "$_apt_updated" ]; then
		log "apt-get update"
		apt-get update -qq
		_apt_updated=1
	fi
	log "installing on the host: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_root NAME VARIANT PACKAGES: print the path of a cached trixie root
# with PACKAGES (comma-separated) installed, building it when needed.
ensure_root() {
	local name=$1 variant=$2 include=$3
	local dir=$RELAYD_CI_CACHE/$name stamp key mirrors=()
	if [ -n "$RELAYD_CI_MIRROR" ]; then
		mirrors=("deb $RELAYD_CI_MIRROR $RELAYD_CI_SUITE main"
			"deb $RELAYD_CI_MIRROR $RELAYD_CI_SUITE-updates main")
		if [ -n "$RELAYD_CI_SECURITY_MIRROR" ]; then
			mirrors+=("deb $RELAYD_CI_SECURITY_MIRROR $RELAYD_CI_SUITE-security main")
		fi
	elif [ -n "$RELAYD_CI_SECURITY_MIRROR" ]; then
		die "RELAYD_CI_SECURITY_MIRROR needs RELAYD_CI_MIRROR (without both, mmdebstrap picks the mirrors)"
	fi
	key="suite=$RELAYD_CI_SUITE variant=$variant include=$include mirrors=${mirrors[*]:-default}"
	stamp=$dir/.relayd-ci-stamp
	mkdir -p "$RELAYD_CI_CACHE"
	(
		# One builder at a time; others wait and then find the fresh root.
		flock 9
		if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] &&
			[ -z "$(find "$stamp" -mtime +"$RELAYD_CI_ROOT_MAX_AGE_DAYS")" ]; then
			exit 0
		fi
		log "building $RELAYD_CI_SUITE root $dir ($variant: $include)"
		local tmp=$dir.new.$$ started=$SECONDS attempt
		for attempt in 1 2; do # a second try for a flaky mirror
			rm -rf "$tmp"
			# No mirror given: mmdebstrap 1.x uses its defaults (stdin only for
			# the mirror "-"); /dev/null keeps older ones from waiting on stdin.
			mmdebstrap --quiet --mode=root --format=directory --variant="$variant" \
				--aptopt='Acquire::Retries "3"' --include="$include" "$RELAYD_CI_SUITE" "$tmp" \
				${mirrors[@]+"${mirrors[@]}"} </dev/null >&2 && break
			rm -rf "$tmp"
			[ "$attempt" = 2 ] && die "mmdebstrap failed for $dir"
			log "mmdebstrap failed; trying once more"
		done
		printf '%s\n' "$key" >"$tmp/.relayd-ci-stamp"
		rm -rf "$dir"
		mv "$tmp" "$dir"
		log "built $dir in $((SECONDS - started)) s"
	) 9>"$RELAYD_CI_CACHE/.$name.lock" || exit 1
	printf '%s\n' "$dir"
}

# nspawn_pipe ROOT [NSPAWN-OPTIONS...] -- COMMAND...: run COMMAND in a
# throw-away overlay of ROOT (nothing written to ROOT itself survives),
# with a clean environment. Bind mounts given as options do persist.
nspawn_pipe() {
	local root=$1 opts=()
	shift
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		opts+=("$1")
		shift
	done
	[ "${1:-}" = -- ] && shift
	# nspawn complains on hosts whose /run is not a tmpfs when it cleans up
	# its propagation directory; that line is noise.
	systemd-nspawn --quiet --pipe --register=no --keep-unit --volatile=overlay \
		--machine="relayd-ci-$$-$RANDOM" -D "$root" "${opts[@]}" \
		"${CLEAN_ENV[@]}" "$@" \
		2> >(grep -v --line-buffered 'Attempted to remove disk file system' >&2)
}
