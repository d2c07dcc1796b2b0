#!/usr/bin/env bash
# Firecracker, a real VMM, with guest RAM in an emulated guest_memfd under `gmem exec`.
#
#   examples/firecracker/run.sh [options] CLIENT_DIR
#
# CLIENT_DIR holds Firecracker's feature/secret-hiding branch as the project keeps it: the
# source tarball, its build.sh, the tiny guest (tiny-guest.S) and the two configurations
# (fc-secret-free.json: guest RAM in a guest_memfd with MMAP | INIT_SHARED | NO_DIRECT_MAP;
# fc-plain.json: ordinary RAM). The script builds Firecracker (once) and the gmem command, then
# boots the tiny guest N times under `gmem exec` and N times without gmem (plain RAM: this
# host's kernel has no guest_memfd), and reports how each boot ended.
#
# Options:
#   --boots N      boots per configuration (default 50)
#   --load N       keep N busy loops running during the boots (a loaded machine)
#   --seccomp      also boot under a real seccomp filter (Firecracker's x86_64 policy,
#                  compiled for the gnu build; see the README)
#   --trace FILE   write one boot's gmem exec trace to FILE
#   --fix-exit-race  build Firecracker with its vCPU exit reordered (exit-race.py): the
#                  rare hang after the guest's last exit is a lost wake-up in Firecracker
# Environment: OUT, the work folder (default target/firecracker).
#
# Opt-in: building Firecracker needs libclang-dev and libseccomp-dev; if they are missing and
# this runs as root, they are installed with apt-get. Nothing else in gmem depends on this.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BOOTS=50
LOAD=0
SECCOMP=0
TRACE=
FIX=0
while [ $# -gt 1 ]; do
	case "$1" in
	--boots) BOOTS=$2; shift 2 ;;
	--load) LOAD=$2; shift 2 ;;
	--seccomp) SECCOMP=1; shift ;;
	--trace) TRACE=$2; shift 2 ;;
	--fix-exit-race) FIX=1; shift ;;
	*) echo "unknown option $1" >&2; exit 2 ;;
	esac
done
[ $# -eq 1 ] || { sed -n '2,22p' "$0" >&2; exit 2; }
CLIENT=$(cd "$1" && pwd)
OUT=${OUT:-$ROOT/target/firecracker}
mkdir -p "$OUT"

need=()
for pkg in libclang-dev libseccomp-dev; do
	dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ]; then
		echo "== installing ${need[*]} (needed to build Firecracker)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
	else
		echo "missing ${need[*]}: install them (apt-get install ${need[*]}) and rerun" >&2
		exit 1
	fi
fi
FC=$OUT/target/debug/firecracker
if [ ! -x "$FC" ] || [ ! -f "$OUT/guest.elf" ]; then
	echo "== building Firecracker (feature/secret-hiding) and the tiny guest into $OUT"
	OUT=$OUT "$CLIENT/build.sh" >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
fi
if [ "$FIX" = 1 ]; then
	# A copy of the sources with the exit reordered, built into a target of its own.
	if [ ! -d "$OUT/firecracker-fixed" ]; then
		cp -r "$OUT/firecracker" "$OUT/firecracker-fixed"
	fi
	python3 "$ROOT/examples/firecracker/exit-race.py" "$OUT/firecracker-fixed/src/vmm/src/vstate/vcpu.rs"
	echo "== building Firecracker with the vCPU exit reordered"
	(cd "$OUT/firecracker-fixed" && RUSTUP_TOOLCHAIN=stable CARGO_TARGET_DIR="$OUT/target-fixed" \
		RUSTFLAGS="-Cdebuginfo=0 -Ccodegen-units=16" cargo build -q -p firecracker) \
		>"$OUT/build-fixed.log" 2>&1 || { tail -20 "$OUT/build-fixed.log"; exit 1; }
	FC=$OUT/target-fixed/debug/firecracker
fi
echo "== building gmem"
(cd "$ROOT" && cargo build -q -p gmem-cli -p gmem-preload)
GMEM=$ROOT/target/debug/gmem
cd "$OUT"

FILTER_ARGS=(--no-seccomp)
if [ "$SECCOMP" = 1 ]; then
	"$ROOT/examples/firecracker/seccomp.sh" "$OUT"
	FILTER_ARGS=(--seccomp-filter "$OUT/seccomp/gnu.bpf")
fi

LOADERS=()
if [ "$LOAD" -gt 0 ]; then
	for _ in $(seq "$LOAD"); do (while :; do :; done) & LOADERS+=($!); done
	trap 'kill "${LOADERS[@]}" 2>/dev/null || true' EXIT
fi

# The guest's serial output in a boot's log: Firecracker's own log lines share its standard
# output and can land in the middle of a guest line; they are taken out.
serial() {
	perl -0pe 's/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+ \[[^\]\n]*\][^\n]*\n//g' "$1"
}

# One boot: prints "ok", "hang" (killed after 60 s) or "bad <why>", and keeps the log.
boot() {
	local name=$1 config=$2 log=$3; shift 3
	local status=0
	timeout 60 "$@" "$FC" --no-api "${FILTER_ARGS[@]}" --config-file "$config" \
		>"$log" 2>&1 </dev/null || status=$?
	if [ "$status" = 124 ]; then
		echo hang
	elif serial "$log" | grep -q "tiny guest: hello from guest_memfd-backed RAM" &&
		serial "$log" | grep -q "tiny guest: RAM write/read ok"; then
		echo "ok $status"
	else
		echo "bad $status"
	fi
}

mkdir -p logs
if [ -n "$TRACE" ]; then
	boot traced fc-secret-free.json logs/traced.log "$GMEM" exec --trace "$TRACE" -- >/dev/null
fi
declare -A tally
for i in $(seq "$BOOTS"); do
	r=$(boot gmem fc-secret-free.json "logs/gmem-$i.log" "$GMEM" exec --)
	tally["gmem exec, secret_free (guest_memfd RAM): $r"]=$((${tally["gmem exec, secret_free (guest_memfd RAM): $r"]:-0} + 1))
	r=$(boot plain fc-plain.json "logs/plain-$i.log" env)
	tally["no gmem, plain RAM: $r"]=$((${tally["no gmem, plain RAM: $r"]:-0} + 1))
done
echo "== $BOOTS boots each$([ "$LOAD" -gt 0 ] && echo ", $LOAD busy loops running")$([ "$SECCOMP" = 1 ] && echo ", seccomp filter on")$([ "$FIX" = 1 ] && echo ", Firecracker's exit race fixed")"
echo "   (ok N: both guest lines printed, Firecracker exited with status N)"
for k in "${!tally[@]}"; do printf '%4d  %s\n' "${tally[$k]}" "$k"; done | sort -k2
echo "== the last boot under gmem exec:"
sed -n '1,400p' "logs/gmem-$BOOTS.log" | grep -E "tiny guest|error|Error|exit" | head -8
