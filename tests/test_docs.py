"""The documentation stays true to the code and to the repository.

- docs/config.md's ```yaml blocks are the config reference: every field of ``JobConfig`` (nested dataclasses
  walked; a dict- or list-typed field is one key) has exactly one line there, every line there is a real
  field, and the value a line shows is the field's default.
- docs/architecture.md names every module of the package (``kbatch/<folder>/<module>.py``).
- Every relative link in README.md and docs/*.md (and bench/README.md) leads to a file of the repository, and
  every repository path quoted in backticks there exists.
- The README's test commands are the ones .ci/run runs.
- No tracked file points outside the repository: no paths of the machine the project was built on.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import typing

import pytest
import yaml

from kbatch import config as kconfig

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIG_MD = DOCS / "config.md"

_KEY_LINE = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_]*):(.*)$")


# ---------------------------------------------------------------------------------------------------------
# config reference


def config_fields(cls=kconfig.JobConfig, prefix: str = "") -> tuple[dict[str, typing.Any], set[str]]:
    """``({leaf key path: default}, {section key paths})`` of a config dataclass, recursively. A field is a
    section when its type (or its default) is a dataclass; anything else (numbers, strings, dicts, lists) is
    one key."""
    leaves: dict[str, typing.Any] = {}
    sections: set[str] = set()
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        value = getattr(default, f.name)
        sub = hints.get(f.name)
        sub = sub if isinstance(sub, type) and dataclasses.is_dataclass(sub) else None
        if sub is None and dataclasses.is_dataclass(value):
            sub = type(value)
        if sub is not None:
            sections.add(path)
            sub_leaves, sub_sections = config_fields(sub, path + ".")
            # a section's defaults may differ from its class's (resources.decoder vs resources.prior)
            for k in sub_leaves:
                sub_leaves[k] = _lookup(dataclasses.asdict(value), k[len(path) + 1:]) if value is not None \
                    else sub_leaves[k]
            leaves.update(sub_leaves)
            sections |= sub_sections
        else:
            leaves[path] = value
    return leaves, sections


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def yaml_blocks(text: str) -> list[tuple[int, list[str]]]:
    """``(first line number, lines)`` of every ```yaml fenced block."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```yaml":
            current, start = [], n + 1
        elif current is not None and line.strip().startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unclosed ```yaml block"
    return blocks


def reference_lines(text: str) -> tuple[list[tuple[str, int, typing.Any]], list[tuple[str, int]], list[str]]:
    """Parse the reference: ``(leaf lines as (key path, line number, value), section lines, problems)``.

    One key per line; two-space indentation gives its path (a stack of the open sections); a line with a
    value after the colon is a key, one without opens a section; comment lines and blank lines are skipped.
    Anything else (flow mappings over several lines, ``- item`` lists) is a problem: the format stays one
    key per line so that this check stays this simple."""
    leaves, sections, problems = [], [], []
    for start, lines in yaml_blocks(text):
        try:  # the block as YAML reads it: each line's reading must agree with it
            whole = yaml.safe_load("\n".join(lines)) or {}
        except yaml.YAMLError as e:
            problems.append(f"docs/config.md: the block at line {start} is not valid YAML: {e}")
            continue
        stack: list[tuple[int, str]] = []
        for n, line in enumerate(lines, start):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _KEY_LINE.match(line)
            if not m:
                problems.append(f"docs/config.md:{n}: not a `key: value  # comment` line: {line.strip()!r}")
                continue
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key])
            try:
                parsed = yaml.safe_load(line.strip())
            except yaml.YAMLError as e:
                problems.append(f"docs/config.md:{n}: not valid YAML ({e}): {line.strip()!r}")
                continue
            value = parsed[key] if isinstance(parsed, dict) else None
            try:
                as_yaml = _lookup(whole, path)
            except (KeyError, TypeError):
                as_yaml = KeyError
            section = rest.split("#", 1)[0].strip() == "" and value is None
            if as_yaml is KeyError or (not section and as_yaml != value) or (section and not isinstance(as_yaml, dict)):
                problems.append(f"docs/config.md:{n}: YAML reads this line differently (one key per line, "
                                f"two-space indentation): {line.strip()!r}")
            elif section:
                sections.append((path, n))
                stack.append((indent, key))
            else:
                leaves.append((path, n, value))
    return leaves, sections, problems


def _same(doc, default) -> bool:
    if isinstance(default, (list, tuple)):
        return isinstance(doc, (list, tuple)) and list(doc) == list(default)
    if isinstance(default, bool) or isinstance(doc, bool):
        return doc is default
    return doc == default


def test_config_fields_walk_nested_dataclasses():
    leaves, sections = config_fields()
    assert {"models", "models.sim", "resources", "resources.decoder", "output"} <= sections
    # a section's defaults are its parent's (resources.decoder's differ from resources.prior's)
    for stage in ("prior", "decoder"):
        for f in dataclasses.fields(kconfig.StageResources):
            assert leaves[f"resources.{stage}.{f.name}"] == getattr(getattr(kconfig.ResourcesConfig(), stage), f.name)
    assert "storage_options" in leaves and "limits.allowed_roots" in leaves  # dict / list: one key each
    assert "models.sim" not in leaves


