"""Offline benchmark tasks built from held-out Python stdlib text (lm-eval YAML in this folder).

Held-out rule (the same order as `dsmoe.data`): the data module sorts a source's documents by
SHA-1 of a stable key (a stdlib file's path relative to the stdlib, POSIX style; a pydoc topic's
name) and fills validation from the front of that order. These tasks use only documents whose
SHA-1 hex digest starts with "0": the first 1/16 of that order, inside validation whenever a
source's validation holds 1/16 of its documents or more (always with the paper-sized configs,
where validation is capped at half a source). Items are then picked with `random.Random(key)`,
so a build is deterministic for one Python version. The JSONL shipped in `data/` was built with
Python 3.11; `python -m dsmoe.evaluation.tasks.stdlib` rebuilds it.

- `dsmoe_stdlib_nextline`: multiple choice, the true next line of code after up to 12 lines of
  context, among 3 other lines of the same file.
- `dsmoe_pydoc_cloze`: LAMBADA-style, predict the last word of a prose passage (a paragraph cut
  after a sentence): the held-out pydoc topics first, then docstrings of held-out stdlib files.
"""

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELD_OUT_BELOW = "1"  # SHA-1 hex digests below this are held out: the first 1/16
MAX_ITEMS = 200
CONTEXT_LINES = 12
MAX_CONTEXT_CHARS = 800
ITEMS_PER_FILE = 6
MIN_LINE_CHARS = 12


def held_out(key):
    return hashlib.sha1(key.encode()).hexdigest() < HELD_OUT_BELOW


def stdlib_files(root=None):
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]):
            yield rel.as_posix(), path


def _usable(line):
    stripped = line.strip()
    return len(stripped) >= MIN_LINE_CHARS and not stripped.startswith("#")


def next_line_items(root=None, max_items=MAX_ITEMS):
    items = []
    for key, path in stdlib_files(root):
        if not held_out(key):
            continue
        lines = [line.rstrip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        usable = [i for i, line in enumerate(lines) if _usable(line)]
        targets = [i for i in usable if i >= CONTEXT_LINES]
        rng = random.Random(key)
        for i in sorted(rng.sample(targets, min(ITEMS_PER_FILE, len(targets)))):
            pool = sorted({lines[j] for j in usable if abs(j - i) > 2 * CONTEXT_LINES and lines[j].strip() != lines[i].strip()})
            if len(pool) < 3:
                continue
            context = "\n".join(lines[i - CONTEXT_LINES:i])
            context = context[-MAX_CONTEXT_CHARS:].split("\n", 1)[-1] if len(context) > MAX_CONTEXT_CHARS else context
            choices = rng.sample(pool, 3)
            gold = rng.randrange(4)
            choices.insert(gold, lines[i])
            items.append({"id": f"{key}:{i + 1}", "context": context, "choices": choices, "gold": gold})
            if len(items) == max_items:
                return items
    return items


def prose_paragraphs(text):
    """Paragraphs of running prose: no indented lines (grammar, code), no headings."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith(" ") for line in lines) or any(set(line) <= set("*=-") for line in lines):
            continue
        yield " ".join(line.strip() for line in lines)


def docstrings(path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def prose_texts(root=None):
    """`(key, text)`: held-out pydoc topics, then the docstrings of held-out stdlib files."""
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        if held_out(topic):
            yield topic, topics[topic]
    for key, path in stdlib_files(root):
        if held_out(key):
            for n, doc in enumerate(docstrings(path)):
                yield f"{key}#{n}", doc


def cloze_items(root=None, max_items=MAX_ITEMS, min_context_words=20):
    items = []
    for key, text in prose_texts(root):
        for n, paragraph in enumerate(prose_paragraphs(text)):
            words = paragraph.split()
            if sum(w.strip('.,;:()"').isalpha() for w in words) < 0.8 * len(words):
                continue  # mostly code or symbols
            # every sentence end is a candidate passage end: the passage runs from the paragraph start
            for match in re.finditer(r"(?<![\w.])([A-Za-z]{4,})\.(?=\s|$)", paragraph):
                context, target = paragraph[:match.start(1)].rstrip(), match.group(1)
                if len(context.split()) >= min_context_words:
                    items.append({"id": f"{key}:{n}:{match.start(1)}", "context": context, "target": target})
                    if len(items) == max_items:
                        return items
    return items


BUILDERS = {"stdlib_nextline": next_line_items, "pydoc_cloze": cloze_items}


def jsonl_path(name):
    return DATA_DIR / f"{name}.jsonl"


def build(name, out=None):
    """Write task `name`'s JSONL (atomically) and return its path."""
    from ...atomic import atomic_file

    out = Path(out or jsonl_path(name))
    with atomic_file(out) as handle:
        for item in BUILDERS[name]():
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    out.chmod(0o644)
    return out


def _load(name):
    import datasets

    path = jsonl_path(name)
    if not path.exists():
        build(name)
    return datasets.load_dataset("json", data_files={"test": str(path)})


def load_next_line(**kwargs):
    """lm-eval `custom_dataset` of `dsmoe_stdlib_nextline` (kwargs: the task metadata, unused)."""
    return _load("stdlib_nextline")


def load_cloze(**kwargs):
    """lm-eval `custom_dataset` of `dsmoe_pydoc_cloze`."""
    return _load("pydoc_cloze")


if __name__ == "__main__":
    for task in sys.argv[1:] or BUILDERS:
        print(build(task))
