"""What -v says about the destroy backend: in auto, netlink first and why, and the rest."""

from tcpidle import commands, kdestroy


def test_auto_says_netlink_goes_first_and_why_where_the_iterator_is_available(monkeypatch):
    monkeypatch.setattr(kdestroy, "unavailable", lambda: None)
    text = commands._destroy_note("auto")
    assert text.startswith("netlink SOCK_DESTROY, cookie-checked, re-checked before each batch")
    # why it goes first although the iterator is here (README: "Which backend auto uses")
    assert "first: no program to load, faster unless thousands are destroyed at once" in text
    assert "its rows carry the evidence of health" in text
    assert "--destroy-with bpf decides in the kernel" in text
    assert text.endswith("if the kernel answers EOPNOTSUPP, the BPF iterator (available here), "
                         "then /proc")


def test_auto_without_the_iterator_says_why_not(monkeypatch):
    monkeypatch.setattr(kdestroy, "unavailable", lambda: "no bpf_sock_destroy() kfunc")
    text = commands._destroy_note("auto")
    assert "first:" not in text  # nothing to choose between
    assert "the /proc fallback (the BPF iterator is unavailable: no bpf_sock_destroy() kfunc)" in text


def test_forced_backends_say_they_are_forced(monkeypatch):
    monkeypatch.setattr(kdestroy, "unavailable", lambda: None)
    assert "--destroy-with netlink: nothing else" in commands._destroy_note("netlink")
    assert commands._destroy_note("proc").startswith("the /proc fallback (--use-proc)")
    assert commands._destroy_note("bpf").startswith("the BPF TCP iterator + bpf_sock_destroy")
