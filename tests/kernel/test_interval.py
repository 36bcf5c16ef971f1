"""End to end: `tcpidle kill -i S` polls, destroys a connection once it turns
idle between polls, spares the active one, and exits 0 promptly on SIGTERM."""

import json
import signal
import subprocess
import tempfile
import time

import pytest

pytestmark = pytest.mark.kernel

ECONNABORTED = 103
PORT = 7001


def test_interval_kills_a_connection_that_turns_idle(netns, make_farm, tcpidle_argv):
    farm = make_farm(netns)
    farm.serve([PORT])
    # A sentinel, idle from the start: its death proves the poller is running.
    sentinel = farm.connect("127.0.0.1", PORT, label="idle", tag="sentinel")[0]
    quitter = farm.connect("127.0.0.1", PORT, label="active", tag="quitter")[0]
    steady = farm.connect("::1", PORT, label="active", tag="steady")[0]
    # idle, but on another port: never selected
    farm.serve([PORT + 1])
    bystander = farm.connect("127.0.0.1", PORT + 1, label="idle", tag="bystander")[0]

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            tcpidle_argv(netns, "kill", "-i", "0.2", "-d", PORT, "-t", 300, "--json"),
            stdout=out, stderr=err)
        try:
            st = farm.wait_until(lambda s: not s[sentinel["id"]]["alive"], timeout=30)
            assert st[sentinel["id"]]["error"] == ECONNABORTED, (st[sentinel["id"]], _text(err))
            assert proc.poll() is None, _text(err)

            # Several polls with both talking: neither is touched.
            time.sleep(1.0)
            st = farm.status()
            for rec in (quitter, steady, bystander):
                assert st[rec["id"]]["alive"] and st[rec["id"]]["error"] is None, st[rec["id"]]

            # The quitter stops sending; the next polls after 300 ms of silence get it.
            farm.set_label([quitter["id"]], "idle")
            stopped = time.monotonic()
            st = farm.wait_until(lambda s: not s[quitter["id"]]["alive"], timeout=5)
            took = time.monotonic() - stopped
            assert st[quitter["id"]]["error"] == ECONNABORTED, (st[quitter["id"]], _text(err))
            # not before it had been idle ~300 ms (its last echo came <= 50 ms
            # before it stopped), and within a few polls after
            assert took >= 0.2, took
            assert took < 3.0, took

            st = farm.status()
            assert st[steady["id"]]["alive"] and st[steady["id"]]["error"] is None
            assert st[bystander["id"]]["alive"] and st[bystander["id"]]["error"] is None
            assert all(farm.ping([steady["id"], bystander["id"]]).values())
            assert proc.poll() is None, _text(err)

            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = proc.wait(timeout=5)
            assert rc == 0, _text(err)
            assert time.monotonic() - signalled < 2.0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        # JSON lines for exactly the two victims
        out.seek(0)
        rows = [json.loads(line) for line in out.read().decode().splitlines() if line.strip()]
        assert sorted(r["cookie"] for r in rows) == sorted([sentinel["cookie"], quitter["cookie"]])
        assert all(r["action"] == "destroyed" for r in rows)


def _text(f):
    f.seek(0)
    return f.read().decode(errors="replace")
