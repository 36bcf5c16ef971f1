"""Debian kernels for the lab: fetched with a private apt configuration, cached.

Owns one question: "where is a bootable tree of Debian kernel series S?".
A tree is what `apt-get download` + `dpkg-deb -x` make of three packages of
one release -- linux-image-R, linux-headers-R, linux-headers-<common> -- laid
out as the packages install them (boot/, [usr/]lib/modules/R, usr/src/), so
that virtme-ng finds the modules next to the image and the `build`/`source`
links of the modules directory reach the headers (both links are relative
in Debian's packages; absolute ones are rewritten to stay inside the tree).

Made ready for virtme-ng, which packs the modules it needs to mount its root
(9p, virtio) into an initramfs and loads them with busybox's insmod: busybox
cannot load compressed modules (6.12's are .ko.xz), so every module is
decompressed and `depmod` run on the tree.

The apt configuration is private (sources list, lists and archives under the
cache; status /dev/null): the host's own apt set-up is neither read for
sources nor changed.  A tree once made is used again without any network
(`refresh=True` asks apt for the newest release of the series again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Not under /var/cache: virtme-ng hides /var/cache (and /tmp, /var/tmp,
# /var/log) behind tmpfs in the guest, which must see the kernel's modules
# and headers and write its results where the host reads them.
DEFAULT_CACHE = "/var/lib/tcpidle-lab"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


class LabError(Exception):
    """Something the lab cannot do; the message is one line for the user."""


@dataclass(frozen=True)
class Series:
    name: str  # "6.1"
    suite: str  # Debian suite whose linux-image-amd64 is this series
    flavour: str = "amd64"

    def sources_list(self) -> str:
        line = "deb [signed-by=%s] %s %s main\n"
        return (line % (KEYRING, MIRROR, self.suite)
                + line % (KEYRING, SECURITY, self.suite + "-security"))


SERIES: Dict[str, Series] = {
    "5.10": Series("5.10", "bullseye"),
    "6.1": Series("6.1", "bookworm"),
    "6.12": Series("6.12", "trixie"),
}


@dataclass(frozen=True)
class KernelTree:
    """A kernel ready to boot: image, modules and headers under `root`."""

    series: str
    release: str  # uname -r, e.g. "6.1.0-57-amd64"
    version: str  # the Debian package version, e.g. "6.1.192-3"
    root: str

    @property
    def image(self) -> str:
        return os.path.join(self.root, "boot", "vmlinuz-" + self.release)

    @property
    def moddir(self) -> str:
        for d in ("lib/modules", "usr/lib/modules"):
            p = os.path.join(self.root, d, self.release)
            if os.path.isdir(p):
                return p
        return os.path.join(self.root, "lib/modules", self.release)

    @property
    def headers(self) -> str:
        """The headers' objtree, the target of the modules directory's `build` link."""
        return os.path.join(self.root, "usr/src", "linux-headers-" + self.release)


def _depends(show_text: str) -> List[str]:
    """Package names in the first Depends: line of `apt-cache show` output."""
    for line in show_text.splitlines():
        if line.startswith("Depends:"):
            names = []
            for alt in line[len("Depends:"):].split(","):
                first = alt.split("|")[0].strip()
                names.append(first.split()[0])
            return names
    return []


def image_package(depends: Sequence[str], flavour: str = "amd64") -> Optional[str]:
    """linux-image-R-<flavour> among a metapackage's dependencies (pure)."""
    # 6.1.0-57-amd64, 6.12.118+deb13-amd64; not 6.1.0-57-cloud-amd64
    pat = re.compile(r"^linux-image-(\d[\w.+~]*(?:-\d+)?-%s)(-unsigned)?$" % re.escape(flavour))
    for name in depends:
        m = pat.match(name)
        if m:
            return "linux-image-" + m.group(1)
    return None


def common_headers_package(depends: Sequence[str]) -> Optional[str]:
    """linux-headers-X-common among linux-headers-R's dependencies (pure)."""
    for name in depends:
        if name.startswith("linux-headers-") and name.endswith("-common"):
            return name
    return None


