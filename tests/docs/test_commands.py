"""The commands in README.md and docs/ name real things: make targets, CLI subcommands, flags, gRPC methods.

Which lines are commands (the rule): inside a fenced code block whose info string is empty or a
shell (sh, bash, shell, console), lines ending in a backslash are joined to the next, and each
line is split at ``;``, ``&&``, ``||`` and ``|`` into segments. A segment is checked when its first
word (after any ``NAME=value`` assignments, and with ``$NAME`` expanded from assignments earlier in
the block) is ``make``, a console script (``recognizer``, ``aggregator``, ``edge_agent``,
``fedocr-pki``), ``python -m MODULE`` or ``grpcurl``, bare or under ``.venv/bin/``. Everything else
(comments, program output, tables, ``kubectl``, ``docker``, file listings) is not a command here.
Code blocks tagged toml, yaml, json and the like are configuration, not commands.

What is checked: ``make X`` names a Makefile target and ``make VAR=value`` a Makefile variable; a
console script's subcommand and every ``-flag`` appear in that command's real ``--help`` output
(run once per command); ``python -m MODULE`` runs ``--help`` and its flags appear there;
``grpcurl``'s own flags appear in ``grpcurl -help``, and every ``fedocr.v1.Service/Method`` (or
``describe fedocr.v1.Name``) exists in proto/fedocr/v1/*.proto, ``grpc.health.v1`` in the health
service. The generated experiment reports are left out: their text is written by a program.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONSOLE_SCRIPTS = ("recognizer", "aggregator", "edge_agent", "fedocr-pki")
PYTHONS = ("python", "python3")
SHELL_TAGS = ("", "sh", "bash", "shell", "console")
SEPARATORS = (";", "&&", "||", "|")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
GRPC_SYMBOL = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*\.[A-Z]\w*(?:[/.][A-Z]\w*)?$")


def _documents() -> list[Path]:
    """README.md and the hand-written pages under docs/ (generated experiment reports left out)."""
    pages = sorted((ROOT / "docs").rglob("*.md"))
    generated = re.compile(r"^(results(-.+)?|experiment-.+)\.md$")
    return [ROOT / "README.md", *(p for p in pages if not generated.match(p.name))]


# Finding the commands


@dataclass(frozen=True)
class Command:
    """One checked segment of a command line: where it is and its words (``argv[0]`` bare)."""

    where: str
    argv: tuple[str, ...]


def fenced_lines(text: str) -> Iterator[tuple[int, int, str]]:
    """(block number, line number, logical line) in shell-like fenced blocks, continuations joined."""
    tag: str | None = None
    block, pending, start = 0, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            tag = None if tag is not None else stripped[3:].strip().lower()
            block, pending = block + 1, ""
            continue
        if tag is None or tag not in SHELL_TAGS:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield block, start, pending + stripped
        pending = ""


def _program(word: str) -> str:
    """``.venv/bin/recognizer`` -> ``recognizer``; anything else unchanged."""
    return word.removeprefix(".venv/bin/")


def _is_checked(program: str) -> bool:
    return program in ("make", "grpcurl", *CONSOLE_SCRIPTS, *PYTHONS)


def _split_segments(line: str) -> list[list[str]]:
    """Shell words of ``line`` (comments dropped), cut at ; && || and |."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for word in lexer:
        if word in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


def _expand(word: str, variables: dict[str, str]) -> list[str]:
    """``word`` with ``$NAME``/``${NAME}`` replaced; a bare ``$NAME`` splits into its words."""
    bare = re.fullmatch(r"\$\{?(\w+)\}?", word)
    if bare and bare.group(1) in variables:
        return shlex.split(variables[bare.group(1)])
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), word)]


def commands(text: str, name: str) -> list[Command]:
    """The checked commands of a Markdown text (the rule is in this module's docstring)."""
    found: list[Command] = []
    variables: dict[str, str] = {}
    current = -1
    for block, number, line in fenced_lines(text):
        if block != current:
            current, variables = block, {}
        first = line.split(maxsplit=1)[0] if line.strip() else "#"
        if not (_is_checked(_program(first)) or first.startswith("$") or ASSIGNMENT.match(first)):
            continue
        for segment in _split_segments(line):
            while segment and ASSIGNMENT.match(segment[0]):
                key, _, value = segment.pop(0).partition("=")
                variables[key] = " ".join(_expand(value, variables))
            words = [w for word in segment for w in _expand(word, variables)]
            if words and _is_checked(_program(words[0])):
                found.append(Command(f"{name}:{number}", (_program(words[0]), *words[1:])))
    return found


# What is real


