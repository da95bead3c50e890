"""The README, docs/ and the READMEs beside the code: every relative link reaches a file (and a heading,
for `#anchor` links), the README stays a short front page that starts with `make demo` and `make test`,
and the results tables copied into the docs are the committed ones. Plain text checks: no torch, no model."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "cpu-study" / "tables"
README_MAX_LINES = 200


# Other READMEs that link into the docs, checked too so that a moved page or heading shows up here.
LINKED_READMES = ("config/README.md", "benchmarks/README.md", "results/cpu-study/README.md")


def doc_files(root=ROOT):
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")), *(root / name for name in LINKED_READMES)]
    return [f for f in files if f.is_file()]


FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def prose_lines(text):
    """(line number, line) outside fenced code blocks, inline code spans blanked."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)


def slug(heading):
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path):
    """Every anchor GitHub makes for a Markdown file: heading slugs (repeats get -1, -2, ...) and <a id>."""
    seen, found = {}, set()
    text = path.read_text()
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fenced:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path, root=ROOT):
    """'file:line: target (why)' for each relative link of a Markdown file that reaches nothing."""
    problems = []
    for number, line in prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if root.resolve() not in (dest, *dest.parents):
                problems.append(f"{where} (outside the repository)")
            elif not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return problems


def test_the_docs_exist():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    assert "README.md" in names
    assert {"docs/cluster.md", "docs/gpu.md", "docs/results.md", "docs/development.md"} <= names


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(path):
    assert broken_links(path) == []


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page: τ and `code`\n\n## Twice\n\n## Twice\n")
    (tmp_path / "README.md").write_text(
        "# t\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#a-page-τ-and-code) [ok](docs/page.md#twice-1) [ok](#t)\n"
        "[gone](docs/missing.md) ![gone](fig.png)\n"
        "[no anchor](docs/page.md#twice-2) [no anchor here](#nothing)\n"
        "[web](https://example.org/x.md) `[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n")
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/missing.md (no such file)", "fig.png (no such file)",
        "docs/page.md#twice-2 (no heading with anchor #twice-2 in page.md)",
        "#nothing (no heading with anchor #nothing in README.md)"]


@pytest.mark.parametrize("heading, anchor", [
    ("Results: the CPU study", "results-the-cpu-study"),
    ("0b. Fetch: the Hub's files into the cache, on the login node",
     "0b-fetch-the-hubs-files-into-the-cache-on-the-login-node"),
    ("The sparse FFN on CUDA", "the-sparse-ffn-on-cuda"),
    ("`make gpu-check` and **more**", "make-gpu-check-and-more"),
    ("Pilots on SmolLM2-135M (200 steps of 4 × 256, bf16 autocast, 2 CPU cores)",
     "pilots-on-smollm2-135m-200-steps-of-4--256-bf16-autocast-2-cpu-cores"),
])
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_the_readme_is_a_short_front_page_that_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move text to docs/"
    body = [line for line in lines[1:] if line.strip()]  # after the title
    assert lines[0].startswith("# ") and body[0].startswith("```")
    commands = [line.split("#")[0].strip() for line in body[1:3]]
    assert commands == ["make demo", "make test"], body[:4]


def markdown_table(text):
    """{first cell: {column: cell}} of a Markdown table."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.strip().splitlines() if line.strip().startswith("|")]
    header, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set(":- ")]
    return {r[0]: dict(zip(header, r)) for r in body}


@pytest.mark.skipif(not TABLES.is_dir(), reason="results/cpu-study not committed")
def test_tables_copied_into_the_docs_are_the_committed_ones():
    """A `<!-- NAME:start -->` block holds rows and columns of results/cpu-study/tables/NAME.md, cell for cell;
    `<!-- RUN/NAME:start -->` those of results/RUN/tables/NAME.md."""
    blocks = 0
    for path in doc_files():
        for key, block in re.findall(r"<!-- ((?:[\w-]+/)?\w+):start -->\n(.*?)<!-- \1:end -->", path.read_text(), re.S):
            blocks += 1
            run, _, name = key.rpartition("/")
            tables = ROOT / "results" / run / "tables" if run else TABLES
            committed = markdown_table((tables / f"{name}.md").read_text())
            shown = markdown_table(block)
            assert shown, f"{path.name}: empty {name} block"
            for key, row in shown.items():
                assert key in committed, f"{path.name}: {name} row {key!r} is not in tables/{name}.md"
                for column, cell in row.items():
                    assert committed[key].get(column) == cell, f"{path.name}: {name} {key} {column}: {cell}"
    assert blocks >= 2  # the README's claims, docs/results.md's Table 1
