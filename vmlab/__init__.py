"""The kernel lab: tcpidle's kernel tier on Debian's own kernels under QEMU.

`scripts/lab` (and `scripts/setup lab`) run `python -m vmlab`.  Modules, one job each:

- kernels.py  fetch a Debian kernel series (image, modules, headers) into a cache
              with a private apt configuration, ready for virtme-ng;
- vm.py       boot one kernel with virtme-ng (`vng`) and run a command inside;
- guest.sh    what runs inside the VM: bpffs, lo, fd limit, then pytest;
- results.py  turn pytest's JUnit XML into counts and lab facts (pure);
- __main__.py the command line: which kernels, what to run, one summary line each.

The development machine's root file system is the guest's root (virtme-ng
exports it read-write over 9p), so the guest runs this very checkout and its
.venv.  Nothing here changes the host's apt configuration or its /lib/modules.
"""
