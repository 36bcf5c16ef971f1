"""`audit --watch` sees connections opened while it watches.

On this machine the probe runs on the raw tcp_probe tracepoint, which keys
segments by the cookie a socket already has; the kernel assigns one only
when asked (an INET_DIAG dump does).  The watch therefore dumps the
selection at its start and again every few seconds: a connection opened
after the first dump is recorded from the next one on and reported with
probe precision (`idle_source: "bpf"`), not left to tcp_info.
"""

import socket
import subprocess
import threading
import time

import pytest

from conftest import parse_json_lines
from lab.netns import cookie_of, in_netns

pytestmark = pytest.mark.kernel

PORT = 7301
WATCH_S = 5


def test_a_connection_opened_during_the_watch_is_seen_by_the_probe(netns, tcpidle_argv):
    lst = in_netns(netns.name, lambda: _listener(PORT))
    proc = subprocess.Popen(tcpidle_argv(netns, "audit", "--watch", WATCH_S, "-s", PORT,
                                         "--json", "-vv"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, primed, primed_again = [], threading.Event(), threading.Event()

    def read_log():
        for line in proc.stderr:
            log.append(line)
            if "cookies primed" in line:
                (primed_again if primed.is_set() else primed).set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    socks = [lst]
    try:
        if not primed.wait(60):
            pytest.skip("the probe did not use a hook that needs cookie priming: %s"
                        % "".join(log)[-500:])
        # Opened after the watch's first dump: no cookie yet.
        client = in_netns(netns.name, lambda: socket.create_connection(("127.0.0.1", PORT), timeout=5))
        server, _ = lst.accept()
        socks += [client, server]
        client.sendall(b"early")
        assert server.recv(8) == b"early"
        # The next dump of the selection numbers the new connection (-vv logs it).
        assert primed_again.wait(WATCH_S), "".join(log)
        client.sendall(b"late")
        late = time.monotonic()
        assert server.recv(8) == b"late"
        out, _ = proc.communicate(timeout=60)
        reader.join(5)
        assert proc.returncode == 0, "".join(log)
        waited_ms = (time.monotonic() - late) * 1000
        rows = {r["cookie"]: r for r in parse_json_lines(out)}
        row = rows[cookie_of(server)]
        assert row["idle_source"] == "bpf", (row, "".join(log)[-800:])
        assert 0 < row["idle_ms"] <= waited_ms, row
        assert sum("cookies primed" in line for line in log) >= 2, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in socks:
            s.close()


def _listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s
