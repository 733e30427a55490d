"""What a release ships of the chart: the package scripts/package-chart makes (Helm's own `helm
package` through helm_lib.py), loaded back by Helm's chart loader and installed from the .tgz;
and the NOTES warning while image.repository is still the unpublished default."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "workersd"
VERSION = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def package(dest: Path) -> Path:
    subprocess.run([str(REPO / "scripts" / "package-chart"), str(dest)], check=True,
                   capture_output=True, text=True)
    return dest / f"workersd-{VERSION}.tgz"


@pytest.fixture(scope="module")
def tgz(tmp_path_factory) -> Path:
    path = package(tmp_path_factory.mktemp("package"))
    assert path.is_file(), "helm package names the archive <name>-<version>.tgz"
    return path


def test_chart_is_versioned_with_the_binary():
    # appVersion is the default image tag: the chart must name the image released with it.
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (meta["version"], meta["appVersion"]) == (VERSION, VERSION)


def helmignored(path: Path) -> bool:
    patterns = [p for p in (CHART / ".helmignore").read_text().splitlines() if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path.name, p) or path.match(p.rstrip("/") + "/*") for p in patterns)


def test_package_holds_the_chart_and_its_crd(tgz):
    with tarfile.open(tgz) as tar:
        members = tar.getmembers()
        crd = tar.extractfile("workersd/crds/workermetrics.yaml").read()
    names = [m.name for m in members]
    assert names[0] == "workersd/Chart.yaml", "Helm writes Chart.yaml first"
    assert all(n.startswith("workersd/") for n in names)
    # Every entry has the commit's time, not the checkout's: the same commit, the same bytes.
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or subprocess.run(
        ["git", "log", "-1", "--format=%ct"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout)
    assert {m.mtime for m in members} == {epoch}
    on_disk = sorted(
        f"workersd/{p.relative_to(CHART).as_posix()}"
        for p in CHART.rglob("*")
        if p.is_file() and not helmignored(p)
    )
    assert sorted(names) == on_disk
    assert crd == (REPO / "crds" / "workermetrics.yaml").read_bytes()


def test_helm_loads_the_package(helm, tgz):
    meta = helm.show_chart(tgz)
    assert (meta["name"], meta["version"], meta["appVersion"]) == ("workersd", VERSION, VERSION)


def test_install_from_the_package_sends_the_crd_first(helm, tgz):
    rendered = helm.render(tgz)
    assert rendered.sent[0]["kind"] == "CustomResourceDefinition"
    assert rendered.sent[0]["metadata"]["name"] == "workermetrics.workersd.io"
    image = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{VERSION}")


def test_package_is_reproducible(tgz, tmp_path):
    again = package(tmp_path)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(tgz.read_bytes()).digest()


# -- NOTES: the default repository --------------------------------------------------------------

DEFAULT_REPOSITORY = "ghcr.io/workersd/workersd"
WARNING = "WARNING: image.repository is the chart's default"


def test_values_default_repository_is_the_one_notes_warn_about():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == DEFAULT_REPOSITORY


@pytest.mark.parametrize(
    "values, warned",
    [
        ({}, True),
        ({"image": {"tag": "0.1.0-rc1"}}, True),
        ({"image": {"repository": DEFAULT_REPOSITORY}}, True),
        ({"image": {"repository": "registry.example/platform/workersd"}}, False),
        ({"image": {"repository": "workersd", "tag": VERSION}}, False),
    ],
)
def test_notes_warn_only_about_the_default_repository(helm, values, warned):
    notes = helm.render(CHART, values).notes
    assert (WARNING in notes) == warned, notes
    if warned:
        tag = (values.get("image") or {}).get("tag") or VERSION
        assert f"--set image.repository=REGISTRY/workersd --set image.tag={tag}" in notes
