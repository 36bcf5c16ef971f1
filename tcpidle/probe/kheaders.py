"""Finding a kernel header tree that bcc can compile the probe against.

Owns one question: "which directory does bcc use as its kernel tree, and do we
have to tell it (BCC_KERNEL_SOURCE)?".  bcc (src/cc/frontends/clang/loader.cc)
looks at $BCC_KERNEL_SOURCE, else /lib/modules/$(uname -r)/build (with a
`source` sibling for split trees), else /sys/kernel/kheaders.tar.xz.  It
changes directory into that tree and compiles with *relative* include paths
(kbuild_helper.cc, for the non-split case that BCC_KERNEL_SOURCE selects):

    -Iarch/<arch>/include -Iarch/<arch>/include/generated -Iinclude
    -Iarch/<arch>/include/uapi -Iarch/<arch>/include/generated/uapi
    -Iinclude/uapi -Iinclude/generated/uapi -include ./include/linux/kconfig.h

so one directory must hold both the generic headers and the generated ones
(autoconf.h, asm/ wrappers), and bcc only accepts it when
include/linux/kconfig.h is a regular file.

Kernels that run without their own headers (a custom or newer kernel on a
distribution) are handled by adapting an installed distribution tree.  The
probe reads no kernel struct layout, so headers of another kernel version
compile it correctly.  Debian splits a tree in two: linux-headers-X-common
(include/, arch/*/include/{asm,uapi}) and linux-headers-X-<flavour>
(include/generated, include/config, arch/<arch>/include/generated, .config, and
a Makefile that says `include .../linux-headers-X-common/Makefile`).  We merge
the two into one tree of symlinks in a cache directory and hand it to bcc via
BCC_KERNEL_SOURCE; no system file is changed.  Nothing here imports bcc.

The cache is trusted only if no one else could have written to it
(`trusted_cache_dir`): root compiles the headers found there into a program
it loads into the kernel, so a tree another user planted would choose that
program's code.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..errors import RuntimeFailure

KCONFIG_H = "include/linux/kconfig.h"
AUTOCONF_H = "include/generated/autoconf.h"
STAMP = ".tcpidle-layers"


class HeadersNotFound(RuntimeFailure):
    """No kernel header tree usable by bcc was found."""


class UntrustedCache(HeadersNotFound):
    """The cache directory (or what is in it) could have been written by another user."""


@dataclass(frozen=True)
class HeaderTree:
    """The tree bcc will compile against.

    `env` is the value to put in BCC_KERNEL_SOURCE, or None when bcc finds the
    tree on its own.  `source` says in words which tree it is.
    """

    path: str
    source: str
    env: Optional[str]


@dataclass(frozen=True)
class Candidate:
    """An installed header package (pair) found under /usr/src."""

    release: str  # the kernel release the headers were built for
    build: str  # directory with include/generated (the "objtree")
    common: str  # directory with include/linux (the "srctree"); == build if complete

    @property
    def complete(self) -> bool:
        return self.build == self.common


def kernel_arch(machine: Optional[str] = None) -> str:
    """The kernel's name for the architecture, as bcc derives it from uname -m."""
    m = machine or platform.machine()
    if m.startswith("x86_64") or re.match(r"i.86", m):
        return "x86"
    if m.startswith(("aarch64", "arm64")):
        return "arm64"
    for prefix, arch in (("arm", "arm"), ("s390x", "s390"), ("ppc", "powerpc"),
                         ("mips", "mips"), ("riscv", "riscv"), ("loongarch", "loongarch")):
        if m.startswith(prefix):
            return arch
    return m


