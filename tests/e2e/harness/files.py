"""Repository paths, targets files written at once, and README.md's documented YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]


def write_atomic(path: Path | str, text: str) -> None:
    """Replace path's content at once (a poller never reads half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def targets_yaml(entries: Sequence[Mapping[str, Any]]) -> str:
    """A workersd targets file: entries are dicts (service, address, ports, ...);
    a (first, last) ports tuple becomes "first-last"."""
    out = []
    for entry in entries:
        entry = dict(entry)
        ports = entry.get("ports")
        if isinstance(ports, tuple):
            entry["ports"] = f"{ports[0]}-{ports[1]}"
        out.append(entry)
    return yaml.safe_dump({"targets": out}, sort_keys=False)


def readme_yaml_block(heading: str, readme: Path | None = None) -> Any:
    """The first ```yaml block after the Markdown heading `heading` in README.md,
    parsed. Tests use README's documented configs verbatim, so they fail when
    the documentation drifts from what works."""
    text = (readme or REPO_ROOT / "README.md").read_text()
    lines = text.splitlines()
    try:
        start = next(
            i
            for i, line in enumerate(lines)
            if line.strip() == heading or line.startswith(heading + " ")
        )
    except StopIteration:
        raise AssertionError(f"README.md has no heading {heading!r}") from None
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("##"):
            break  # next heading: no block in this section
        if lines[i].strip() == "```yaml":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            return yaml.safe_load("\n".join(lines[i + 1 : end]))
    raise AssertionError(f"README.md section {heading!r} has no ```yaml block")
