"""The shell commands of the READMEs, as argument lists, without running anything.

Every fenced block of a README tagged as shell (or not tagged) is read as a small shell script:
backslash line continuations, quotes spanning lines, `;`, `&&`, `||` and `|` between commands,
`NAME=value` assignments (also as a command's prefix, like `OMP_NUM_THREADS=1 python ...`),
`$NAME` / `${NAME}` expansion, and `for NAME in WORDS; do ... done` loops, which yield their body
once per word so that every value is checked. `if`/`while` bodies are yielded once. Redirections
are dropped. Nothing is executed; unknown variables stay as written (`$X`).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
SKIPPED_DIRS = {"runs", "node_modules", "__pycache__"}
SEPARATORS = {";", "&&", "||", "|", "&", "\n"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>", "2>", "2>>"}
NAME_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Command:
    """One simple command of a README: where it is and its words after expansion."""
    path: Path
    line: int
    argv: tuple[str, ...]

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def readmes(root: Path = ROOT) -> list[Path]:
    """Every README.md of the repository, outside hidden and generated folders."""
    found = []
    for path in sorted(root.rglob("README.md")):
        parts = path.relative_to(root).parts[:-1]
        if not any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the first body line, body) of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language, start = match.group(1), match.group(2).lower(), i + 1
        i = start
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append((language, start + 1, "\n".join(lines[start:i])))
        i += 1
    return blocks


def _tokens(script: str) -> list[tuple[int, str]]:
    """(line offset, word or operator); an unquoted newline becomes the operator "\\n"."""
    out, pending, first = [], "", 0
    for offset, raw in enumerate(script.split("\n")):
        raw = raw[2:] if raw.startswith("$ ") and not pending else raw  # a console prompt
        pending = f"{pending}\n{raw}" if pending else raw
        if pending.endswith("\\"):  # a line continuation joins the lines
            pending = pending[:-1]
            continue
        text = re.sub(r"(?<=\s)\d>&\d(?=\s|$)", "", pending)  # 2>&1
        text = re.sub(r"(?<=\s)\d(?=>)", "", text)  # 2> file: the file is dropped with the ">"
        try:
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
        except ValueError:  # a quote closes on a later line
            continue
        out += [(first, w) for w in words] + [(first, "\n")]
        pending, first = "", offset + 1
    if pending:
        raise ValueError(f"unclosed quote or trailing backslash in: {pending[:80]}")
    return out


def _statements(script: str) -> list[tuple[int, list[str]]]:
    """The simple statements of a script, with the line offset where each starts."""
    statements, words, start = [], [], 0
    tokens = iter(_tokens(script))
    for offset, word in tokens:
        if word in SEPARATORS:
            if words:
                statements.append((start, words))
            words = []
        elif word in REDIRECTIONS:
            next(tokens, None)
        else:
            if not words:
                start = offset
            words.append(word)
    return statements


def expand(word: str, env: dict) -> list[str]:
    """A word after variable expansion; a lone `$NAME` is split into words as the shell does."""
    whole = VARIABLE.fullmatch(word)
    if whole:
        name = whole.group(1) or whole.group(2)
        return shlex.split(env[name]) if name in env else [word]
    return [VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)]


def _parse(statements, i=0, closing=None):
    """Nested nodes: ("run", offset, words) or ("loop", offset, name, words, body)."""
    nodes = []
    while i < len(statements):
        offset, words = statements[i]
        i += 1
        while words and words[0] in ("do", "then", "else", "elif", "if", "{", "}"):
            words = words[1:]
        if not words:
            continue
        if words[0] in ("done", "fi"):
            if closing == words[0]:
                return nodes, i
            continue
        if words[0] in ("for", "while", "until"):
            body, i = _parse(statements, i, closing="done")
            if words[0] == "for" and len(words) >= 3 and words[2] == "in":
                nodes.append(("loop", offset, words[1], words[3:], body))
            else:  # a condition: its body is checked once
                nodes.append(("loop", offset, None, [""], [("run", offset, words[1:])] + body))
            continue
        nodes.append(("run", offset, words))
    return nodes, i


def _run(nodes, env, path, first_line, out):
    for node in nodes:
        if node[0] == "loop":
            _, _, name, words, body = node
            for value in [w for word in words for w in expand(word, env)]:
                _run(body, {**env, name: value} if name else env, path, first_line, out)
            continue
        _, offset, words = node
        if words[0] == "export":
            words = words[1:]
        assignments = 0
        while assignments < len(words) and NAME_VALUE.match(words[assignments]):
            assignments += 1
        if assignments == len(words):  # assignments only: they set variables
            for word in words:
                name, value = word.split("=", 1)
                env[name] = " ".join(expand(value, env))
            continue
        argv = tuple(w for word in words[assignments:] for w in expand(word, env))
        out.append(Command(path, first_line + offset, argv))


def script_commands(script: str, path: Path = ROOT / "README.md", first_line: int = 1) -> list[Command]:
    """The simple commands a shell script would run, loops unrolled, in order."""
    nodes, _ = _parse(_statements(script))
    out: list[Command] = []
    _run(nodes, {}, path, first_line, out)
    return out


def readme_commands(root: Path = ROOT) -> list[Command]:
    """Every command of every shell block of every README, each distinct one once."""
    seen, commands = set(), []
    for path in readmes(root):
        for language, line, body in fenced_blocks(path.read_text()):
            if language in SHELL_LANGUAGES:
                for command in script_commands(body, path, line):
                    if (path, command.argv) not in seen:
                        seen.add((path, command.argv))
                        commands.append(command)
    return commands
