"""The Grafana dashboard (deploy/grafana/tcpidle.json) asks only for series the tracker exports.

The exported names come from scraping a real /metrics endpoint served by
tcpidle's own Metrics object (prometheus_client, HTTP on loopback), not from a
list: a renamed or removed series, or a typo in a query, fails here.
"""

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpidle.metrics import Metrics
from tcpidle.model import Action

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tcpidle.json"

# PromQL words that are not series names (functions are recognised by their "(").
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"instance", "job", "le"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fed_metrics():
    """Metrics as a tracker would after one poll, with a probe attached."""
    m = Metrics()

    class S:
        inode = 0  # no owner: counted under comm "-"

    class V:  # only the attributes observe_poll reads
        idle_ms = 1500.0
        health = None
        exposure = "at-risk"  # a middlebox policy found it exposed: its gauges have samples
        victim = False
        socket = S()

    class Done:  # likewise
        action = Action.DESTROYED

    m.observe_poll([V()], [Done()], seconds=0.01, wall_time=1.0e9, spared=1)
    m.observe_error(0.02)
    m.observe_probe({"entries": 3, "max_entries": 4096, "evicted": 0})
    return m


@pytest.fixture(scope="module")
def exported():
    """{sample name: set of label names} scraped from a real endpoint."""
    m = _fed_metrics()
    port = _free_port()
    m.serve(port)
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
            text = r.read().decode()
    finally:
        m.close()
    names = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _targets(dash):
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield panel["title"], t["expr"]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            yield "variable " + var["name"], q["query"]


def series_in(expr):
    """Series names a PromQL expression reads, and the label names it uses.

    Returns (names, labels).  Strings, range/offset brackets and Grafana's $variables
    are removed first; label names come from `{...}` matchers and by/without/on/
    ignoring/group_* lists; any other identifier not followed by "(" is a series.
    """
    labels = set()
    # Grafana's label_values(series, label) in template variables.
    lv = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", expr)
    if lv:
        names, labels = series_in(lv.group(1))
        return names, labels | {lv.group(2)}
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    for body in re.findall(r"\{([^}]*)\}", s):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    s = re.sub(r"\{[^}]*\}", " ", s)
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        labels.update(re.findall(r"[A-Za-z_]\w*", body))
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if word.lower() in KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names, labels


def test_series_in_parses_promql():
    names, labels = series_in(
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{x=~"$v",y="1"}[5m]))) '
        '/ on(instance) b_total + time() - 1e3')
    assert names == {"a_bucket", "b_total"}
    assert labels == {"le", "instance", "x", "y"}
    assert series_in("label_values(c_seen, instance)") == ({"c_seen"}, {"instance"})


def test_dashboard_is_valid_json_with_queries():
    dash = json.loads(DASHBOARD.read_text())
    targets = list(_targets(dash))
    assert len(targets) >= 12
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_reads_only_exported_series(exported):
    dash = json.loads(DASHBOARD.read_text())
    for title, expr in _targets(dash):
        names, labels = series_in(expr)
        assert names, "%s: no series in %r" % (title, expr)
        for name in names:
            assert name in exported, "%s: %s is not exported (query %r)" % (title, name, expr)
        known = set(TARGET_LABELS)
        for name in names:
            known |= exported[name]
        assert labels <= known, "%s: unknown labels %s in %r" % (title, labels - known, expr)


def test_dashboard_covers_the_tracker_series(exported):
    """Every tcpidle_* series the tracker exports is on the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for _, expr in _targets(dash):
        used |= series_in(expr)[0]
    families = {re.sub(r"_(bucket|sum|count|created|total)$", "", n) for n in used}
    for name in exported:
        if not name.startswith("tcpidle_") or name.endswith("_created"):
            continue
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert base in families, "%s is exported but not on the dashboard" % name
