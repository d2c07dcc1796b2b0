#!/usr/bin/env bash
# Compiles Firecracker's own x86_64 seccomp policy for its gnu build (used by run.sh --seccomp):
#
#   examples/firecracker/seccomp.sh OUT
#
# OUT is run.sh's work folder (Firecracker's sources in OUT/firecracker, its build in
# OUT/target). Firecracker's build script compiles a real policy only for its musl targets
# (resources/seccomp/x86_64-unknown-linux-musl.json); a gnu build, which `gmem exec` can
# preload into, gets an empty one. This adds to every thread's filter the system calls glibc
# makes where musl makes others (GLIBC below, found by booting without gmem until no call
# was refused), compiles the policy with the seccompiler in Firecracker's tree, and writes:
#   OUT/seccomp/gnu.json, OUT/seccomp/gnu.bpf   the policy Firecracker runs under
#   OUT/seccomp/gmem.json, OUT/seccomp/gmem.bpf the same plus what `gmem exec` must also allow
#                                               (GMEM below, from `gmem exec --seccomp-list`)
set -euo pipefail
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# What the gnu build calls where the musl build calls something else, found by booting
# without gmem until no call was refused (strace shows the refused one in SIGSYS's
# si_syscall): epoll_wait (musl: epoll_pwait); tgkill and getpid to stop the vCPU threads
# (musl: tkill); futex FUTEX_WAIT_BITSET|FUTEX_CLOCK_REALTIME (265) in pthread_join; fcntl
# F_GETFD, which Rust's standard library makes in debug builds when it closes a descriptor.
GLIBC='[{"syscall": "epoll_wait"}, {"syscall": "getpid"}, {"syscall": "tgkill"},
 {"syscall": "futex", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 265}]},
 {"syscall": "fcntl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 1}]}]'
SRC=$OUT/firecracker
BIN=$OUT/target/debug/seccompiler-bin
if [ ! -x "$BIN" ]; then
	(cd "$SRC" && RUSTUP_TOOLCHAIN=stable CARGO_TARGET_DIR="$OUT/target" \
		RUSTFLAGS="-Cdebuginfo=0 -Ccodegen-units=16" cargo build -q -p seccompiler --bin seccompiler-bin)
fi
mkdir -p "$OUT/seccomp"
GMEM=$("$ROOT/target/debug/gmem" exec --seccomp-list | awk '{print $1}' | tr '\n' ' ')
python3 - "$SRC/resources/seccomp/x86_64-unknown-linux-musl.json" "$OUT/seccomp" "$GLIBC" "$GMEM" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
glibc = json.loads(sys.argv[3])
gmem = [{"syscall": n} for n in sys.argv[4].split()]
policy = json.load(open(src))
def extended(rules, why):
    p = json.loads(json.dumps(policy))
    for thread in p.values():
        plain = {r["syscall"] for r in thread["filter"] if "args" not in r}
        for r in rules:
            if "args" in r or r["syscall"] not in plain:
                thread["filter"].append(dict(r, comment=why))
    return p
json.dump(extended(glibc, "the gnu build"), open(out + "/gnu.json", "w"), indent=1)
gnu = extended(glibc, "the gnu build")
policy = gnu
json.dump(extended(gmem, "gmem exec --seccomp-list"), open(out + "/gmem.json", "w"), indent=1)
PY
for p in gnu gmem; do
	"$BIN" -t x86_64 -i "$OUT/seccomp/$p.json" -o "$OUT/seccomp/$p.bpf" >/dev/null
done
echo "seccomp: $OUT/seccomp/gnu.bpf (Firecracker's x86_64 policy + the gnu build's calls), $OUT/seccomp/gmem.bpf (+ gmem exec --seccomp-list: $GMEM)"
