"""The probe's per-socket record is written three times; they must agree.

bpf/tcpidle.bpf.c writes `struct tcpidle_activity`, bpf/iterdestroy.bpf.c
reads it as `struct activity` (from the probe's sk_storage), and
probe/maps.VALUE (with evidence._ACTIVITY_FIELDS) decodes it in Python.  A
drift would otherwise show only in the kernel tests, as wrong idle times.
"""

import os
import re

from tcpidle.evidence import _ACTIVITY_FIELDS
from tcpidle.probe import maps

BPF = os.path.join(os.path.dirname(__file__), "..", "..", "bpf")


def struct_fields(source: str, name: str):
    with open(os.path.join(BPF, source)) as f:
        text = f.read()
    body = re.search(r"struct %s \{(.*?)\};" % name, text, re.S)
    assert body, "no struct %s in %s" % (name, source)
    return [tuple(m.groups()) for m in re.finditer(r"(\w+)\s+(\w+);", body.group(1))]


def test_both_programs_spell_the_record_the_same():
    probe = struct_fields("tcpidle.bpf.c", "tcpidle_activity")
    assert probe == struct_fields("iterdestroy.bpf.c", "activity")
    assert probe == [("u64", "last_segment_ns"), ("u64", "last_data_ns"), ("u64", "segments"),
                     ("u64", "data_segments"), ("u64", "bytes")]


def test_python_decodes_that_record():
    fields = struct_fields("tcpidle.bpf.c", "tcpidle_activity")
    assert maps.VALUE.format == "=%dQ" % len(fields) and maps.VALUE.size == 8 * len(fields)
    assert list(_ACTIVITY_FIELDS[1:]) == [name for _, name in fields]  # after the cookie
