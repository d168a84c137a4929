"""The documentation reads as documentation: README.md stays short, every relative link in the
docs resolves to a file of the repository, README links nowhere outside it, no words a reader
cannot place, and one naming convention for docs/. Plain text checks: no torch, no server."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_MAX_LINES = 300


def doc_files() -> list[Path]:
    """README.md, docs/**/*.md and each model's handlers/<model>/README.md."""
    return [README, *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "handlers").glob("*/README.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (neither makes a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^\s>]+)>")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)


def links(text: str) -> list[str]:
    body = prose(text)
    return [*INLINE_LINK.findall(body), *REFERENCE_DEF.findall(body), *AUTOLINK.findall(body),
            *HTML_LINK.findall(body)]


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None or target.startswith("//")


def test_readme_is_at_most_300_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


# The one exception: the notice on TorchServe's status names its archived repository.
README_EXTERNAL_ALLOWED = {"https://github.com/pytorch/serve"}


def test_readme_links_nowhere_outside_the_repository():
    text = README.read_text(encoding="utf-8")
    outside = [t for t in links(text) if is_external(t)]
    bare = re.findall(r"https?://\S+", prose(text))  # GitHub turns a bare URL in prose into a link
    found = [t for t in outside + bare if t.rstrip(").,") not in README_EXTERNAL_ALLOWED]
    assert not found, f"README.md links outside the repository: {found}"
    assert README_EXTERNAL_ALLOWED <= {t.rstrip(").,") for t in outside + bare}, "the TorchServe notice lost its link"


def git_ignored(paths: list[Path]) -> set[Path]:
    """Those of `paths` that git ignores: they exist here but not in a clone."""
    if not paths or shutil.which("git") is None or not (REPO / ".git").exists():
        return set()
    listing = "\n".join(rel(p) for p in paths) + "\n"
    out = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--stdin"], input=listing,
                         capture_output=True, text=True, check=False).stdout
    return {REPO / line for line in out.splitlines() if line}


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_relative_links_resolve_to_files_of_the_repository(doc: Path):
    broken, found = [], []
    for target in links(doc.read_text(encoding="utf-8")):
        if is_external(target) or target.startswith("#"):
            continue
        path_part = re.split(r"[#?]", target, maxsplit=1)[0]
        base = REPO if path_part.startswith("/") else doc.parent
        path = (base / path_part.lstrip("/")).resolve()
        if REPO not in (path, *path.parents):
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(f"{target} (no such file)")
        else:
            found.append((target, path))
    ignored = git_ignored([p for _, p in found])
    broken += [f"{t} (git-ignored: not in a clone)" for t, p in found if p in ignored]
    assert not broken, f"{rel(doc)}: broken links: {broken}"


UNPLACEABLE = re.compile(r"\bsessions?\b|\blast run\b|\bbefore this session\b|\bthis issue\b", re.I)
# An issue number alone ("#22") says nothing in a clone; "owner/repo#123" names where it is.
BARE_ISSUE = re.compile(r"(?<![\w/.-])#\d+\b")


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_no_words_a_reader_cannot_place(doc: Path):
    text = doc.read_text(encoding="utf-8")
    hits = [m.group(0) for m in UNPLACEABLE.finditer(text)] + [m.group(0) for m in BARE_ISSUE.finditer(prose(text))]
    assert not hits, f"{rel(doc)} uses words a reader cannot place: {hits}"


NAME = r"[a-z0-9]+(?:-[a-z0-9]+)*"
FILE_NAME = re.compile(rf"^{NAME}(?:\.[a-z0-9]+)+$")  # docs/step-level-batching.md, docs/api/cam.schema.json
DIR_NAME = re.compile(rf"^{NAME}$")


def test_docs_file_names_are_lowercase_and_hyphenated():
    bad = [rel(p) for p in (REPO / "docs").rglob("*")
           if not (DIR_NAME if p.is_dir() else FILE_NAME).match(p.name)]
    assert not bad, f"docs/ file names must be lowercase and hyphenated (docs/step-level-batching.md): {bad}"


def test_the_link_checker_sees_links():
    """The checks above are only as good as the link parser."""
    sample = ("See [targets](docs/targets.md#gpu), ![ui](docs/ui/cam.png), <https://example.org>, "
              "`[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n[ref]: docs/kserve.md\n")
    assert links(sample) == ["docs/targets.md#gpu", "docs/ui/cam.png", "docs/kserve.md", "https://example.org"]