class Apt:
    """apt-get/apt-cache with a private configuration under `state`."""

    def __init__(self, series: Series, state: str, run=subprocess.run):
        self.series = series
        self.state = state
        self._run = run

    def _opts(self) -> List[str]:
        s = self.state
        return ["-o", "Dir::Etc::SourceList=%s/sources.list" % s,
                "-o", "Dir::Etc::SourceParts=%s/sources.list.d" % s,
                "-o", "Dir::State::Lists=%s/lists" % s,
                "-o", "Dir::Cache=%s/cache" % s,
                "-o", "Dir::State::status=/dev/null",
                "-o", "Debug::NoLocking=1",
                "-o", "APT::Sandbox::User=root",
                "-q"]

    def _call(self, tool: str, *args: str, cwd: Optional[str] = None) -> str:
        try:
            p = self._run([tool] + self._opts() + list(args), cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise LabError("%s not found (the lab needs Debian's apt)" % tool) from None
        if p.returncode != 0:
            err = " ".join((p.stderr or p.stdout).split())[-300:]
            raise LabError("%s %s failed: %s" % (tool, " ".join(args), err))
        return p.stdout

    def update(self) -> None:
        for d in ("lists/partial", "cache/archives/partial", "sources.list.d"):
            os.makedirs(os.path.join(self.state, d), exist_ok=True)
        with open(os.path.join(self.state, "sources.list"), "w") as f:
            f.write(self.series.sources_list())
        self._call("apt-get", "update")

    def depends(self, package: str) -> Tuple[str, List[str]]:
        """(candidate version, dependencies) of a package."""
        policy = self._call("apt-cache", "policy", package)
        m = re.search(r"Candidate:\s*(\S+)", policy)
        if not m or m.group(1) == "(none)":
            raise LabError("no package %s in Debian %s" % (package, self.series.suite))
        version = m.group(1)
        show = self._call("apt-cache", "show", "%s=%s" % (package, version))
        return version, _depends(show)

    def download(self, packages: Sequence[str], dest: str) -> List[str]:
        os.makedirs(dest, exist_ok=True)
        self._call("apt-get", "download", *packages, cwd=dest)
        debs = []
        for p in packages:
            found = [f for f in os.listdir(dest) if f.startswith(p + "_") and f.endswith(".deb")]
            if not found:
                raise LabError("apt-get download %s left no .deb in %s" % (p, dest))
            debs.append(os.path.join(dest, sorted(found)[-1]))
        return debs


def _decompress_modules(moddir: str) -> int:
    """Decompress every .ko.xz / .ko.zst / .ko.gz in place; return how many."""
    tools = {".xz": ["xz", "-d", "-f"], ".zst": ["zstd", "-d", "-q", "--rm", "-f"],
             ".gz": ["gzip", "-d", "-f"]}
    by_ext: Dict[str, List[str]] = {}
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            for ext in tools:
                if f.endswith(".ko" + ext):
                    by_ext.setdefault(ext, []).append(os.path.join(dirpath, f))
    n = 0
    for ext, paths in by_ext.items():
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            try:
                subprocess.run(tools[ext] + chunk, check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise LabError("decompressing modules with %s failed: %s"
                               % (tools[ext][0], e)) from None
            n += len(chunk)
    return n


def _relative_links(moddir: str, root: str) -> None:
    """Make absolute build/source links of the modules directory point inside the tree."""
    for name in ("build", "source"):
        link = os.path.join(moddir, name)
        if os.path.islink(link):
            target = os.readlink(link)
            if os.path.isabs(target):
                inside = os.path.join(root, target.lstrip("/"))
                os.unlink(link)
                os.symlink(os.path.relpath(inside, moddir), link)


def prepare_tree(root: str, release: str) -> None:
    """Decompress modules and run depmod: what virtme-ng needs to find and load them."""
    moddir = KernelTree("", release, "", root).moddir
    if not os.path.isdir(moddir):
        raise LabError("no modules directory for %s in %s" % (release, root))
    _decompress_modules(moddir)
    _relative_links(moddir, root)
    base = os.path.dirname(os.path.dirname(os.path.dirname(moddir)))  # above lib/modules/R
    try:
        subprocess.run(["depmod", "-a", "-b", base, release], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:
        raise LabError("depmod for %s failed: %s" % (release, e)) from None


def _pointer(cache: str, series: str) -> str:
    return os.path.join(cache, "kernels", "series-%s.json" % series)


def cached(series: str, cache: str = DEFAULT_CACHE) -> Optional[KernelTree]:
    """The tree fetched for a series before, if it is still complete."""
    try:
        with open(_pointer(cache, series)) as f:
            d = json.load(f)
        tree = KernelTree(series, d["release"], d["version"], d["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if os.path.isfile(tree.image) and os.path.isfile(os.path.join(tree.moddir, "modules.dep")):
        return tree
    return None


def fetch(series: str, cache: str = DEFAULT_CACHE, refresh: bool = False,
          say: Callable[[str], None] = lambda s: None) -> KernelTree:
    """A ready tree of the newest Debian kernel of `series`, from the cache if there."""
    if series not in SERIES:
        raise LabError("unknown kernel %r (want one of %s)" % (series, ", ".join(SERIES)))
    if not refresh:
        tree = cached(series, cache)
        if tree is not None:
            return tree
    s = SERIES[series]
    apt = Apt(s, os.path.join(cache, "apt", s.suite))
    say("apt-get update (Debian %s, private lists in %s)" % (s.suite, apt.state))
    apt.update()
    _, meta = apt.depends("linux-image-" + s.flavour)
    image = image_package(meta, s.flavour)
    if image is None:
        raise LabError("linux-image-%s of Debian %s names no kernel image (%s)"
                       % (s.flavour, s.suite, ", ".join(meta)))
    release = image[len("linux-image-"):]
    version, _ = apt.depends(image)
    root = os.path.join(cache, "kernels", release)
    tree = KernelTree(series, release, version, root)
    if not (os.path.isfile(tree.image) and os.path.isfile(os.path.join(tree.moddir, "modules.dep"))):
        headers = "linux-headers-" + release
        _, hdeps = apt.depends(headers)
        common = common_headers_package(hdeps)
        packages = [image, headers] + ([common] if common else [])
        say("downloading %s" % ", ".join(packages))
        debs = apt.download(packages, os.path.join(cache, "debs"))
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".%s-" % release, dir=os.path.dirname(root))
        try:
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            say("unpacking %s: decompressing modules, depmod" % release)
            prepare_tree(tmp, release)
            if os.path.isdir(root):
                shutil.rmtree(root)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for deb in debs:  # the tree is the cache; the .debs would double it
            os.unlink(deb)
    with open(_pointer(cache, series) + ".tmp", "w") as f:
        json.dump({"release": release, "version": version, "root": root}, f)
    os.replace(_pointer(cache, series) + ".tmp", _pointer(cache, series))
    return tree
