"""What a lab run found: counts and lab facts from pytest's JUnit XML (pure).

Tests publish facts about the kernel they ran on with pytest's
`record_property("lab_<name>", value)` (for example `lab_hook`, the hook the
probe attached by itself); they arrive here from the JUnit file the guest
wrote, so no run has to be parsed from console output.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class Results:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: List[str] = field(default_factory=list)
    facts: Dict[str, str] = field(default_factory=dict)
    skips: Dict[str, str] = field(default_factory=dict)

    def counts(self) -> str:
        return "%d passed, %d failed, %d skipped" % (self.passed, self.failed, self.skipped)


def parse_junit(text: str) -> Results:
    """Counts, failed test ids, skip reasons and lab_* properties of a JUnit XML report."""
    root = ET.fromstring(text)
    r = Results()
    for suite in root.iter("testsuite"):
        try:
            r.seconds += float(suite.get("time", "0"))
        except ValueError:
            pass
    for case in root.iter("testcase"):
        name = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
        if case.find("failure") is not None or case.find("error") is not None:
            r.failed += 1
            r.failures.append(name)
        elif case.find("skipped") is not None:
            r.skipped += 1
            r.skips[name] = case.find("skipped").get("message", "")
        else:
            r.passed += 1
        for prop in case.iter("property"):
            key = prop.get("name", "")
            if key.startswith("lab_"):
                r.facts[key[4:]] = prop.get("value", "")
    return r


def parse_env(text: str) -> Dict[str, str]:
    """The key=value lines guest.sh writes about the guest."""
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def duration(seconds: float) -> str:
    """'1m05s' (pure)."""
    s = int(round(seconds))
    return "%dm%02ds" % (s // 60, s % 60)
