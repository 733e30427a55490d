"""The container image scripts/build-image makes, checked without a container runtime.

Reads the archives in dist/ (or $DIST): skopeo's view of the config, the layer's exact
contents, the binary run from the unpacked root filesystem under chroot, a rebuild that must
give the same bytes, and the Dockerfile, which must declare the same image.

Without the archives every test skips, unless IMAGE_REQUIRE_ARCHIVES=1 (.ci/run builds them
first and sets it), where a missing archive is a failure.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]
VERSION = PACKAGE["version"]
DIST = Path(os.environ.get("DIST", ROOT / "dist"))
OCI_ARCHIVE = DIST / f"workersd-{VERSION}.oci.tar"
DOCKER_ARCHIVE = DIST / f"workersd-{VERSION}.docker.tar"

USER = "65532:65532"
ENTRYPOINT = ["/usr/local/bin/workersd"]
# Everything the image holds: path -> (directory?, mode). Nothing else may be in the layer.
LAYOUT = {
    "etc": (True, 0o755),
    "etc/group": (False, 0o644),
    "etc/passwd": (False, 0o644),
    "etc/ssl": (True, 0o755),
    "etc/ssl/certs": (True, 0o755),
    "etc/ssl/certs/ca-certificates.crt": (False, 0o644),
    "tmp": (True, 0o1777),
    "usr": (True, 0o755),
    "usr/local": (True, 0o755),
    "usr/local/bin": (True, 0o755),
    "usr/local/bin/workersd": (False, 0o755),
}


def _archives_missing() -> str | None:
    missing = [p for p in (OCI_ARCHIVE, DOCKER_ARCHIVE) if not p.is_file()]
    if not missing:
        return None
    return f"no image archive {', '.join(map(str, missing))}: run scripts/build-static and scripts/build-image"


@pytest.fixture(scope="session", autouse=True)
def archives() -> None:
    reason = _archives_missing()
    if reason is None:
        return
    if os.environ.get("IMAGE_REQUIRE_ARCHIVES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def skopeo(*args: str) -> dict:
    out = subprocess.run(["skopeo", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def config() -> dict:
    return skopeo("inspect", "--config", f"oci-archive:{OCI_ARCHIVE}")


def oci_blob(archive: tarfile.TarFile, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":")
    data = archive.extractfile(f"blobs/{algorithm}/{hexdigest}").read()
    assert hashlib.new(algorithm, data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


@pytest.fixture(scope="session")
def layer(tmp_path_factory) -> Path:
    """The image's one layer, uncompressed, read from the OCI archive by hand (index, manifest)."""
    with tarfile.open(OCI_ARCHIVE) as archive:
        index = json.loads(archive.extractfile("index.json").read())
        assert len(index["manifests"]) == 1
        manifest = json.loads(oci_blob(archive, index["manifests"][0]["digest"]))
        assert len(manifest["layers"]) == 1, "the image is one layer"
        compressed = oci_blob(archive, manifest["layers"][0]["digest"])
        config = json.loads(oci_blob(archive, manifest["config"]["digest"]))
    data = gzip.decompress(compressed)
    # The config names the uncompressed layer by its diff ID: runtimes check it on import.
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(data).hexdigest()}"]
    path = tmp_path_factory.mktemp("layer") / "layer.tar"
    path.write_bytes(data)
    return path


def commit_time() -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct"))
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- skopeo's view -------------------------------------------------------------------------------