def test_reference_parser_builds_paths_and_flags_bad_lines():
    text = ("```yaml\nmodels:\n  dtype: float16   # x\n  sim:\n    load_seconds: 0.0\n  # a comment\n"
            "seed: 0\n```\n```yaml\nmodels:\n  offload: false\nlimits: {max_steps: 1,\n  max_pixels: 2}\n```\n"
            "```yaml\nretries:\n   max_attempts: 3\n  max_failed_rows: 0\n```\n")
    leaves, sections, problems = reference_lines(text)
    assert [(p, v) for p, _, v in leaves] == [("models.dtype", "float16"), ("models.sim.load_seconds", 0.0),
                                             ("seed", 0), ("models.offload", False)]
    assert [p for p, _ in sections] == ["models", "models.sim", "models"]
    # a flow mapping over two lines is not one key per line; uneven indentation is not YAML
    assert len(problems) == 3, problems


def test_every_config_key_documented_exactly_once():
    fields, sections = config_fields()
    leaves, doc_sections, problems = reference_lines(CONFIG_MD.read_text())
    assert not problems, "\n".join(problems)
    lines: dict[str, list[int]] = {}
    for path, n, _ in leaves:
        lines.setdefault(path, []).append(n)
    missing = sorted(set(fields) - set(lines))
    stale = sorted(f"{p} (line {ns[0]})" for p, ns in lines.items() if p not in fields)
    twice = sorted(f"{p} (lines {ns})" for p, ns in lines.items() if len(ns) > 1)
    not_sections = sorted(f"{p} (line {n})" for p, n in doc_sections if p not in sections)
    assert not missing, (f"config keys without a line in docs/config.md's reference: {missing} "
                         "(add `key: default  # what it does`, read from kbatch/config.py)")
    assert not stale, f"lines in docs/config.md that are no config key: {stale}"
    assert not twice, f"config keys documented more than once in docs/config.md: {twice}"
    assert not not_sections, f"sections in docs/config.md that are no config section: {not_sections}"


def test_config_reference_shows_the_defaults():
    fields, _ = config_fields()
    leaves, _, _ = reference_lines(CONFIG_MD.read_text())
    wrong = [f"{p} (line {n}): docs say {v!r}, default is {fields[p]!r}"
             for p, n, v in leaves if p in fields and not _same(v, fields[p])]
    assert not wrong, "docs/config.md shows values that are not the defaults:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------
# architecture: one line per module


def test_architecture_names_every_module():
    text = (DOCS / "architecture.md").read_text()
    pkg = REPO / "kbatch"
    modules = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                     if p.name != "__init__.py" and "__pycache__" not in p.parts)
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"modules without their line in docs/architecture.md: {missing}"
    named = set(re.findall(r"`((?:[a-z_]+/)?[a-z_]+\.py)`", text))
    gone = sorted(n for n in named if "/" in n and not (pkg / n).exists() and not (REPO / n).exists())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


# ---------------------------------------------------------------------------------------------------------
# links and paths

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_TOP = ("kbatch", "configs", "bench", "docs", "tests", "jobs", "examples", "dashboards", ".ci")
_QUOTED_PATH = re.compile(r"`((?:%s)/[A-Za-z0-9_./+-]*)`" % "|".join(re.escape(t) for t in _TOP))


def doc_pages() -> list[pathlib.Path]:
    return [REPO / "README.md", REPO / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]


def test_relative_links_resolve():
    broken = []
    for page in doc_pages():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # http(s)://, mailto:, an anchor in the same page
                path = (page.parent / target.split("#", 1)[0]).resolve()
                if not path.exists() or REPO not in path.parents and path != REPO:
                    broken.append(f"{page.relative_to(REPO)}:{n}: {target}")
    assert not broken, "links that lead to no file of the repository:\n" + "\n".join(broken)


def test_quoted_repository_paths_exist():
    missing = []
    for page in doc_pages():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for quoted in _QUOTED_PATH.findall(line):
                if any(c in quoted for c in "<>*{}") or quoted.endswith("/"):
                    if quoted.endswith("/") and not (REPO / quoted).is_dir():
                        missing.append(f"{page.relative_to(REPO)}:{n}: {quoted}")
                    continue
                if not (REPO / quoted).exists():
                    missing.append(f"{page.relative_to(REPO)}:{n}: {quoted}")
    assert not missing, "paths quoted in the docs that are not in the repository:\n" + "\n".join(missing)


def test_readme_test_commands_are_what_ci_runs():
    """The README's test commands are .ci/run's (pip's -q and `python3 -m pip` aside): a change to one
    without the other fails."""
    readme = (REPO / "README.md").read_text()
    ci = [line.split("#", 1)[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [c for c in ci if re.match(r"^python3 -m (pip install|pytest)\b", c)]
    assert any("pytest" in c for c in commands), ".ci/run runs no pytest"
    for c in commands:
        shown = c.replace("python3 -m pip install", "pip install") if "pip install" in c else c
        if shown.startswith("pip install"):
            shown = re.sub(r"\s-q\b", "", shown)
        assert re.search(r"^" + re.escape(shown) + r"(\s|$)", readme, re.M), \
            f"README.md does not show .ci/run's command {c!r} (as {shown!r})"


def tracked_files() -> list[pathlib.Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


# built from parts so that this file does not match itself
_OUTSIDE = re.compile("|".join([
    r"(?<![\w.-])" + "shared" + r"/",     # the build machine's shared folder (relative or not)
    r"/" + "work" + r"/",                 # the build machine's work tree
    r"/" + "root" + r"/",
    r"/" + "home" + r"/[a-z]",
]))


def test_no_tracked_file_points_outside_the_repository():
    bad = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for n, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not bad, "paths outside the repository (ship the file, or describe it for any machine):\n" + \
        "\n".join(bad)