def default_cache_dir() -> str:
    """$TCPIDLE_CACHE_DIR, else $XDG_CACHE_HOME/tcpidle, else /var/cache/tcpidle."""
    explicit = os.environ.get("TCPIDLE_CACHE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "tcpidle")
    return "/var/cache/tcpidle"


def _trusted_owners():
    return {0, os.geteuid()}


def check_trusted(path: str, what: str) -> None:
    """UntrustedCache unless path (not followed if a symlink) belongs to root
    or to us and no one else can write to it."""
    st = os.lstat(path)
    if st.st_uid not in _trusted_owners():
        raise UntrustedCache("%s %s belongs to uid %d: not trusted (remove it, or set "
                             "TCPIDLE_CACHE_DIR to a directory of your own)"
                             % (what, path, st.st_uid))
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        raise UntrustedCache("%s %s is writable by other users (mode %o): not trusted "
                             "(chmod 700 it, or set TCPIDLE_CACHE_DIR)"
                             % (what, path, stat.S_IMODE(st.st_mode)))


def trusted_cache_dir(path: Optional[str] = None) -> str:
    """The cache directory (default_cache_dir()), created root-only if missing.

    UntrustedCache if it, or any directory above it, could have been
    written by another user: it must belong to root or to us and be
    writable by no one else; a directory above it may be writable by
    others only with the sticky bit (as /tmp), where they cannot rename
    what is ours.
    """
    path = os.path.abspath(path or default_cache_dir())
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise HeadersNotFound("header cache %s: %s" % (path, e.strerror or e)) from None
    real = os.path.realpath(path)
    check_trusted(real, "header cache")
    parent = os.path.dirname(real)
    while True:
        st = os.stat(parent)
        if st.st_uid not in _trusted_owners() or (
                st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise UntrustedCache("header cache %s: %s could be changed by other users (uid %d, "
                                 "mode %o): not trusted (set TCPIDLE_CACHE_DIR)"
                                 % (path, parent, st.st_uid, stat.S_IMODE(st.st_mode)))
        if parent == "/":
            return real
        parent = os.path.dirname(parent)


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


def version_key(release: str) -> Tuple[int, ...]:
    """(6, 1, 0, 56) for "6.1.0-56-amd64": numbers in order, for sorting."""
    return tuple(int(n) for n in re.findall(r"\d+", release))


def _release_of(build: str) -> str:
    """UTS_RELEASE from the generated header, else the directory name."""
    try:
        with open(os.path.join(build, "include/generated/utsrelease.h")) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    name = os.path.basename(build.rstrip("/"))
    return name[len("linux-headers-"):] if name.startswith("linux-headers-") else name


def _common_of(build: str) -> Optional[str]:
    """The srctree a Debian-style objtree builds on.

    Debian's flavour Makefile is one line, `include <common>/Makefile`; failing
    that, guess the sibling whose name ends in -common instead of the flavour.
    """
    try:
        with open(os.path.join(build, "Makefile")) as f:
            for line in f:
                m = re.match(r"\s*include\s+(\S+)/Makefile\s*$", line)
                if m:
                    return os.path.normpath(os.path.join(build, m.group(1)))
    except OSError:
        pass
    base = build.rstrip("/")
    if "-" in os.path.basename(base):
        guess = base.rsplit("-", 1)[0] + "-common"
        if os.path.isdir(guess):
            return guess
    return None


def find_candidates(src_root: str = "/usr/src", arch: Optional[str] = None) -> List[Candidate]:
    """Installed header trees under src_root that contain generated headers for arch."""
    arch = arch or kernel_arch()
    out = []
    dirs = []
    # Debian/Ubuntu: /usr/src/linux-headers-*; Fedora/RHEL: /usr/src/kernels/*.
    for root in (src_root, os.path.join(src_root, "kernels")):
        try:
            dirs += [os.path.join(root, n) for n in sorted(os.listdir(root))]
        except OSError:
            pass
    for build in dirs:
        if not _is_file(os.path.join(build, AUTOCONF_H)):
            continue  # a srctree only (e.g. -common): used through its objtree
        if not os.path.isdir(os.path.join(build, "arch", arch, "include", "generated")):
            continue  # built for another architecture
        if _is_file(os.path.join(build, KCONFIG_H)):
            common = build
        else:
            common = _common_of(build)
            if not common or not _is_file(os.path.join(common, KCONFIG_H)):
                continue
        out.append(Candidate(_release_of(build), build, common))
    return out


def rank(candidates: Sequence[Candidate], running: str) -> List[Candidate]:
    """Best first: the running release, then same major.minor, then newest."""
    run_key = version_key(running)

    def key(c: Candidate):
        k = version_key(c.release)
        return (c.release == running, k[:2] == run_key[:2], k)

    return sorted(candidates, key=key, reverse=True)


def _overlay(dest: str, layers: Sequence[str], merge: Sequence[str], rel: str = "") -> None:
    """Fill dest with symlinks so that it shows the union of layers.

    A name present in one layer is a symlink to it; a directory present in
    several layers whose relative path is in `merge` becomes a real directory
    filled recursively; any other clash goes to the last layer (the objtree).
    """
    names = {}
    for layer in layers:
        here = os.path.join(layer, rel)
        try:
            entries = os.listdir(here)
        except OSError:
            continue
        for e in entries:
            names.setdefault(e, []).append(os.path.join(here, e))
    for e, paths in sorted(names.items()):
        sub = os.path.join(rel, e) if rel else e
        target = os.path.join(dest, sub)
        if len(paths) > 1 and sub in merge and all(os.path.isdir(p) for p in paths):
            os.mkdir(target)
            _overlay(dest, layers, merge, sub)
        else:
            os.symlink(os.path.realpath(paths[-1]), target)


def _usable(tree: str, arch: str) -> bool:
    return (_is_file(os.path.join(tree, KCONFIG_H))
            and _is_file(os.path.join(tree, AUTOCONF_H))
            and os.path.isdir(os.path.join(tree, "arch", arch, "include", "generated")))


def merged_tree(cand: Candidate, cache_dir: str, arch: Optional[str] = None) -> str:
    """Return a directory bcc accepts for cand, building it in cache_dir if needed.

    The result is cache_dir/kheaders-<release>; it is rebuilt when it is not
    usable (dangling links after a package upgrade) or was built from other
    layers.  Built in a temporary directory and renamed into place, so a
    concurrent tcpidle never sees a half-made tree.
    """
    arch = arch or kernel_arch()
    if cand.complete:
        return cand.build
    layers = [os.path.realpath(cand.common), os.path.realpath(cand.build)]
    stamp_text = "\n".join(layers) + "\n"
    cache_dir = trusted_cache_dir(cache_dir)
    dest = os.path.join(cache_dir, "kheaders-%s" % cand.release)
    try:
        check_trusted(dest, "header tree")
        check_trusted(os.path.join(dest, STAMP), "header tree stamp")
        with open(os.path.join(dest, STAMP)) as f:
            if f.read() == stamp_text and _usable(dest, arch):
                return dest
    except OSError:
        pass
    tmp = tempfile.mkdtemp(prefix=".kheaders-", dir=cache_dir)
    try:
        os.chmod(tmp, 0o755)
        merge = ["include", "arch", "arch/" + arch, "arch/%s/include" % arch]
        _overlay(tmp, layers, merge)
        with open(os.path.join(tmp, STAMP), "w") as f:
            f.write(stamp_text)
        if not _usable(tmp, arch):
            raise HeadersNotFound("merging %s and %s gave no usable tree" % tuple(layers))
        if os.path.lexists(dest):
            # A stale tree: links only, rmtree does not follow them.
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _usable(dest, arch):  # lost a race to another tcpidle? use theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def find_headers(release: Optional[str] = None, cache_dir: Optional[str] = None,
                 src_root: str = "/usr/src", modules_root: str = "/lib/modules",
                 environ=None) -> HeaderTree:
    """Pick the header tree for bcc, in bcc's own order, then our adaptation.

    1. $BCC_KERNEL_SOURCE set by the user: respected when usable.
    2. /lib/modules/<release>/build (and source): bcc finds it itself.
    3. /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS): bcc extracts it itself.
    4. An installed /usr/src tree, merged into the cache when split.
    """
    environ = os.environ if environ is None else environ
    release = release or os.uname().release
    arch = kernel_arch()
    user = environ.get("BCC_KERNEL_SOURCE")
    if user and _is_file(os.path.join(user, KCONFIG_H)):
        return HeaderTree(user, "BCC_KERNEL_SOURCE=%s" % user, user)
    kdir = os.path.join(modules_root, release)
    build = os.path.join(kdir, "build")
    source = os.path.join(kdir, "source")
    if os.path.isdir(build) and os.path.isdir(source):
        if _is_file(os.path.join(source, KCONFIG_H)):
            return HeaderTree(os.path.realpath(build), build, None)
    elif _is_file(os.path.join(build, KCONFIG_H)):
        return HeaderTree(os.path.realpath(build), build, None)
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return HeaderTree("/sys/kernel/kheaders.tar.xz", "/sys/kernel/kheaders.tar.xz", None)
    ranked = rank(find_candidates(src_root, arch), release)
    if not ranked:
        raise HeadersNotFound(
            "no kernel headers: %s is missing and %s holds no linux-headers tree for %s"
            % (build, src_root, arch))
    cand = ranked[0]
    path = merged_tree(cand, cache_dir or default_cache_dir(), arch)
    if cand.complete:
        what = cand.build
    else:
        what = "%s + %s (merged in %s)" % (cand.common, cand.build, path)
    if cand.release != release:
        what += "; headers of %s for running %s" % (cand.release, release)
    return HeaderTree(path, what, path)
