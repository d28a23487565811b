"""The README's configuration reference stays in step with orpheus_config.yaml."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def yaml_rows() -> dict[str, str]:
    """The reference table row of every `section.key` of orpheus_config.yaml: default and comment as written."""
    rows, section = {}, None
    for line in (ROOT / "orpheus_config.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if m := re.match(r"^(\w+):", line):
            section = m.group(1)
        elif m := re.match(r"^\s+(\w+):\s*(.*?)\s*(?:#\s*(.*))?$", line):
            key, default, comment = f"{section}.{m.group(1)}", m.group(2), m.group(3) or ""
            comment = re.sub(r"<(?=[A-Za-z_/])", "&lt;", comment.replace("|", "\\|"))  # no stray HTML tags
            rows[key] = f"| `{key}` | `{default}` | {comment} |"
    return rows


def readme_keys() -> dict[str, str]:
    """The rows of the README's configuration table: `section.key` -> default."""
    text = (ROOT / "README.md").read_text()
    assert "## Configuration reference" in text, "README.md has no configuration reference"
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+\.\w+)` \| `(.*?)` \|", table, flags=re.M))


def test_readme_lists_every_config_key_with_its_default() -> None:
    """Every key of orpheus_config.yaml appears in the README's reference with the file's default, and no other."""
    rows = yaml_rows()
    expected = {key: re.match(r"\| `.*?` \| `(.*?)` \|", row).group(1) for key, row in rows.items()}
    documented = readme_keys()
    stale = sorted(k for k in expected.keys() | documented.keys() if expected.get(k) != documented.get(k))
    fix = "\n".join(rows[k] for k in stale if k in rows)
    assert not stale, f"README table out of date for {stale} (fix: python -m tests.test_docs); rows:\n{fix}"


def regenerate_readme() -> None:
    """Rewrite the README's configuration table from orpheus_config.yaml (`python -m tests.test_docs`)."""
    path = ROOT / "README.md"
    head, rest = path.read_text().split("## Configuration reference", 1)
    body, tail = rest.split("\n## ", 1)
    lines = body.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| key |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines[start:end] = ["| key | default | meaning |", "| --- | --- | --- |", *yaml_rows().values()]
    path.write_text(head + "## Configuration reference" + "\n".join(lines) + "\n## " + tail)


if __name__ == "__main__":
    regenerate_readme()
