"""bpfsys: the one bpf(2) wrapper (its number table, its error convention)."""

import errno

import pytest

from tcpidle.probe import bpfsys


@pytest.mark.parametrize("machine,nr", [("x86_64", 321), ("aarch64", 280), ("s390x", 351),
                                        ("ppc64le", 361), ("armv7l", 386), ("i686", 357)])
def test_the_number_of_each_machine(machine, nr):
    assert bpfsys.syscall_number(machine) == nr


def test_an_unknown_machine_is_enosys():
    with pytest.raises(OSError) as e:
        bpfsys.syscall_number("vax")
    assert e.value.errno == errno.ENOSYS and "vax" in str(e.value)


@pytest.mark.parametrize("attr", [bytes(16), bytearray(16)])
def test_a_refused_call_raises_the_kernels_errno(attr):
    # no such command: EINVAL (or EPERM where bpf(2) is closed to this user)
    with pytest.raises(OSError) as e:
        bpfsys.bpf(9999, attr)
    assert e.value.errno in (errno.EINVAL, errno.EPERM)
