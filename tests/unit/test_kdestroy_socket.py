"""kdestroy.socket_of's fast path (the frozen dataclass's __dict__ filled at once) makes
the very Socket its __init__ would: same fields, ==, hash and repr."""

import socket

import pytest

from tcpidle import kdestroy
from tcpidle.model import AF_INET, AF_INET6
from tcpidle.probe import iterdestroy as it

V6 = socket.inet_pton(AF_INET6, "fd00:231::1")
V4 = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])


@pytest.mark.parametrize("fields,label", [
    ((2 ** 33 + 7, AF_INET6, 1, 0, 1, 0, 40000, 443, 250, V6, V6, 1000, 77, 0, 0), "ns1"),
    ((1, AF_INET, 6, 4, 0, 0, 1, 2, 0, V4, V4, 0, 0, 0, 0), None),
    ((2 ** 64 - 1, AF_INET, 8, 2, 1, 0, 65535, 0, 3, V4, V4, 2 ** 32 - 1, 2 ** 63, 5, 7), 4026531840),
])
def test_the_fast_path_makes_what_the_init_makes(monkeypatch, fields, label):
    rec, = it.decode_records(it.REC.pack(*fields))
    assert kdestroy._FAST_FILL  # model.Socket is what the fast path expects
    fast = kdestroy.socket_of(rec, label, 250)
    monkeypatch.setattr(kdestroy, "_FAST_FILL", False)
    slow = kdestroy.socket_of(rec, label, 250)
    assert type(fast) is type(slow)
    assert fast.__dict__ == slow.__dict__ and list(fast.__dict__) == list(slow.__dict__)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
