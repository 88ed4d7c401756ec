"""The documentation a user reads holds together: its links resolve, its version is the package's,
and it speaks of jaxdit, not of how jaxdit is worked on."""

import pathlib
import re
import tomllib

import pytest

import jaxdit

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# Words of a working process, which a user cannot follow: "stop 37", "stop-35", "issue 19", "this session", "turn 3".
PROCESS_WORDS = re.compile(r"\bstops? [0-9]+|\bissue [0-9]+|\bstop-[0-9]+|\b(this|last|next|previous) session\b|\bturn [0-9]+", re.I)


def anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation but '-' and '_' dropped, spaces as '-'; repeats get -1, -2."""
    seen, found = {}, set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: pathlib.Path) -> list[str]:
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # relative: not https:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert page.is_file()
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_anchor_rules_match_github():
    page = ROOT / "docs" / "performance.md"
    assert "speed-switches" in anchors(page)  # "## Speed switches"
    assert links(ROOT / "README.md")  # the README links its manual


def test_version_is_one_and_has_a_changelog_entry():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert jaxdit.__version__ == version
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_documentation_speaks_of_jaxdit_not_of_how_it_is_worked_on():
    shipped = [*PAGES, *(ROOT / "jaxdit").rglob("*.py"), *(ROOT / "configs").glob("*.py"),
               *(ROOT / "benchmarks").glob("*"), ROOT / "train.py", ROOT / "sample.py"]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in shipped if path.is_file()
             for number, line in enumerate(path.read_text().splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert not found, "\n".join(found)
    assert PROCESS_WORDS.search("measured at stop 35") and PROCESS_WORDS.search("in the last session")
