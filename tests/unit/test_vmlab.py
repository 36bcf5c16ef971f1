"""The kernel lab's pure parts: package resolution, VM command lines, results.

The lab itself (fetching, booting) is exercised by running it: `scripts/lab`.
"""

import json
import lzma
import os
import shutil

import pytest

from vmlab import __main__ as cli
from vmlab import kernels, results, vm

META_DEPENDS = """Package: linux-image-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)
Description: Linux for 64-bit PCs (meta-package)
"""

HEADERS_DEPENDS = """Package: linux-headers-6.12.118+deb13-amd64
Depends: linux-base (>= 4.12~), linux-headers-6.12.118+deb13-common (= 6.12.118-1), \
linux-image-6.12.118+deb13-amd64 (= 6.12.118-1) | linux-image-6.12.118+deb13-amd64-unsigned \
(= 6.12.118-1), linux-kbuild-6.12.118+deb13, gcc-14
"""


def test_metapackage_names_the_image():
    deps = kernels._depends(META_DEPENDS)
    assert deps == ["linux-image-6.1.0-57-amd64"]
    assert kernels.image_package(deps) == "linux-image-6.1.0-57-amd64"
    # 6.12's version has a "+deb13" in it; an unsigned image counts as well
    assert kernels.image_package(["linux-image-6.12.118+deb13-amd64-unsigned"]) \
        == "linux-image-6.12.118+deb13-amd64"
    assert kernels.image_package(["linux-image-6.1.0-57-cloud-amd64"], "amd64") is None
    assert kernels.image_package(["linux-base"]) is None


def test_headers_name_their_common_part():
    deps = kernels._depends(HEADERS_DEPENDS)
    assert deps[2] == "linux-image-6.12.118+deb13-amd64"  # first alternative only
    assert kernels.common_headers_package(deps) == "linux-headers-6.12.118+deb13-common"
    assert kernels.common_headers_package(["gcc-14"]) is None


def test_sources_list_is_the_suite_and_its_security_updates():
    text = kernels.SERIES["5.10"].sources_list()
    assert text.splitlines() == [
        "deb [signed-by=%s] http://deb.debian.org/debian bullseye main" % kernels.KEYRING,
        "deb [signed-by=%s] http://deb.debian.org/debian-security bullseye-security main"
        % kernels.KEYRING]


def test_apt_options_keep_the_host_configuration_untouched(tmp_path):
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "Candidate: 6.1.192-3\n", ""

    def run(argv, **kw):
        calls.append(argv)
        return Done()

    apt = kernels.Apt(kernels.SERIES["6.1"], str(tmp_path), run=run)
    apt.update()
    opts = " ".join(calls[0])
    assert "Dir::Etc::SourceList=%s/sources.list" % tmp_path in opts
    assert "Dir::State::Lists=%s/lists" % tmp_path in opts
    assert "Dir::State::status=/dev/null" in opts
    assert (tmp_path / "sources.list").read_text() == kernels.SERIES["6.1"].sources_list()


def test_apt_failure_is_one_line(tmp_path):
    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate\n  package x\n"

    apt = kernels.Apt(kernels.SERIES["6.1"], str(tmp_path), run=lambda a, **k: Failed())
    with pytest.raises(kernels.LabError) as e:
        apt.depends("x")
    assert "\n" not in str(e.value) and "Unable to locate package x" in str(e.value)


def _fake_tree(root, release, usr=False):
    base = root / ("usr/lib" if usr else "lib") / "modules" / release
    (base / "kernel/fs/9p").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "boot" / ("vmlinuz-" + release)).write_bytes(b"image")
    return base


def test_modules_are_decompressed_and_links_kept_inside_the_tree(tmp_path):
    if shutil.which("xz") is None:
        pytest.skip("needs xz (xz-utils)")
    mods = _fake_tree(tmp_path, "6.12.1-amd64", usr=True)
    with lzma.open(mods / "kernel/fs/9p/9p.ko.xz", "wb") as f:
        f.write(b"\x7fELF module")
    (tmp_path / "usr/src/linux-headers-6.12.1-amd64").mkdir(parents=True)
    os.symlink("/usr/src/linux-headers-6.12.1-amd64", mods / "build")
    assert kernels._decompress_modules(str(mods)) == 1
    assert (mods / "kernel/fs/9p/9p.ko").read_bytes() == b"\x7fELF module"
    assert not (mods / "kernel/fs/9p/9p.ko.xz").exists()
    kernels._relative_links(str(mods), str(tmp_path))
    assert not os.path.isabs(os.readlink(mods / "build"))
    assert os.path.realpath(mods / "build") == str(tmp_path / "usr/src/linux-headers-6.12.1-amd64")


def test_cached_tree_is_used_only_when_complete(tmp_path):
    release = "6.1.0-57-amd64"
    root = tmp_path / "kernels" / release
    mods = _fake_tree(root, release)
    (tmp_path / "kernels" / "series-6.1.json").write_text(json.dumps(
        {"release": release, "version": "6.1.192-3", "root": str(root)}))
    assert kernels.cached("6.1", str(tmp_path)) is None  # no modules.dep yet
    (mods / "modules.dep").write_text("")
    tree = kernels.cached("6.1", str(tmp_path))
    assert tree.release == release and tree.image == str(root / ("boot/vmlinuz-" + release))
    assert tree.moddir == str(mods)
    # fetch() answers from the cache without any apt call
    assert kernels.fetch("6.1", str(tmp_path)) == tree
    with pytest.raises(kernels.LabError, match="unknown kernel"):
        kernels.fetch("4.19", str(tmp_path))


