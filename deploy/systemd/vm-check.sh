#!/bin/sh
# The systemd unit, really run: executed inside a lab VM booted with systemd
# as init (scripts/lab --systemd; virtme-ng --systemd, the host's root file
# system read-only), as the unit `kernel-command-line.service` that the
# kernel command line's systemd.run= asks for.
#
#   vm-check.sh [REPO]      (default: the repository this script is in)
#
# Installs the unit as README.md says (the repository bind-mounted at
# /opt/tcpidle, the unit in /etc/systemd/system, its arguments in
# /etc/default/tcpidle), then: systemctl start; scrape the metrics endpoint;
# an idle loopback connection destroyed by the sandboxed tracker; systemctl
# reload reopens the log; systemctl stop keeps the pins.  Every writable
# place (/etc, /var, /opt, /tmp, /root) is a tmpfs overlay made here first:
# nothing reaches the host's files.  Progress and the verdict go to the
# serial console, one line each, prefixed "tcpidle-sd:"; the host reads them
# from the console log.
repo=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
say() { echo "tcpidle-sd: $*" > /dev/ttyS0; }
fail() { say "FAIL $*"; journalctl -u tcpidle --no-pager -n 40 2>&1 | sed 's/^/tcpidle-sd: journal: /' > /dev/ttyS0; exit 1; }
wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    t=$1; shift
    while [ "$t" -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 1; t=$((t - 1)); done
    return 1
}
py=/usr/bin/python3
t0=$(date +%s)
say "kernel $(uname -r), init $(cat /proc/1/comm), systemd $(systemctl --version | head -1 | cut -d' ' -f2)"

# -- writable places, in memory only ---------------------------------------
modprobe overlay 2>/dev/null
mkdir -p /run/sd
for d in /etc /var /opt /tmp /root; do
    n=$(echo "$d" | tr / _)
    mkdir -p "/run/sd/$n/up" "/run/sd/$n/work"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=/run/sd/$n/up,workdir=/run/sd/$n/work" "$d" \
        || fail "overlay on $d"
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
ip link set lo up

# -- install as README.md says ------------------------------------------------
mkdir -p /opt/tcpidle && mount --bind "$repo" /opt/tcpidle || fail "bind $repo"
[ -x /opt/tcpidle/.venv/bin/tcpidle ] || fail "no /opt/tcpidle/.venv/bin/tcpidle (run scripts/setup env)"
cp /opt/tcpidle/deploy/systemd/tcpidle.service /etc/systemd/system/
cp /opt/tcpidle/deploy/systemd/tcpidle.default /etc/default/tcpidle
# "then edit TCPIDLE_ARGS": destroy connections to port 7777 idle 1 s, poll every 2 s.
echo 'TCPIDLE_ARGS="-d 7777 -t 1000 --interval 2 --exclude-port 22 --metrics-port 9733"' >> /etc/default/tcpidle
systemctl daemon-reload

# An idle connection to port 7777, and one to 7778 that must survive.  The
# helper records how each client ended.
cat > /run/sd/conns.py <<'PY'
import socket, sys, time, errno
out = {}
srv = [socket.socket() for _ in range(2)]
peers = []
for s, port in zip(srv, (7777, 7778)):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(1)
    c = socket.create_connection(("127.0.0.1", port)); a, _ = s.accept()
    peers.append((port, c, a))
open("/run/sd/conns.ready", "w").close()
deadline = time.time() + 240
for port, c, a in peers:
    c.settimeout(max(1, deadline - time.time()) if port == 7777 else 1)
    try:
        r = c.recv(1)
        out[port] = "eof" if r == b"" else "data"
    except socket.timeout:
        out[port] = "alive"
    except OSError as e:
        out[port] = errno.errorcode.get(e.errno, str(e.errno))
    with open("/run/sd/conn-%d" % port, "w") as f:
        f.write(out[port])
PY
$py /run/sd/conns.py &
wait_for 20 test -e /run/sd/conns.ready || fail "test connections"

