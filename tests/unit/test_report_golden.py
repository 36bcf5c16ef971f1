"""The JSON rows byte for byte: a fixed set of verdicts and outcomes against the text
recorded before report.py's row writer was rewritten for speed (tests/data/rows_golden.jsonl).

Every branch of the row writer is here: both families and an unknown one, known and
unknown states, each namespace label kind, idle times None / integral / fractional /
rounded, each idle source, vitals absent and present (keep-alive timer or not, None
fields), health absent and with reasons that need escaping, each exposure, owners
with names that need escaping (quotes, control characters, non-ASCII), actions with
and without errors.  Regenerate the file only for an intended change of the contract:
    .venv/bin/python tests/unit/test_report_golden.py > tests/data/rows_golden.jsonl
"""

import io
import os
import sys

from tcpidle import report
from tcpidle.model import AF_INET, AF_INET6, Health, Outcome, OwnerSummary, Socket, Verdict, Vitals

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "rows_golden.jsonl")

FULL = Vitals(2, 1, 7000, 0, 5, 0, 0, 3, 1, 0, 65535)
OPEN = Vitals(0, 0, 0, 12, 0, 2, 4, 9, 3, 2, 0)
PARTIAL = Vitals(1, 3, 200, 0, 100)  # no tcp_info


def _socket(i, family, state, netns, vitals, **times):
    if family == AF_INET6 or family == 99:
        src, dst = "fd00:7e::%x" % (i + 1), "::ffff:10.0.0.%d" % i
    else:
        src, dst = "127.0.0.%d" % (i + 1), "10.1.%d.%d" % (i, 255 - i)
    return Socket(cookie=(1 << 63) + i if i % 5 == 0 else 1000 + i, family=family, state=state,
                  src=src, sport=1024 + i, dst=dst, dport=65535 - i, inode=0 if i % 4 == 0 else 5000 + i,
                  uid=i * 1000, raw_id=bytes(48), netns=netns, vitals=vitals, **times)


HEALTH = [None, Health("active", "data received 850 ms ago", "active"),
          Health("dead", 'a "quoted" reason \\ with a backslash', "dead-retransmits"),
          Health("unknown", "tab\there \x7f and é", "no-evidence"),
          Health("quiet", "no data for 12.3 s; the peer answered 5 ms ago", "quiet"),
          Health("orphan", 'only a "quote"', "orphan"), Health("dead", "only a \\ backslash", "x"),
          Health("unknown", "line\nbreak", "x")]
OWNERS = [OwnerSummary(), OwnerSummary((812, 813), ("nginx",), ("/system.slice/nginx.service",)),
          OwnerSummary((1,), ('we"ird\\na\x01me',), ("/kubepods/é/\u2028",)),
          OwnerSummary((4194304,), ("a", "b c"), ())]
ERRORS = [None, "SOCK_DESTROY: Operation not permitted", 'bpf_sock_destroy: "x"\n', "é"]
ACTIONS = ["destroyed", "would-destroy", "failed", "gone", "shutdown", "keepalive-set"]


def items():
    """(verdict, owners summary, outcome or None), deterministic."""
    out = []
    families = [AF_INET, AF_INET6, 99]
    states = [1, 1, 8, 6, 12, 10, 99, 2]
    netnss = [None, "blue", 4026532001, 'na"me']
    idles = [None, 0.0, 6000.0, 1234.5678, 0.0004, 1e-7, 123456789.123456, 2.5]
    sources = [None, "tcp_info", "bpf"]
    exposures = [None, "past", "at-risk", "safe"]
    vitals = [None, FULL, OPEN, PARTIAL]
    for i in range(48):
        times = {} if i % 6 == 0 else {"last_data_recv_ms": i * 997, "last_ack_recv_ms": i * 13,
                                       "last_data_sent_ms": None if i % 3 == 0 else i * 7}
        s = _socket(i, families[i % 3] if i % 11 else 99, states[i % len(states)],
                    netnss[i % 4], vitals[(i // 2) % 4], **times)
        v = Verdict(s, idles[i % len(idles)], sources[i % 3], None if i % 2 else idles[(i + 3) % 8],
                    bool(i % 7), HEALTH[i % len(HEALTH)], exposures[(i // 3) % 4])
        owners = OWNERS[i % len(OWNERS)]
        outcome = None if i % 3 == 0 else Outcome(v, ACTIONS[i % len(ACTIONS)],
                                                  ERRORS[(i // 2) % len(ERRORS)], *owners)
        out.append((v, owners, outcome))
    return out


def rendered() -> str:
    """Audit rows (with owners), then kill rows as report.show writes them in batches."""
    out = io.StringIO()
    data = items()
    report.show([v for v, _, _ in data], True, owners={v.socket.inode: o for v, o, _ in data
                                                        if v.socket.inode}, out=out)
    report.show([v for v, _, _ in data], True, out=out)  # no owners known
    outcomes = [o for _, _, o in data if o is not None]
    for lo in range(0, len(outcomes), 7):
        report.show(outcomes[lo:lo + 7], True, out=out)
    report.show([], True, out=out)
    return out.getvalue()


def test_rows_are_byte_for_byte_those_recorded():
    with open(GOLDEN, encoding="ascii") as f:
        golden = f.read()
    got = rendered()
    assert got.splitlines() == golden.splitlines()
    assert got == golden


def test_what_rows_share_is_kept_within_bounds(monkeypatch):
    # the texts kept for the next rows are forgotten past their limit, never wrong
    from tcpidle import report
    monkeypatch.setattr(report._reasons, "limit", 2)
    monkeypatch.setattr(report._vitals, "limit", 1)
    report._reasons.clear()
    report._vitals.clear()
    with open(GOLDEN, encoding="ascii") as f:
        assert rendered() == f.read()
    assert len(report._reasons) <= 2 and len(report._vitals) <= 1


def test_row_and_json_line_agree_with_the_rows_written():
    # row() (table, event log) is the same object as the JSON line
    for v, o, outcome in items():
        line = report.json_line(v, outcome) if outcome is not None else \
            report.json_line(v, None, {v.socket.inode: o})
        assert report.row(v, outcome, None if outcome else {v.socket.inode: o}) == \
            __import__("json").loads(line)


if __name__ == "__main__":
    sys.stdout.write(rendered())