# One process imports torch once and forks a child per module for ``python -m MODULE --help``:
# three modules import torch at the top, and importing it three times would take most of the test.
MODULE_HELP_RUNNER = r"""
import importlib.util, json, os, runpy, sys
found, real = {}, []
for module in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(module)
    except ImportError as exc:
        spec = exc
    if spec is None or isinstance(spec, ImportError):
        found[module] = [1, f"No module named {module}: {spec}"]
    else:
        real.append(module)
if real:
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
for module in real:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        sys.argv = [module, "--help"]
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as out:
        text = out.read().decode(errors="replace")
    found[module] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text]
print(json.dumps(found))
"""
_module_help: dict[str, tuple[int, str]] = {}


def run_module_helps(modules: Iterable[str]) -> None:
    """``python -m MODULE --help`` for every module not yet run, in one process (see above)."""
    todo = sorted(set(modules) - set(_module_help))
    if todo:
        done = subprocess.run(
            [sys.executable, "-c", MODULE_HELP_RUNNER, *todo],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            check=True,
        )
        _module_help.update({m: (code, text) for m, (code, text) in json.loads(done.stdout).items()})


@cache
def help_text(argv: tuple[str, ...]) -> tuple[int, str]:
    """Exit status and output (stdout and stderr) of one help command, run once per session."""
    if argv[:2] == (sys.executable, "-m"):
        run_module_helps([argv[2]])
        return _module_help[argv[2]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done.returncode, done.stdout + done.stderr


@cache
def make_names() -> tuple[frozenset[str], frozenset[str]]:
    """(targets, variables) of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    for phony in re.findall(r"^\.PHONY:(.*)$", text, re.M):
        targets.update(phony.split())
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.M))
    return frozenset(targets), frozenset(variables)


@cache
def grpc_symbols() -> frozenset[str]:
    """Fully qualified services, methods (``Service/Method``), messages and enums a grpcurl may name."""
    symbols = set()
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M)
        prefix = package.group(1) + "." if package else ""
        symbols.update(prefix + n for n in re.findall(r"^\s*(?:message|enum)\s+(\w+)", text, re.M))
        for service, body in re.findall(r"^service\s+(\w+)\s*\{(.*?)^\}", text, re.M | re.S):
            symbols.add(prefix + service)
            symbols.update(f"{prefix}{service}/{m}" for m in re.findall(r"\brpc\s+(\w+)\s*\(", body))
    for service in health_pb2.DESCRIPTOR.services_by_name.values():
        symbols.add(service.full_name)
        symbols.update(f"{service.full_name}/{m.name}" for m in service.methods)
    return frozenset(symbols)


def _flags(words: Iterable[str]) -> list[str]:
    """The option words (``--x``, ``-x``, ``--x=v`` as ``--x``) among ``words``."""
    return [w.split("=", 1)[0] for w in words if re.match(r"^--?[A-Za-z]", w)]


def _missing_flags(words: Iterable[str], text: str) -> list[str]:
    return [f for f in _flags(words) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


def help_argv(command: Command) -> tuple[str, ...] | None:
    """The help command whose output must name ``command``'s subcommand and flags, if it has one."""
    program, args = command.argv[0], command.argv[1:]
    if program in CONSOLE_SCRIPTS:
        sub = args[:1] if args and not args[0].startswith("-") else ()
        return (str(BIN / program), *sub, "--help")
    if program in PYTHONS and len(args) >= 2 and args[0] == "-m":
        return (sys.executable, "-m", args[1], "--help")
    if program == "grpcurl":
        return (str(BIN / "grpcurl"), "-help")
    return None


def problems(command: Command) -> list[str]:
    """What in ``command`` names nothing real: empty when every part checks out."""
    program, args = command.argv[0], list(command.argv[1:])
    where = f"{command.where}: {shlex.join(command.argv)}"
    if program == "make":
        targets, variables = make_names()
        unknown = [a for a in args if not a.startswith("-") and "=" not in a and a not in targets]
        unknown += [a for a in args if "=" in a and a.split("=", 1)[0] not in variables]
        return [f"{where}: not in the Makefile: {' '.join(unknown)}"] if unknown else []
    argv = help_argv(command)
    if argv is None:
        return [f"{where}: python without -m MODULE"]
    status, text = help_text(argv)
    if program == "grpcurl":
        found = [f"{where}: grpcurl has no flag {f}" for f in _missing_flags(args, text)]
        symbols = [a for a in args if GRPC_SYMBOL.match(a)]
        return found + [f"{where}: no such gRPC symbol {s}" for s in symbols if s not in grpc_symbols()]
    if program in CONSOLE_SCRIPTS and len(argv) == 3:
        usage = text.split("\n\n", 1)[0]
        if status != 0 or not re.search(rf"\s{re.escape(argv[1])}(\s|$)", usage):
            return [f"{where}: {program} has no subcommand {argv[1]!r}: {text.strip()[-300:]}"]
    if status != 0:
        return [f"{where}: {shlex.join(argv[1:])} failed ({status}): {text.strip()[-300:]}"]
    words = args[2:] if program in PYTHONS else args
    return [f"{where}: {program} --help names no {f}" for f in _missing_flags(words, text)]


def _all_commands() -> dict[str, list[Command]]:
    return {str(p.relative_to(ROOT)): commands(p.read_text(), str(p.relative_to(ROOT))) for p in _documents()}


@pytest.fixture(scope="module")
def every_help() -> None:
    """Run every help command the documents need up front: the modules in one process, the rest
    two at a time (all cached for the checks)."""
    needed = {a for cmds in _all_commands().values() for c in cmds if (a := help_argv(c))}
    run_module_helps(a[2] for a in needed if a[:2] == (sys.executable, "-m"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(help_text, sorted(needed)))


# The documents


@pytest.mark.parametrize("name", [str(p.relative_to(ROOT)) for p in _documents()])
def test_every_command_in_the_documents_names_real_things(name: str, every_help: None) -> None:
    found = commands((ROOT / name).read_text(), name)

    wrong = [p for c in found for p in problems(c)]

    assert wrong == []


def test_the_readme_gives_the_two_commands_first_and_stays_short() -> None:
    text = (ROOT / "README.md").read_text()
    found = commands(text, "README.md")

    assert [c.argv for c in found[:2]] == [("make", "demo"), ("make", "test")]
    assert text.index("make demo") < text.index("\n## ")
    assert len(text.splitlines()) <= 200


def test_the_documents_hold_commands_of_every_kind() -> None:
    found = [c.argv[0] for cmds in _all_commands().values() for c in cmds]

    assert {"make", "grpcurl", "python", *CONSOLE_SCRIPTS} <= set(found)
    assert len(found) >= 40


def _anchors(page: Path) -> set[str]:
    """The anchors a Markdown renderer gives the headings of ``page`` (lower case, punctuation gone)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.strip().startswith("```")
        heading = re.match(r"^#{1,6}\s+(.+)$", line)
        if heading and not fenced:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_links_between_the_documents_lead_to_files_and_headings() -> None:
    broken = []
    for page in _documents():
        for path, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            target = page.parent / path if path else page
            if "://" in path:
                continue
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
                broken.append(f"{page.relative_to(ROOT)} -> {path}#{anchor}")

    assert broken == []


# The checker itself


def _one(line: str) -> Command:
    (command,) = commands(f"```\n{line}\n```\n", "doc.md")
    return command


def test_a_made_up_flag_is_caught() -> None:
    command = _one(".venv/bin/recognizer train --data d --out m.npz --no-such-flag 3")

    assert [p.split(": ")[-1] for p in problems(command)] == ["recognizer --help names no --no-such-flag"]


def test_a_real_command_passes() -> None:
    command = _one(".venv/bin/aggregator serve --config deploy/aggregator.toml --encoding int2")

    assert problems(command) == []


@pytest.mark.parametrize(
    "line, expected",
    [
        ("recognizer retrain --data d", "has no subcommand 'retrain'"),
        ("edge_agent keygenerate --out k", "has no subcommand 'keygenerate'"),
        ("make demo-fast", "not in the Makefile: demo-fast"),
        ("make experiment SCALES=smoke", "not in the Makefile: SCALES=smoke"),
        ("python -m benchmarks.learning --rowz default", "names no --rowz"),
        ("python -m benchmarks.no_such_module", "failed"),
        ("$G 127.0.0.1:50051 fedocr.v1.Federation/GetRounds", "no such gRPC symbol fedocr.v1.Fed"),
        ("grpcurl -certfile x 127.0.0.1:1 list", "grpcurl has no flag -certfile"),
    ],
)
def test_drifted_commands_are_caught(line: str, expected: str) -> None:
    text = f'```\nG="grpcurl -cacert ca.pem"\n{line}\n```\n'
    (command,) = commands(text, "doc.md")

    found = problems(command)

    assert len(found) == 1 and expected in found[0]


def test_comments_output_and_configuration_are_not_commands() -> None:
    text = "\n".join(
        [
            "```",
            "# make no-such-target",
            "round  state edges up wire MB",
            "    1 CLOSED     3       2.29",
            "kubectl apply -k deploy/k8s",
            "```",
            "```toml",
            'recognizer = "train --bogus"',
            "```",
            "```",
            "make demo   # a trailing comment --bogus",
            "```",
        ]
    )

    assert [c.argv for c in commands(text, "doc.md")] == [("make", "demo")]


def test_continuation_lines_and_separators_make_whole_commands() -> None:
    text = "```\nP=pki; .venv/bin/fedocr-pki edge \\\n    --dir $P --name edge-0 && make lint\n```\n"

    found = commands(text, "doc.md")

    assert [c.argv for c in found] == [
        ("fedocr-pki", "edge", "--dir", "pki", "--name", "edge-0"),
        ("make", "lint"),
    ]
    assert [c.where for c in found] == ["doc.md:2", "doc.md:2"]