# -- start ---------------------------------------------------------------------
systemctl enable --now tcpidle 2>/dev/null || fail "systemctl enable --now tcpidle"
wait_for 120 sh -c 'systemctl is-active -q tcpidle' || fail "not active"
cat > /run/sd/metric.py <<'PY'
import sys, urllib.request
try:
    text = urllib.request.urlopen("http://127.0.0.1:9733/metrics", timeout=5).read().decode()
except OSError:
    sys.exit(1)
for line in text.splitlines():
    if line.split(" ")[0] == sys.argv[1]:
        print(line.split()[-1])
        sys.exit(0)
sys.exit(2)
PY
metric() { $py /run/sd/metric.py "$1"; }
wait_for 180 metric tcpidle_sockets_seen || fail "metrics endpoint never answered"
start_s=$(($(date +%s) - t0))
say "started: active, metrics answer (${start_s} s after the script began)"
wait_for 60 sh -c '[ "$(/usr/bin/python3 /run/sd/metric.py tcpidle_last_poll_timestamp_seconds)" != 0.0 ]' \
    || fail "no successful poll"
probe=$(metric tcpidle_probe_attached)
say "metrics: probe_attached=$probe sockets_seen=$(metric tcpidle_sockets_seen) last_poll=$(metric tcpidle_last_poll_timestamp_seconds)"

# -- the sandboxed tracker destroys the idle connection, and only it ------------
wait_for 60 test -e /run/sd/conn-7777 || fail "the idle connection to 7777 was not destroyed"
wait_for 10 test -e /run/sd/conn-7778
got=$(cat /run/sd/conn-7777); other=$(cat /run/sd/conn-7778 2>/dev/null)
[ "$got" = ECONNABORTED ] || fail "client of 7777 ended with $got, want ECONNABORTED"
[ "$other" = alive ] || fail "client of 7778 ended with $other, want alive"
destroyed=$(metric 'tcpidle_kills_total{outcome="destroyed"}')
say "destroy: 7777 client got $got, 7778 alive; tcpidle_kills_total{outcome=destroyed}=$destroyed"
grep -q "destroyed" /var/log/tcpidle/tcpidle.log || fail "kill not in /var/log/tcpidle/tcpidle.log"

# -- reload reopens the log -----------------------------------------------------
mv /var/log/tcpidle/tcpidle.log /var/log/tcpidle/tcpidle.log.1
pid=$(systemctl show -p MainPID --value tcpidle)
systemctl reload tcpidle || fail "systemctl reload"
wait_for 20 sh -c "ls -l /proc/$pid/fd | grep -q '/var/log/tcpidle/tcpidle.log\$'" \
    || fail "the log was not reopened after reload"
[ "$(systemctl show -p MainPID --value tcpidle)" = "$pid" ] || fail "reload restarted the tracker"
say "reload: same pid $pid, /var/log/tcpidle/tcpidle.log reopened"

# -- stop keeps the pins -----------------------------------------------------------
[ -e /sys/fs/bpf/tcpidle/activity ] && [ -e /sys/fs/bpf/tcpidle/counters ] || [ "$probe" != 1.0 ] \
    || fail "no pins while running"
systemctl stop tcpidle || fail "systemctl stop"
result=$(systemctl show -p Result --value tcpidle)
[ "$result" = success ] || fail "stop: Result=$result"
if [ "$probe" = 1.0 ]; then
    [ -e /sys/fs/bpf/tcpidle/activity ] && [ -e /sys/fs/bpf/tcpidle/counters ] || fail "pins gone after stop"
    pins="pins kept: $(ls /sys/fs/bpf/tcpidle | tr '\n' ' ')"
else
    pins="no probe, no pins"
fi
say "stop: Result=$result, $pins"
score=$(systemd-analyze security tcpidle 2>/dev/null | tail -1)
[ -n "$score" ] && say "systemd-analyze security: $score"
say "PASS in $(($(date +%s) - t0)) s"
exit 0
