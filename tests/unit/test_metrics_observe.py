"""metrics.observe_many: the idle histogram fed once per poll, as observe() would."""

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tcpidle import metrics


def pair():
    out = []
    for _ in range(2):
        r = CollectorRegistry()
        out.append((r, Histogram("tcpidle_idle_seconds", "idle", buckets=metrics.IDLE_BUCKETS,
                                 registry=r)))
    return out


def exposition(registry):
    """The text, without the _created time (each histogram's own)."""
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def test_the_exposition_is_the_one_of_observe_value_by_value():
    rng = random.Random(3)
    (ra, a), (rb, b) = pair()
    bounds = [x for x in metrics.IDLE_BUCKETS if x != float("inf")]
    for _ in range(5):  # polls add up
        values = [rng.choice(bounds) if rng.random() < 0.3 else rng.uniform(0, 200_000)
                  for _ in range(rng.randrange(0, 3000))] + [0.0]
        for v in values:
            a.observe(v)
        metrics.observe_many(b, iter(values))
        assert exposition(ra) == exposition(rb)


def test_another_histogram_layout_falls_back_to_observe(monkeypatch):
    (ra, a), (rb, b) = pair()
    monkeypatch.delattr(b, "_upper_bounds")
    seen = []
    monkeypatch.setattr(b, "observe", seen.append)
    metrics.observe_many(b, iter([1.0, 7.5]))
    assert seen == [1.0, 7.5]