def test_vng_command_line():
    tree = kernels.KernelTree("6.1", "6.1.0-57-amd64", "6.1.192-3", "/k")
    argv = vm.vng_argv(tree, "sh guest.sh")
    assert argv[:4] == ["vng", "--verbose", "--run", "/k/boot/vmlinuz-6.1.0-57-amd64"]
    assert "--rw" in argv and "--disable-kvm" in argv
    assert argv[-2:] == ["--", "sh guest.sh"]
    assert "--disable-kvm" not in vm.vng_argv(tree, "x", kvm=True)


def test_systemd_command_line_keeps_the_host_root_read_only():
    tree = kernels.KernelTree("6.1", "6.1.0-57-amd64", "6.1.192-3", "/k")
    argv = vm.systemd_argv(tree, "/repo/deploy/systemd/vm-check.sh")
    assert "--systemd" in argv and "--disable-kvm" in argv
    # systemd on a writable shared root would run tmpfiles' "D /tmp" on the host's /tmp
    assert "--rw" not in argv and not any(a.startswith("--rwdir") for a in argv)
    settings = argv[argv.index("--append") + 1]
    assert settings.startswith('SYSTEMD_PROC_CMDLINE="') and settings.endswith('"')
    assert "systemd.run=/repo/deploy/systemd/vm-check.sh" in settings
    assert "systemd.unit=kernel-command-line.service" in settings
    assert "systemd.mask=systemd-tmpfiles-setup.service" in settings
    assert "systemd.run_failure_action=poweroff" in settings


def test_systemd_report_lines():
    log = "[ 1.0] x\r\ntcpidle-sd: kernel 6.1\n\x1b[0mtcpidle-sd: PASS in 9 s\n"
    assert vm.systemd_lines(log) == ["kernel 6.1", "PASS in 9 s"]


def test_guest_command_quotes_pytest_args():
    cmd = vm.guest_command("/out dir", ["-k", "a and not b"], headers=False,
                           guest_env={"TCPIDLE_LAB_HOOKS": "fentry,kprobe"})
    assert cmd.startswith("env TCPIDLE_LAB_HOOKS=fentry,kprobe sh %s " % vm.GUEST_SCRIPT)
    assert cmd.endswith("'/out dir' --no-headers -- -k 'a and not b'")


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4" time="12.5">
<testcase classname="tests.kernel.test_probe_kernel" name="test_auto_hook" time="1">
  <properties><property name="lab_hook" value="fentry"/><property name="other" value="x"/></properties>
</testcase>
<testcase classname="tests.kernel.test_a" name="test_fails" time="1"><failure message="boom"/></testcase>
<testcase classname="tests.kernel.test_a" name="test_errs" time="1"><error message="e"/></testcase>
<testcase classname="tests.kernel.test_a" name="test_skip" time="0">
  <skipped message="kernel has no kprobes"/></testcase>
<testcase classname="tests.kernel.test_a" name="test_ok" time="0"/>
</testsuite></testsuites>
"""


def test_junit_counts_failures_skips_and_facts():
    r = results.parse_junit(JUNIT)
    assert (r.passed, r.failed, r.skipped) == (2, 2, 1)
    assert r.counts() == "2 passed, 2 failed, 1 skipped"
    assert r.failures == ["tests.kernel.test_a::test_fails", "tests.kernel.test_a::test_errs"]
    assert r.skips == {"tests.kernel.test_a::test_skip": "kernel has no kprobes"}
    assert r.facts == {"hook": "fentry"}
    assert r.seconds == 12.5


def test_env_and_duration():
    assert results.parse_env("release=6.1.0-57-amd64\nheaders=own\n\n") == {
        "release": "6.1.0-57-amd64", "headers": "own"}
    assert results.duration(65.4) == "1m05s"
    assert results.duration(3600) == "60m00s"


def test_unknown_kernel_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["4.19"])
    assert e.value.code == 2
    assert "unknown KERNEL '4.19'" in capsys.readouterr().err


def test_a_cache_the_guest_mounts_afresh_is_a_usage_error(capsys):
    # virtme-ng's init mounts tmpfs there: the guest's report would be lost.
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["6.1", "--cache", "/tmp/lab-cache"])
    assert e.value.code == 2
    assert "--cache /tmp/lab-cache (or TCPIDLE_LAB_CACHE): the guest mounts a fresh /tmp" in (
        capsys.readouterr().err)
    assert cli.guest_private("/var/lib/tcpidle-lab") is None
    assert cli.guest_private("/tmpfoo") is None and cli.guest_private("/run") == "/run"


def test_pytest_args_after_double_dash():
    a = cli.parse_args(["6.1", "--no-headers", "--", "-k", "probe", "--", "x"])
    assert a.kernels == ["6.1"] and a.no_headers
    assert a.pytest_args == ["-k", "probe", "--", "x"]
    assert cli.parse_args([]).pytest_args is None


def test_no_qemu_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert cli.main(["6.1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["lab: FAILED, no VM can boot: qemu-system-x86_64 not found "
                   "(Debian package qemu-system-x86; scripts/setup lab installs it)"]


def test_every_kernel_has_a_plan():
    assert set(cli.PLANS) == set(kernels.SERIES) == set(cli.ORDER)
