"""The deployment files are valid: the DaemonSet against the Kubernetes schema, the Dockerfile's steps.

The DaemonSet is checked offline with kubernetes-validate (it ships the
OpenAPI schemas), in strict mode (unknown fields are errors, so a misspelt
`capabilites` fails), for every Kubernetes version README.md names.

Docker cannot build here (no engine), so the Dockerfile's own RUN steps are
checked instead: its Debian packages exist for Debian 12 (`apt-cache show` on
this Debian 12 machine), and its Python install (venv from /usr/bin/python3
with system site packages, pip install of a copy of the repository) is run in a
temporary directory, then the installed `tcpidle` answers --help.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
# kubernetes-validate raises its own error or jsonschema's, depending on where the check fails.
INVALID = (kv.ValidationError, jsonschema.ValidationError)


def readme_k8s_versions():
    """The versions named in README.md: 'Kubernetes 1.28 to 1.37' (inclusive)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"Kubernetes (1\.(\d+)) to (1\.(\d+))", text)
    assert m, "README.md names no Kubernetes version range ('Kubernetes 1.N to 1.M')"
    return ["1.%d" % minor for minor in range(int(m.group(2)), int(m.group(4)) + 1)]


def manifests():
    files = sorted(K8S_DIR.glob("*.yaml"))
    assert files
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield "%s[%d]" % (path.name, i), doc


def test_readme_names_versions_the_schemas_cover():
    have = {re.match(r"v(1\.\d+)", v).group(1) for v in _schema_versions()}
    for version in readme_k8s_versions():
        assert version in have, "kubernetes-validate has no schema for %s" % version


def _schema_versions():
    base = Path(kv.__file__).parent / "kubernetes-json-schema"
    return [p.name for p in base.iterdir() if p.name.endswith("-local-strict")]


@pytest.mark.parametrize("version", readme_k8s_versions())
def test_manifests_validate(version):
    for name, doc in manifests():
        try:
            kv.validate(doc, version + ".0", strict=True)
        except INVALID as e:
            pytest.fail("%s is invalid for Kubernetes %s: %s" % (name, version, str(e).splitlines()[0]))


def test_a_misspelt_field_is_refused():
    """The check is strict: a typo a lenient apply would drop silently is an error."""
    name, doc = next(manifests())
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(INVALID):
        kv.validate(doc, readme_k8s_versions()[-1] + ".0", strict=True)


# -- Dockerfile -------------------------------------------------------------------


def dockerfile_runs():
    """The RUN commands of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[4:].strip() for line in text.splitlines() if line.startswith("RUN ")]


def test_dockerfile_base_is_the_distribution_tested_here():
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith("debian:12")
    assert "VERSION_ID=\"12\"" in Path("/etc/os-release").read_text(), \
        "the Dockerfile's steps are checked against this machine's Debian 12"


@pytest.mark.install
def test_dockerfile_packages_exist():
    apt = [r for r in dockerfile_runs() if "apt-get install" in r]
    assert apt
    words = apt[0].split("apt-get install", 1)[1].split("&&")[0].split()
    packages = [w for w in words if not w.startswith("-")]
    assert "python3-bpfcc" in packages
    for p in packages:
        r = subprocess.run(["apt-cache", "show", p], capture_output=True, text=True)
        assert r.returncode == 0 and "Package: %s" % p in r.stdout, "no Debian package %s" % p


@pytest.mark.install
def test_dockerfile_python_install_runs(tmp_path):
    """The Dockerfile's venv + pip steps, run on a copy of the repository (COPY . /opt/tcpidle)."""
    dest = tmp_path / "opt-tcpidle"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    steps = [r for r in dockerfile_runs() if "/opt/tcpidle" in r]
    assert steps, "no install step in the Dockerfile"
    for step in steps:
        cmd = step.replace("/opt/tcpidle", str(dest))
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, "Dockerfile step failed: %s\n%s" % (step, r.stderr[-2000:])
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', DOCKERFILE.read_text(), re.M).group(1)
    exe = entry.replace("/opt/tcpidle", str(dest))
    r = subprocess.run([exe, "track", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--metrics-port" in r.stdout
    # bcc, from python3-bpfcc, is seen by the image's venv.
    r = subprocess.run([str(dest / ".venv" / "bin" / "python"), "-c", "import bcc"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
