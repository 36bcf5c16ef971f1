#!/usr/bin/env python3
"""Record real INET_DIAG dumps as fixtures for tests/unit/test_diag_decode.py.

Run as root:  .venv/bin/python tests/lab/record_dump.py [OUTDIR]   (default tests/data)

In a fresh network namespace (tidiag-rec-PID, removed afterwards) it makes, on
loopback, for IPv4 and IPv6: a listener, established connections with data
sent at different times (one owned by uid 65534), a TIME_WAIT socket, and an
IPv4 connection accepted by a dual-stack IPv6 listener (v4-mapped addresses).
Then it writes

  dump_v4.bin, dump_v6.bin   the netlink messages of the AF_INET / AF_INET6
                             dump (all states, tcp_info requested) verbatim;
  expected.json              for each socket, what `ss -tanie` printed about
                             it, run once just before and once just after the
                             dump: an independent decoder to check ours
                             against.  tcp_info times are the [before, after]
                             bracket, since they grow while the clock runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tcpidle import diag  # noqa: E402
from tcpidle.netns import entered_fd  # noqa: E402

ALL_STATES = 0xFFFFFFFF
SS_STATE = {
    "ESTAB": "ESTABLISHED", "LISTEN": "LISTEN", "TIME-WAIT": "TIME_WAIT",
    "SYN-SENT": "SYN_SENT", "SYN-RECV": "SYN_RECV", "FIN-WAIT-1": "FIN_WAIT1",
    "FIN-WAIT-2": "FIN_WAIT2", "CLOSE-WAIT": "CLOSE_WAIT", "LAST-ACK": "LAST_ACK",
    "CLOSING": "CLOSING", "UNCONN": "CLOSE",
}


def split_addr(text: str, family: int):
    """ss's 'addr:port' -> (address text as inet_ntop writes it, port)."""
    addr, _, port = text.rpartition(":")
    addr = addr.strip("[]")
    if addr == "*":
        addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
    addr = socket.inet_ntop(family, socket.inet_pton(family, addr))
    return addr, 0 if port == "*" else int(port)


def parse_ss(text: str, family: int):
    """Parse `ss -tanieH` output into {cookie: fields}."""
    out = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line[0].isspace():
            continue
        info = lines[i] if i < len(lines) and lines[i][:1].isspace() else ""
        if info:
            i += 1
        f = line.split()
        src, sport = split_addr(f[3], family)
        dst, dport = split_addr(f[4], family)
        kv = dict(re.findall(r"\b(uid|ino|sk|lastsnd|lastrcv|lastack):(\w+)", line + " " + info))
        has_info = "cwnd:" in info  # ss prints a tcp_info line only when it got one
        rec = {
            "state": SS_STATE[f[0]],
            "src": src, "sport": sport, "dst": dst, "dport": dport,
            "inode": int(kv.get("ino", 0)),
            "uid": int(kv.get("uid", 0)),  # ss omits uid 0
            "cookie": int(kv["sk"], 16),
            "has_info": has_info,
        }
        for key, field in (("lastsnd", "last_data_sent_ms"), ("lastrcv", "last_data_recv_ms"),
                           ("lastack", "last_ack_recv_ms")):
            # ss omits zero values; no tcp_info at all means None.
            rec[field] = int(kv.get(key, 0)) if has_info else None
        out[rec["cookie"]] = rec
    return out


def pair(listener: socket.socket, family: int, addr, bind=None):
    c = socket.socket(family, socket.SOCK_STREAM)
    if bind:
        c.bind(bind)
    c.connect(addr)
    a, _ = listener.accept()
    return c, a


def build_sockets():
    keep = []
    # IPv4
    l4 = socket.socket(socket.AF_INET)
    l4.bind(("127.0.0.1", 4401))
    l4.listen(16)
    keep.append(l4)
    c, a = pair(l4, socket.AF_INET, ("127.0.0.1", 4401), ("127.0.0.2", 0))
    keep += [c, a]
    c.sendall(b"ping")
    a.recv(4)
    # uid 65534 client: the socket's uid is the creator's fsuid.
    os.setegid(65534)
    os.seteuid(65534)
    try:
        n = socket.socket(socket.AF_INET)
    finally:
        os.seteuid(0)
        os.setegid(0)
    n.connect(("127.0.0.1", 4401))
    keep += [n, l4.accept()[0]]
    tw_c, tw_a = pair(l4, socket.AF_INET, ("127.0.0.1", 4401))
    tw_c.close()  # the active closer ends in TIME_WAIT
    time.sleep(0.05)
    tw_a.close()
    # IPv6, v6only listener on ::1
    l6 = socket.socket(socket.AF_INET6)
    l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    l6.bind(("::1", 6601))
    l6.listen(16)
    keep.append(l6)
    c6, a6 = pair(l6, socket.AF_INET6, ("::1", 6601))
    keep += [c6, a6]
    tw6_c, tw6_a = pair(l6, socket.AF_INET6, ("::1", 6601))
    tw6_c.close()
    time.sleep(0.05)
    tw6_a.close()
    # Dual-stack listener; an IPv4 client: the accepted socket is AF_INET6
    # with v4-mapped addresses.
    ld = socket.socket(socket.AF_INET6)
    ld.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ld.bind(("::", 6602))
    ld.listen(16)
    keep.append(ld)
    keep += list(pair(ld, socket.AF_INET, ("127.0.0.1", 6602)))
    # Spread the tcp_info clocks: data one way, wait, data the other way.
    time.sleep(0.3)
    a.sendall(b"pong")
    c.recv(4)
    c6.sendall(b"ping6")
    a6.recv(5)
    time.sleep(0.2)
    return keep


def main(outdir: str) -> None:
    if os.geteuid() != 0:
        sys.exit("record_dump.py needs root (network namespaces)")
    os.makedirs(outdir, exist_ok=True)
    ns = "tidiag-rec-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        nsfd = os.open("/run/netns/" + ns, os.O_RDONLY)
        with entered_fd(nsfd):
            keep = build_sockets()
            expected = {}
            with diag.DiagSocket() as ds:
                for fam, name, flag in ((socket.AF_INET, "v4", "-4"), (socket.AF_INET6, "v6", "-6")):
                    ss = ["ss", "-tanieH", flag]
                    before = parse_ss(subprocess.run(ss, capture_output=True, text=True, check=True).stdout, fam)
                    raw = ds.dump_raw(fam, ALL_STATES)
                    after = parse_ss(subprocess.run(ss, capture_output=True, text=True, check=True).stdout, fam)
                    with open(os.path.join(outdir, "dump_%s.bin" % name), "wb") as f:
                        f.write(raw)
                    entries = []
                    for cookie, b in sorted(before.items()):
                        a = after.get(cookie)
                        if a is None:
                            sys.exit("socket %x vanished between the two ss runs; re-run" % cookie)
                        e = dict(b)
                        for field in ("last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms"):
                            e[field] = None if b[field] is None else [b[field], a[field]]
                        entries.append(e)
                    expected["dump_%s.bin" % name] = entries
            for s in keep:
                s.close()
        os.close(nsfd)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    with open(os.path.join(outdir, "expected.json"), "w") as f:
        json.dump(
            {
                "recorded_on": "Linux %s" % os.uname().release,
                "note": "fields as printed by ss -tanie just before / after the dump; "
                "tcp_info times are [before, after] brackets",
                "dumps": expected,
            },
            f, indent=1, sort_keys=True,
        )
        f.write("\n")
    for name, entries in expected.items():
        print("%s: %d sockets" % (name, len(entries)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data"))
