"""The README and docs/ stay true to the code.

* Every octa3d command in a fenced ``bash`` block (``python main.py ...``, ``octa3d ...``, ``torchrun ... main.py
  ...``, ``docker run ... octa3d [python main.py | octa3d] ...``) parses with the real parser: flags exist under
  their exact names (argparse would also accept abbreviations), values are valid choices, and, where the command
  holds no placeholder, :func:`octa3d.cli.parse_config` accepts it (types, ranges and cross-flag rules; it touches
  no file unless ``--config`` is given, which is left out of that check). ``make X`` names a Makefile target and
  ``python -m benchmarks.X`` an existing benchmark.
* Every relative link (and ``#anchor``, by GitHub's heading slugs) of README.md and docs/**/*.md resolves.
* docs/reference/cli.md is what ``python docs/gen_cli.py`` writes today, and docs/index.md lists every page.
* README.md stays at most 250 lines.

Shell handling: ``\\`` continuations, ``#`` comments, ``VAR=value`` prefixes and assignments (``E="--exp x"``,
then ``python main.py $E ...`` in the same block), several commands per block or line (``;``, ``&&``, ``||``,
``|``, ``&``), redirects (``> log.txt``, ``2>&1``). Placeholders such as ``<exp>`` and unknown ``$VARS`` are fine
as values (the command is then checked at argparse level only), never as flag names; ``...`` marks elided
arguments and is ignored.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from octa3d.cli import build_parser, parse_config
from octa3d.errors import Octa3dError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]
MAX_README_LINES = 250
SHELL_LANGS = {"bash", "sh", "shell"}


# ------------------------------------------------------------------------------------------------ markdown
@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the first content line
    lines: list[str]


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def fenced_blocks(text: str) -> list[Block]:
    """Fenced code blocks (also indented ones inside list items), with their language and first line."""
    blocks, cur, fence = [], None, ""
    for no, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if cur is None:
            if m:
                fence, cur = m.group(2), Block(m.group(3).lower(), no + 1, [])
        elif m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3):
            blocks.append(cur)
            cur = None
        else:
            cur.lines.append(line)
    return blocks


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], ""
    for no, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if not fence:
            if m:
                fence = m.group(2)
            else:
                out.append((no, line))
        elif m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3):
            fence = ""
    return out


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced blocks, with inline code spans blanked out."""
    return [(no, re.sub(r"(`+)(.+?)\1", lambda c: " " * len(c.group(0)), line)) for no, line in _outside_fences(text)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but '-' and '_' removed,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file offers: heading slugs (repeats get -1, -2 ...) and explicit id/name."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for _, line in _outside_fences(text):
        m = _HEADING.match(line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    found |= set(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", text))
    return found


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def links(text: str) -> list[tuple[int, str]]:
    out = []
    for no, line in prose_lines(text):
        for rx in (_LINK, _HTML):
            out += [(no, m.group(1)) for m in rx.finditer(line)]
        m = _REFDEF.match(line)
        if m:
            out.append((no, m.group(1)))
    return out


# ------------------------------------------------------------------------------------------------ commands
@dataclass
class Command:
    line: int
    text: str  # as written (continuations joined, whitespace collapsed)
    tokens: list[str]


_PLACEHOLDER = re.compile(r"<[A-Za-z][\w.,/:=+-]*>")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = {";", "&&", "||", "|", "&", "|&"}
_MARKS: dict[str, str] = {}  # sentinel token -> the placeholder it stands for


def _mark(m: re.Match) -> str:
    sentinel = f"PLACEHOLDER{len(_MARKS)}X"
    _MARKS[sentinel] = m.group(0)
    return sentinel


def _restore(text: str) -> str:
    return re.sub(r"PLACEHOLDER\d+X", lambda m: _MARKS.get(m.group(0), m.group(0)), text)


def _strip_comment(line: str) -> str:
    """The line without a shell comment (a '#' that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """Shell lines of a block: comments dropped, ``\\`` continuations joined."""
    out, buf, start = [], "", 0
    for offset, raw in enumerate(block.lines):
        line = _strip_comment(raw).rstrip()
        if not buf:
            start = block.line + offset
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, " ".join(buf.split())))
        buf = ""
    if buf.strip():
        out.append((start, " ".join(buf.split())))
    return out


def split_commands(block: Block) -> list[Command]:
    """Simple commands of a shell block, with redirects removed and placeholders made single tokens."""
    commands = []
    for no, text in logical_lines(block):
        marked = _PLACEHOLDER.sub(_mark, text)
        lex = shlex.shlex(marked, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        lex.commenters = ""
        try:
            tokens = list(lex)
        except ValueError as exc:  # unbalanced quotes
            commands.append(Command(no, text, ["__unparsable__", str(exc)]))
            continue
        cur: list[str] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in _SEPARATORS:
                if cur:
                    commands.append(Command(no, text, cur))
                cur = []
            elif tok and set(tok) <= set("<>&"):  # a redirect: drop it, its target and an fd number before it
                if cur and cur[-1].isdigit():
                    cur.pop()
                i += 1  # the target (a file, or the fd after >&)
            else:
                cur.append(tok)
            i += 1
        if cur:
            commands.append(Command(no, text, cur))
    return commands


def _expand(tokens: list[str], env: dict[str, str]) -> list[str]:
    out: list[str] = []
    for tok in tokens:
        m = re.fullmatch(r"\$(?:\{(\w+)\}|(\w+))", tok)
        name = m and (m.group(1) or m.group(2))
        if name and name in env:
            out += shlex.split(env[name])
        else:
            out.append(re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                              lambda v: env.get(v.group(1) or v.group(2), v.group(0)), tok))
    return [t for t in out if t not in ("...", "…")]


def octa3d_argv(tokens: list[str]) -> list[str] | None:
    """The octa3d arguments of a simple command (env prefixes already dropped), or None if it is no octa3d run."""
    if not tokens:
        return None
    if tokens[0] == "octa3d":
        return tokens[1:]
    for i, tok in enumerate(tokens):
        if tok == "main.py" or tok.endswith("/main.py"):
            return tokens[i + 1:]
    if tokens[0] == "docker" and "run" in tokens and "octa3d" in tokens[tokens.index("run") + 1:]:
        image = tokens.index("octa3d", tokens.index("run") + 1)
        rest = tokens[image + 1:]
        return octa3d_argv(rest) if rest else []  # no command: the image's `octa3d --help`
    return None


class _ParseError(Exception):
    pass


def _strict_parser():
    parser = build_parser()

    def error(message: str) -> None:
        raise _ParseError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


_PARSER = _strict_parser()
_OPTIONS = set(_PARSER._option_string_actions)


def check_argv(argv: list[str]) -> str | None:
    """Why ``argv`` is not a valid octa3d command line, or None."""
    for tok in argv:
        if tok == "--":
            break
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            if flag not in _OPTIONS:
                return f"unknown flag {_restore(flag)}"
    args = [a for a in argv if a not in ("-h", "--help", "--version")]
    try:
        _PARSER.parse_args(args)
    except _ParseError as exc:
        return _restore(str(exc))
    if any("PLACEHOLDER" in a or "$" in a for a in args):
        return None  # values stand for something: argparse-level checks only
    if "--config" in args:  # parse_config would read the file
        i = args.index("--config")
        args = args[:i] + args[i + 2:]
    args = [a for a in args if not a.startswith("--config=")]
    try:
        parse_config(args)
    except Octa3dError as exc:
        return str(exc)
    except SystemExit as exc:  # pragma: no cover - argparse already accepted it above
        return f"argparse exit {exc.code}"
    return None


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {t for line in text.splitlines() if (m := re.match(r"^([\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)", line))
            for t in m.group(1).split()}


def check_block(path: Path, block: Block) -> tuple[int, list[str]]:
    """(octa3d commands checked, failures as 'file:line: command: error') of one shell block."""
    rel = path.relative_to(ROOT)
    env: dict[str, str] = {}
    failures, checked = [], 0
    for cmd in split_commands(block):
        where = f"{rel}:{cmd.line}: {_restore(cmd.text)}"
        if cmd.tokens[0] == "__unparsable__":
            failures.append(f"{where}: cannot split it as a shell command ({cmd.tokens[1]})")
            continue
        tokens = list(cmd.tokens)
        if tokens[0] == "export":
            tokens = tokens[1:]
        assigns = []
        while tokens and _ASSIGN.match(tokens[0]):
            assigns.append(tokens.pop(0))
        if not tokens:  # E="--exp x ...": a variable later commands of the block use
            env.update(a.split("=", 1) for a in assigns)
            continue
        tokens = _expand(tokens, env)
        argv = octa3d_argv(tokens)
        if argv is not None:
            checked += 1
            why = check_argv(argv)
            if why:
                failures.append(f"{where}: {why}")
        elif tokens[0] == "make":
            missing = [t for t in tokens[1:] if not t.startswith("-") and not _ASSIGN.match(t)
                       and t not in _makefile_targets()]
            if missing:
                failures.append(f"{where}: no Makefile target {', '.join(missing)}")
        elif len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("benchmarks."):
            module = ROOT / (tokens[2].replace(".", "/") + ".py")
            if not module.is_file():
                failures.append(f"{where}: no module {tokens[2]} ({module.relative_to(ROOT)} does not exist)")
    return checked, failures


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_commands_parse(path: Path) -> None:
    """Every octa3d command shown in a bash block is one the CLI accepts."""
    failures = []
    for block in fenced_blocks(path.read_text(encoding="utf-8")):
        if block.lang in SHELL_LANGS:
            failures += check_block(path, block)[1]
    assert not failures, "commands the CLI refuses:\n" + "\n".join(failures)


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_links_resolve(path: Path) -> None:
    """Relative links point at existing files (inside the repository) and anchors at existing headings."""
    rel = path.relative_to(ROOT)
    failures = []
    for no, target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        file_part = urllib.parse.unquote(file_part)
        dest = path if not file_part else ((ROOT / file_part.lstrip("/")) if file_part.startswith("/")
                                           else path.parent / file_part).resolve()
        if not dest.is_relative_to(ROOT):
            failures.append(f"{rel}:{no}: {target}: outside the repository")
        elif not dest.exists():
            failures.append(f"{rel}:{no}: {target}: no such file ({dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and urllib.parse.unquote(anchor).lower() not in anchors(dest):
            failures.append(f"{rel}:{no}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not failures, "broken links:\n" + "\n".join(failures)


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current() -> None:
    gen = _gen_cli()
    current = gen.OUT.read_text(encoding="utf-8") if gen.OUT.is_file() else ""
    assert current == gen.render(), (f"docs/reference/cli.md is stale (the parser changed): regenerate it with "
                                     f"`{gen.REGENERATE}` (or `make docs`) and commit it")


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


def test_index_lists_every_page() -> None:
    index = DOCS / "index.md"
    listed = {(index.parent / urllib.parse.unquote(t.partition("#")[0])).resolve()
              for _, t in links(index.read_text(encoding="utf-8")) if t.partition("#")[0]}
    missing = [str(p.relative_to(ROOT)) for p in DOC_FILES[1:] if p != index and p.resolve() not in listed]
    assert not missing, f"docs/index.md does not link: {', '.join(missing)}"


def test_readme_commands_are_checked() -> None:
    """The checker sees the README's pipeline (a guard against it silently matching nothing)."""
    path = ROOT / "README.md"
    n = sum(check_block(path, b)[0] for b in fenced_blocks(path.read_text(encoding="utf-8"))
            if b.lang in SHELL_LANGS)
    assert n >= 8, f"only {n} octa3d commands found in README.md bash blocks"


# ------------------------------------------------------------------------------------------------ the checker
def _failures(text: str) -> list[str]:
    block = Block("bash", 1, text.splitlines())
    return check_block(ROOT / "README.md", block)[1]


@pytest.mark.parametrize("text", [
    'python main.py --mode train --exp x --epochs 3',
    'E="--exp x --dim 3d"\npython main.py $E --mode test  # comment --nope',
    'octa3d --mode predict --input <scans> --exp <exp> --cam none',
    'OMP_NUM_THREADS=1 python main.py --mode test --exp x > log.txt 2>&1 && echo done',
    'python main.py --mode train \\\n    --exp x --lr 1e-3',
    'docker run --gpus all -v $PWD/runs:/workspace/runs octa3d python main.py --mode prepare --exp x',
    'docker run --rm octa3d',
    'torchrun --nproc_per_node=2 main.py --mode train --exp x ...',
    'make test',
])
def test_checker_accepts(text: str) -> None:
    assert _failures(text) == []


@pytest.mark.parametrize("text, why", [
    ("python main.py --mode trian", "invalid choice"),
    ("python main.py --mode train --epocs 3", "unknown flag --epocs"),
    ("python main.py --mode train --epoch 3", "unknown flag --epoch"),  # an abbreviation argparse would take
    ("python main.py --mode train --input-size 48 256 256", "unrecognized arguments"),
    ("python main.py --mode train --epochs three", "--epochs"),
    ("python main.py --mode predict --external /x", "--external"),
    ("octa3d --mode test --<flag> 1", "unknown flag --<flag>"),
    ("echo hi; python main.py --mode nope", "invalid choice"),
    ("make nosuchtarget", "no Makefile target"),
])
def test_checker_refuses(text: str, why: str) -> None:
    failures = _failures(text)
    assert len(failures) == 1 and why in failures[0], failures
    assert failures[0].startswith("README.md:1: ")
