"""model.fills_directly / filled: the fast records equal their __init__'s."""

from dataclasses import dataclass

from tcpidle.evidence import _ACTIVITY_FIELDS, _activity
from tcpidle.model import Activity, filled, fills_directly


@dataclass(frozen=True)
class Pair:
    a: int
    b: int = 0


def test_a_filled_record_is_the_one_init_makes():
    assert fills_directly(Pair, ("a", "b"))
    p = filled(Pair, {"a": 1, "b": 2})
    assert p == Pair(1, 2) and hash(p) == hash(Pair(1, 2)) and repr(p) == repr(Pair(1, 2))


def test_another_field_set_refuses():
    assert not fills_directly(Pair, ("a",))
    assert not fills_directly(Pair, ("a", "b", "c"))


def test_post_init_or_slots_refuse():
    @dataclass(frozen=True)
    class Checked:
        a: int

        def __post_init__(self):
            pass

    @dataclass(frozen=True)
    class Slotted:
        __slots__ = ("a",)
        a: int

    assert not fills_directly(Checked, ("a",))
    assert not fills_directly(Slotted, ("a",))


def test_the_probes_activity_is_filled_directly():
    assert fills_directly(Activity, _ACTIVITY_FIELDS)
    assert _activity(7, 1, 2, 3, 4, 5) == Activity(7, 1, 2, 3, 4, 5)
