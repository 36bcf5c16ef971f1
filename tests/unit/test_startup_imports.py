"""Start-up: what a kill loads that it does not need is kept out (bench/bench_imports.py
measures the time; this says which modules), and the cheaper paths give the same answers."""

import hashlib
import json
import subprocess
import sys

# What the in-kernel destroy's start-up touches before its first syscall: the
# cache's names and keys, no compiler-side module (loader: bcc, ctypes.util,
# subprocess) and no OpenSSL binding (hashlib).
_BPF_PATH = """
import json, sys
from tcpidle import kdestroy
from tcpidle.probe import iterdestroy, iterprog
iterprog.source_path()
iterprog.program_key(b"x", {"OFF_A": 1})
print(json.dumps(sorted(sys.modules)))
"""


def _modules(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_the_bpf_destroy_path_imports_no_loader_and_no_openssl():
    mods = _modules(_BPF_PATH)
    assert "tcpidle.probe.iterprog" in mods
    assert not {"tcpidle.probe.loader", "bcc", "_hashlib", "hashlib", "gzip", "subprocess"} & mods


def test_the_program_key_is_the_sha256_it_always_was():
    from tcpidle.probe import iterprog

    offsets = {"OFF_B": 8, "OFF_A": 4}
    h = hashlib.sha256(b"int x;")
    h.update(json.dumps(sorted(offsets.items())).encode())
    h.update(b"format %d" % iterprog.FORMAT)
    assert iterprog.program_key(b"int x;", offsets) == h.hexdigest()[:24]


def test_the_program_source_is_beside_the_probe_source():
    import os

    from tcpidle.probe import iterprog, loader

    assert iterprog.source_path() == os.path.join(os.path.dirname(loader.bpf_source()),
                                                  iterprog.SOURCE)
    assert os.path.exists(iterprog.source_path())
