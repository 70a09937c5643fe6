"""The pages and the tools: README.md stays one screenful, every relative link of the pages resolves (files,
folders and #anchors), no page cites what a reader cannot open, no tracked file names a machine's folders, and
every script in tools/ starts (its --help) against the project as it is now."""
import re
import subprocess
import unicodedata

import pytest

from conftest import REPO, load_tool

README_MAX_LINES = 200
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "results").rglob("README.md")])
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)  # fenced code: neither links nor headings
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\s[^>]*\bsrc=\"([^\"]+)\"")
MACHINE_PATH = re.compile(r"(?<![\w.~])/(work|home|root|media|mnt|Users)/")


def prose(path):
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path):
    """GitHub's ids of a Markdown file's headings: lower case, no punctuation, spaces to hyphens, -1 if repeated."""
    seen, ids = {}, set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), re.M):
        slug = "".join(c for c in title.lower() if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    for name in names.decode().split("\0"):
        path = REPO / name
        if name and path.is_file() and path.stat().st_size < 2**21:
            try:
                yield name, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # weights, images
                continue


def test_readme_is_one_screenful_of_sections():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move details to docs/ or results/"
    sections = [line[3:] for line in lines if line.startswith("## ")]
    order = ["Quick start", "Counting your own images", "For learners: the tutorial, file by file",
             "Training and evaluation", "Results", "Tests"]  # the first screen's order; others may come between
    assert [s for s in sections if s in order] == order, sections


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for match in LINK.finditer(prose(page)):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if REPO not in path.parents and path != REPO:
            broken.append(f"{target}: outside the repository")
        elif not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that id in {path.relative_to(REPO)}")
    assert not broken, broken


def test_link_checker_finds_what_is_broken(tmp_path):
    """The checks above, on a page made to fail them: a missing file, a missing anchor, a link split over lines."""
    (tmp_path / "other.md").write_text("# A title: with `code`, and punctuation!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-title-with-code-and-punctuation) [ok](other.md#twice-1) [a\nsplit](missing.md)\n"
                    "[no](other.md#nowhere) <img src=\"gone.png\">\n```bash\n[not a link](in-code.md)\n```\n")
    assert anchors(tmp_path / "other.md") == {"a-title-with-code-and-punctuation", "twice", "twice-1"}
    assert [m.group(1) or m.group(2) for m in LINK.finditer(prose(page))] == [
        "other.md#a-title-with-code-and-punctuation", "other.md#twice-1", "missing.md", "other.md#nowhere", "gone.png"]


def test_pages_cite_nothing_a_reader_cannot_open():
    """An issue number means nothing to a reader of the repository: say what the goal or the change was."""
    found = [f"{name}: {m.group(0)}" for name, text in tracked_text_files()
             if name.split("/")[0] in ("README.md", "docs", "results", "tools")
             for m in re.finditer(r"(?i)\bissues?\s*#?\d+", text)]
    assert not found, found


def test_no_tracked_file_names_a_machines_folders():
    found = [f"{name}: {m.group(0)}" for name, text in tracked_text_files() if name != "tests/test_docs.py"  # below
             for m in [MACHINE_PATH.search(text)] if m]
    assert not found, found
    assert MACHINE_PATH.search("cd /work/main") and MACHINE_PATH.search("P=/home/me/venv/bin/python")
    assert not MACHINE_PATH.search("BCCD_DIR=/path/to/BCCD python -m pytest") and not MACHINE_PATH.search("./work/x")


def test_results_holds_records_only():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "results").rglob("*") if p.suffix in (".py", ".sh"))
    assert not scripts, f"scripts belong in tools/: {scripts}"


@pytest.mark.parametrize("tool", sorted((REPO / "tools").glob("*.py")), ids=lambda p: p.name)
def test_python_tool_imports_the_project_and_shows_its_help(tool, capsys):
    module = load_tool(tool.stem)  # its imports of the project's modules resolve
    with pytest.raises(SystemExit) as done:
        module.get_args_parser().parse_args(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted((REPO / "tools").glob("*.sh")), ids=lambda p: p.name)
def test_shell_tool_shows_its_usage_and_does_nothing_else(tool, tmp_path):
    before = sorted(REPO.iterdir())
    result = subprocess.run(["bash", str(tool), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"tools/{tool.name}" in result.stdout, result.stdout + result.stderr
    assert sorted(REPO.iterdir()) == before and not any(tmp_path.iterdir())
