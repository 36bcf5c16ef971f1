"""tcpidle doctor's pure parts: the exit decision, the table, JSON Lines, the BTF blob, reasons."""

import json

import pytest

from tcpidle.probe import btf
from tcpidle.doctor import Check, decide, json_lines, table
from tcpidle.doctor import checks


def C(name, status, detail="d", **kw):
    return Check(name, status, detail, **kw)


def test_destroy_works_exit_0():
    code, why = decide([C("sock_destroy", "ok"), C("pidfd_getfd", "no", "EPERM")])
    assert code == 0 and "SOCK_DESTROY" in why


def test_only_the_fallback_exit_0_with_the_reason():
    code, why = decide([C("sock_destroy", "no", "EOPNOTSUPP"), C("pidfd_getfd", "ok")])
    assert code == 0
    assert "EOPNOTSUPP" in why and "falls back to /proc" in why


def test_nothing_destroys_exit_1_with_both_reasons():
    code, why = decide([C("sock_destroy", "no", "the kernel answered EOPNOTSUPP"),
                        C("pidfd_getfd", "no", "refused: EPERM")])
    assert code == 1
    assert "cannot destroy" in why and "EOPNOTSUPP" in why and "EPERM" in why


def test_a_half_working_destroy_is_not_the_main_path():
    """warn (e.g. a wrong cookie not refused) does not count as working."""
    assert decide([C("sock_destroy", "warn"), C("pidfd_getfd", "no")])[0] == 1


def test_other_namespaces_do_not_decide():
    checks_ = [C("sock_destroy", "ok", netns="blue"), C("pidfd_getfd", "no")]
    assert decide(checks_)[0] == 1
    assert decide([])[0] == 1


def test_status_words_are_checked():
    with pytest.raises(ValueError):
        Check("x", "fine", "d")


def test_table_aligns_and_labels_namespaces():
    rows = table([C("kernel", "info", "6.18", title="kernel"),
                  C("netns", "ok", "dumped 3", title="INET_DIAG dump", netns="blue", ms=12.0)])
    assert rows[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert rows[2].startswith("INET_DIAG dump [blue]")
    assert rows[2].endswith("dumped 3 (12 ms)")
    assert rows[0].index("STATUS") == rows[1].index("info") == rows[2].index("ok ")
    assert "(0 ms)" not in table([C("a", "ok", ms=0.2)])[1]  # sub-ms timings are noise


def test_json_lines_one_object_per_check():
    out = [json.loads(s) for s in json_lines([C("a", "ok", ms=1.234), C("b", "no", netns="x")])]
    assert out[0] == {"name": "a", "status": "ok", "detail": "d", "title": "", "netns": None,
                      "ms": 1.2}
    assert out[1]["netns"] == "x" and out[1]["ms"] is None


def test_int_btf_is_well_formed():
    """The blob loaded before creating the SK_STORAGE map parses as one 32-bit int."""
    b = btf.BTF(checks.int_btf())
    assert len(b._pos) == 2
    name_off, kind, vlen, size, _kf, _pos = b._rec(1)
    assert (kind, vlen, size) == (btf.INT, 0, 4)
    assert b._str(name_off) == "int"


def test_attach_reason_is_said_for_the_hook(monkeypatch):
    monkeypatch.setattr(checks.os, "geteuid", lambda: 0)
    msg = "no BPF hook could attach (fentry: load refused: Operation not permitted)"
    assert checks.attach_reason("fentry", msg) == \
        "load refused: Operation not permitted: this kernel refuses BPF trampolines"
    assert checks.attach_reason("tracepoint", "BPF hook tracepoint unavailable: x") == \
        "BPF hook tracepoint unavailable: x"


def test_capabilities_from_status(tmp_path):
    p = tmp_path / "status"
    p.write_text("Name:\tx\nCapEff:\t%016x\n" % (1 << 12))
    c = checks.capabilities(str(p))
    assert c.status == "warn" and "has NET_ADMIN" in c.detail and "lacks" in c.detail
    p.write_text("CapEff:\t0000000000000000\n")
    assert checks.capabilities(str(p)).status == "no"
    p.write_text("CapEff:\t000001ffffffffff\n")
    assert checks.capabilities(str(p)).status == "ok"
