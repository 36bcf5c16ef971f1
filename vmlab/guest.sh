#!/bin/sh
# Runs inside the lab VM (virtme-ng, the host's root file system):
#   guest.sh OUT_DIR [--no-headers] -- PYTEST ARGS...
# Sets up what a booted Debian system would have and the tests need, then runs
# pytest from the checkout (the current directory) with its .venv.  Results go
# to OUT_DIR on the shared root file system: junit.xml, rc, env.
out=$1; shift
headers=yes
if [ "${1:-}" = "--no-headers" ]; then headers=no; shift; fi
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
say() { echo "tcpidle-lab: $*"; }

# BPF pins (the tracker, the probe tests) and tracepoints.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
[ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# virtme-ng brings up no interface; the tests' own namespaces bring up theirs.
ip link set lo up
# The suite raises its soft fd limit to the hard one; as root the hard one
# can be raised too (Debian's default is 4096; tests hold 4,000+ sockets).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Named namespaces live in /run/netns.
mkdir -p /run/netns

# "Without headers": hide the kernel's own header tree (the target of
# /lib/modules/$(uname -r)/build) behind an empty tmpfs, in the guest only.
# Debian splits the tree: build (generated headers) and source (the rest).
mods=/lib/modules/$(uname -r)
if [ "$headers" = no ]; then
    for d in "$mods/build" "$mods/source"; do
        [ -d "$d" ] && mount -t tmpfs none "$d"
    done
    say "headers of $(uname -r) hidden"
fi
if [ -e "$mods/build/include/generated/autoconf.h" ]; then hdr=own; else hdr=none; fi

{
    echo "release=$(uname -r)"
    echo "headers=$hdr"
    echo "nofile_hard=$(ulimit -Hn)"
    echo "kprobes=$([ -e /sys/bus/event_source/devices/kprobe/type ] && echo yes || echo no)"
    echo "btf=$([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo no)"
} > "$out/env"
say "kernel $(uname -r), headers: $hdr, starting pytest $*"
.venv/bin/python -m pytest -p no:cacheprovider --color=no --junitxml="$out/junit.xml" "$@"
rc=$?
echo "$rc" > "$out/rc"
say "pytest exit $rc"
sync
exit "$rc"