def test_config_user_entrypoint_labels(config):
    c = config["config"]
    assert c["User"] == USER
    assert c["Entrypoint"] == ENTRYPOINT
    assert c["Cmd"] == ["--help"]
    assert sorted(c["ExposedPorts"]) == ["9463/tcp", "9464/tcp"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in c["Env"]
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == PACKAGE["license"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    # Built from this commit: a stale archive fails here (rebuild with scripts/build-image).
    assert labels["org.opencontainers.image.revision"] == git("rev-parse", "HEAD")
    created = commit_time()
    assert labels["org.opencontainers.image.created"] == created
    assert config["created"] == created
    assert {h["created"] for h in config["history"]} == {created}
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_docker_archive_is_the_same_image(config):
    docker = skopeo("inspect", "--config", f"docker-archive:{DOCKER_ARCHIVE}")
    assert docker == config
    with tarfile.open(DOCKER_ARCHIVE) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
    # skopeo writes the name normalized: `workersd:V` is docker.io/library/workersd:V, as a
    # kubelet resolves the image `workersd:V`.
    assert [m["RepoTags"] for m in manifest] == [[f"docker.io/library/workersd:{VERSION}"]]


# -- the root filesystem ------------------------------------------------------------------------


def test_layer_holds_exactly_the_listed_files(layer):
    epoch = int(datetime.strptime(commit_time(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    with tarfile.open(layer) as tar:
        members = tar.getmembers()
        found = {}
        for m in members:
            assert m.isdir() or m.isfile(), f"{m.name}: only directories and regular files"
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", ""), f"{m.name}: owned by root, no names"
            assert m.mtime == epoch, f"{m.name}: mtime {m.mtime}, expected SOURCE_DATE_EPOCH {epoch}"
            found[m.name] = (m.isdir(), m.mode)
        names = [m.name for m in members]
        assert names == sorted(names, key=str.encode), "entries sorted by path"
        assert found == LAYOUT
        passwd = tar.extractfile("etc/passwd").read().decode()
        group = tar.extractfile("etc/group").read().decode()
        bundle = tar.extractfile("etc/ssl/certs/ca-certificates.crt").read().decode()
    assert "nonroot:x:65532:65532:" in passwd
    assert "nonroot:x:65532:" in group
    assert bundle.count("-----BEGIN CERTIFICATE-----") > 50, "a CA bundle, not an empty file"


@pytest.fixture
def rootfs(layer, tmp_path) -> Path:
    root = tmp_path / "rootfs"
    root.mkdir()
    with tarfile.open(layer) as tar:
        tar.extractall(root, numeric_owner=True, filter="tar")
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root (CI runs as root)")
def test_rootfs_runs_workersd_under_chroot(rootfs):
    def run(*args: str) -> subprocess.CompletedProcess:
        # As the image's user, with nothing but the image's files: a dynamic binary, a missing
        # file or a wrong mode fails here.
        return subprocess.run(
            [shutil.which("chroot") or "/usr/sbin/chroot", f"--userspec={USER}", str(rootfs), *ENTRYPOINT, *args],
            capture_output=True, text=True, timeout=30, env={"PATH": "/usr/local/bin"},
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert VERSION in version.stdout
    shutil.copy(ROOT / "examples" / "targets.yaml", rootfs / "tmp" / "targets.yaml")
    ok = run("check", "--targets", "/tmp/targets.yaml")
    assert ok.returncode == 0, ok.stderr
    (rootfs / "tmp" / "bad.yaml").write_text("targets:\n  - service: clever\n    ports: 9011-9020\n")
    bad = run("check", "--targets", "/tmp/bad.yaml")
    assert bad.returncode != 0, "check accepts a target without an address"


# -- reproducibility ------------------------------------------------------------------------------


def test_rebuild_gives_the_same_digest_and_bytes(layer, tmp_path):
    # Rebuilt from the binary the image holds: the image must be a function of the binary and
    # the commit alone.
    binary = tmp_path / "workersd"
    with tarfile.open(layer) as tar:
        binary.write_bytes(tar.extractfile("usr/local/bin/workersd").read())
    binary.chmod(0o755)
    out = tmp_path / "dist"
    env = {**os.environ, "DIST": str(out)}
    subprocess.run([str(ROOT / "scripts" / "build-image"), str(binary)], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True)
    again = out / OCI_ARCHIVE.name
    digest = lambda p: skopeo("inspect", f"oci-archive:{p}")["Digest"]  # noqa: E731
    assert digest(again) == digest(OCI_ARCHIVE)
    assert sha256(again) == sha256(OCI_ARCHIVE)
    assert sha256(out / DOCKER_ARCHIVE.name) == sha256(DOCKER_ARCHIVE)


# -- the Dockerfile declares the same image --------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def pairs(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.split())


def test_dockerfile_declares_the_same_image(config):
    build, final = dockerfile_stages()
    assert build[0] == ("FROM", "rust:1-bookworm AS build")
    runs = " && ".join(args for word, args in build if word == "RUN")
    # The same static build and the same root filesystem script as scripts/build-image.
    assert "scripts/build-static /out/workersd" in runs
    assert "scripts/image-rootfs /out/workersd /rootfs" in runs
    c = config["config"]
    declared: dict[str, list[str]] = {}
    for word, args in final:
        declared.setdefault(word, []).append(args)
    assert declared.pop("FROM") == ["scratch"]
    assert declared.pop("COPY") == ["--from=build /rootfs/ /"], "the image holds only the rootfs"
    assert declared.pop("USER") == [c["User"]]
    assert [json.loads(a) for a in declared.pop("ENTRYPOINT")] == [c["Entrypoint"]]
    assert [json.loads(a) for a in declared.pop("CMD")] == [c["Cmd"]]
    env = {k: v for a in declared.pop("ENV") for k, v in pairs(a).items()}
    assert env == pairs(" ".join(c["Env"]))
    assert sorted(p for a in declared.pop("EXPOSE") for p in a.split()) == sorted(c["ExposedPorts"])
    labels = {k: v for a in declared.pop("LABEL") for k, v in pairs(a).items()}
    for key, value in labels.items():
        assert c["Labels"].get(key) == value, f"Dockerfile LABEL {key}={value}, image {c['Labels'].get(key)}"
    assert declared == {}, f"Dockerfile instructions the test does not compare: {sorted(declared)}"
