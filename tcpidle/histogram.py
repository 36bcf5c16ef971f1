"""Power-of-two histograms in the bcc tools' convention (pure).

bcc's tools count a value v in slot bpf_log2l(v) = floor(log2 v) + 1 (v = 0
counts in slot 1 too) and print slots 1.. as "low -> high : count |stars|"
(bcc's table.print_log2_hist).  tcpidle prints idle times the same way, so
`audit --hist` reads like `tcplife`/`tcprtt` histograms.
"""

from __future__ import annotations

from typing import Iterable, List

STARS = 40


def slot(value: int) -> int:
    """bcc's bpf_log2l(): the bit length of value, at least 1."""
    return max(1, int(value).bit_length())


def log2_counts(values: Iterable[float]) -> List[int]:
    """Counts per slot (index = slot; index 0 unused, as in bcc), values truncated to integers."""
    counts = [0] * 65
    top = 0
    for v in values:
        i = slot(int(v))
        counts[i] += 1
        top = max(top, i)
    return counts[:top + 1] if top else []


def _stars(val: int, val_max: int, width: int) -> str:
    n = min(width, val * width // val_max) if val_max else 0  # floor, as bcc's loop
    return "*" * n


def format_log2(counts: List[int], val_type: str = "msecs") -> List[str]:
    """The lines bcc's print_log2_hist prints for these slot counts (nothing when all are 0)."""
    idx_max = max((i for i, c in enumerate(counts) if c > 0), default=-1)
    if idx_max <= 0:
        return []
    val_max = max(counts)
    if idx_max <= 32:
        header, body, width = "     %-19s : count     distribution", "%10d -> %-10d : %-8d |%-*s|", STARS
    else:
        header, body, width = ("               %-29s : count     distribution",
                               "%20d -> %-20d : %-8d |%-*s|", STARS // 2)
    lines = [header % val_type]
    for i in range(1, idx_max + 1):
        low, high = (1 << i) >> 1, (1 << i) - 1
        if low == high:
            low -= 1
        lines.append(body % (low, high, counts[i], width, _stars(counts[i], val_max, width)))
    return lines


def buckets(counts: List[int]) -> List[dict]:
    """The slots as JSON-ready objects: low, high (inclusive, same bounds as printed), count."""
    out = []
    for i in range(1, len(counts)):
        low, high = (1 << i) >> 1, (1 << i) - 1
        if low == high:
            low -= 1
        out.append({"low": low, "high": high, "count": counts[i]})
    return out
