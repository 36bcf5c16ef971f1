"""`tcpidle doctor`: what this kernel and this caller allow tcpidle to do.

Owns the list of checks and their order.  `verdict` is the pure part (the
Check record, the exit decision, table and JSON Lines); `checks` asks the
running system, each question by really trying where trying is harmless
(a program load, a map creation, a destroy of a socket of its own in a
private network namespace, pidfd_getfd on a process of its own).
"""

from .verdict import Check, decide, json_lines, table  # noqa: F401

import time
from typing import List, Optional, Sequence

from ..model import DEFAULT_PIN_DIR


def run(namespaces: Optional[Sequence] = None, pin_dir: str = DEFAULT_PIN_DIR,
        probe: bool = True) -> List[Check]:
    """Every check, in the order of the table.

    The forked checks (netlink, pidfd) run before bcc is imported, so the
    children start from a small, thread-free process.  `probe=False` skips
    compiling and attaching the probe (about a second per hook).
    """
    from . import checks

    out: List[Check] = [checks.kernel(), checks.capabilities()]
    out += [checks._timed(checks.pidfd)]
    out += checks.netlink()
    out += checks.btf_checks()
    out += [checks._timed(checks.sk_storage)]
    out += checks.bpffs_and_pins(pin_dir)
    out += checks.bcc_and_headers()
    if probe:
        out += checks.probe_hooks()
    for ns in namespaces or ():
        out.append(checks._timed(lambda ns=ns: checks.namespace(ns)))
    return out


def elapsed_ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000.0
