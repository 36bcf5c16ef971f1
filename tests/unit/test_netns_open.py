"""A namespace listed while `ip netns add`/`delete` runs is gone, not a failed poll (no root)."""

import os

import pytest

from tcpidle import model, netns, scope


def _half_made(tmp_path):
    # What /run/netns/NAME is between `ip netns add` creating it and bind-mounting
    # the namespace on it: a plain file, which setns() refuses with EINVAL.
    path = tmp_path / "half-made"
    path.write_text("")
    return netns.Netns(str(path), os.stat(path).st_ino, "half-made")


def test_entering_a_path_that_was_a_plain_file_is_gone(tmp_path):
    fd = netns.open_fd(_half_made(tmp_path))
    try:
        with pytest.raises(netns.NetnsGone, match="no namespace when listed"):
            with netns.entered_fd(fd):
                pass
    finally:
        os.close(fd)


def test_our_own_namespace_is_entered(tmp_path):
    fd = netns.open_fd(netns.Netns("/proc/self/ns/net", os.stat("/proc/self/ns/net").st_ino, None))
    try:
        with netns.entered_fd(fd):
            pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("named", [True, False])
def test_the_scope_skips_it(tmp_path, named):
    ns = _half_made(tmp_path)
    listing = netns.Listing([ns], named=named)  # --netns half-made, or --all-netns
    sc = scope.Scope(model.Selector(), namespaces=lambda: listing)
    fds = scope.NamespaceFds()
    try:
        assert list(sc._each_namespace(fds)) == []
    finally:
        fds.close()
    assert bool(fds.missing) == named
    if named:
        assert "half-made is gone (its path was no namespace when listed)" in fds.missing[0]
