"""The docs say what the tools do: relayctl(1) against relayctl's --help and
output, the README's exit codes against the man pages, examples/relayd.toml
against the defaults, and the man pages lint clean."""

from __future__ import annotations

import inspect
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
from typer.testing import CliRunner

from relayd import cli, cli_output
from relayd.config import PortSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
RELAYCTL_1 = (MAN / "relayctl.1").read_text()

# --- reading mdoc ------------------------------------------------------------------

_DELIMITERS = {"|", ",", ".", "...", "(", ")"}


def _is_macro(token: str) -> bool:
    return re.fullmatch(r"[A-Z][a-z][a-z]?", token) is not None


def section(text: str, name: str) -> list[str]:
    """The lines of ``.Sh name``, up to the next ``.Sh``."""
    lines = text.splitlines()
    start = lines.index(f".Sh {name}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(".Sh ")), len(lines))
    return lines[start:end]


def items(lines: list[str]) -> list[tuple[list[str], list[str]]]:
    """The top-level ``.It`` entries of a section's list: (header tokens, body lines).

    A header spans ``.It Xo`` … ``.Xc``; nested lists stay in the body.
    """
    out: list[tuple[list[str], list[str]]] = []
    depth = 0
    in_header = False
    for line in lines:
        if line.startswith(".Bl"):
            depth += 1
        elif line.startswith(".El"):
            depth -= 1
        if in_header:
            in_header = line != ".Xc"
            out[-1][0].extend(line.lstrip(".").split())
        elif depth == 1 and line.startswith(".It"):
            tokens = line.split()[1:]
            out.append((tokens, []))
            in_header = "Xo" in tokens
        elif out:
            out[-1][1].append(line)
    return out


def after(tokens: list[str], macro: str) -> list[list[str]]:
    """The words each ``macro`` in ``tokens`` takes, up to the next macro."""
    groups: list[list[str]] = []
    for i, token in enumerate(tokens):
        if token == macro:
            words = []
            for word in tokens[i + 1 :]:
                if _is_macro(word):
                    break
                if word not in _DELIMITERS:
                    words.append(word)
            groups.append(words)
    return groups


def flags(tokens: list[str]) -> set[str]:
    """``Fl -json`` is ``--json``, ``Fl p | -port`` is ``-p`` and ``--port``."""
    return {f"-{word}" for words in after(tokens, "Fl") for word in words}


def man_commands() -> dict[str, set[str]]:
    """relayctl(1)'s COMMANDS: each command with the options its entry shows."""
    commands = {}
    for header, _ in items(section(RELAYCTL_1, "COMMANDS")):
        names = after(header, "Cm")
        assert names, header
        commands[" ".join(names[0])] = flags(header)
    return commands


def man_columns(command: str = "ports list") -> list[str]:
    """The column names relayctl(1) lists under ``command`` (``.It Li "LAST USED"``)."""
    for header, body in items(section(RELAYCTL_1, "COMMANDS")):
        if after(header, "Cm")[:1] == [command.split()]:
            return [shlex.split(line)[2] for line in body if line.startswith(".It Li ")]
    raise AssertionError(f"relayctl(1) has no {command} entry")


def exit_codes(page: str) -> set[int]:
    return {int(header[0]) for header, _ in items(section(page, "EXIT STATUS"))}


# --- the tool's side ---------------------------------------------------------------


def tool_commands() -> tuple[set[str], dict[str, set[str]]]:
    """relayctl's global options, and each command with its options (as --help lists them)."""
    root = typer.main.get_command(cli.app)
    commands: dict[str, set[str]] = {}

    def options(command: Any) -> set[str]:
        return {
            opt
            for param in command.params
            if param.param_type_name == "option" and not param.hidden
            for opt in (*param.opts, *param.secondary_opts)
        }

    def walk(command: Any, path: str) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            commands[path] = options(command)
        for name, sub in (subcommands or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(root, "")
    return options(root) | {"-h", "--help"}, commands


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


# --- relayctl(1) --------------------------------------------------------------------


def test_every_command_and_option_is_in_the_man_page_and_only_those() -> None:
    global_options, commands = tool_commands()
    man_global = set().union(*(flags(h) for h, _ in items(section(RELAYCTL_1, "OPTIONS"))))
    assert man_global == global_options
    assert man_commands() == commands
    # What the tree holds is what --help shows.
    root_help = help_text()
    for option in global_options:
        assert option in root_help
    for path, options in commands.items():
        assert path.split()[0] in root_help
        command_help = help_text(*path.split())
        for option in options:
            assert re.search(rf"(?<![\w-]){re.escape(option)}\b", command_help), (path, option)


def _port(port: int, **fields: Any) -> dict[str, Any]:
    return {
        "port": port,
        "host": "0.0.0.0",
        "name": None,
        "framing": "lines",
        "max_connections": 64,
        "state": "listening",
        "source": "runtime",
        "connections": 0,
        "messages_received": 0,
        "bytes_received": 0,
        **fields,
    }


def _fake(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/status":
        return httpx.Response(200, json={"state": "ready", "ports": 1})
    return httpx.Response(200, json=[_port(8001, name="scale-1", max_connections=7)])


def test_ports_list_prints_the_columns_the_man_page_names() -> None:
    columns = man_columns()
    assert columns == list(cli_output.PORT_COLUMNS)
    listed = CliRunner().invoke(cli.app, ["ports", "list"], obj=httpx.MockTransport(_fake))
    header, row = listed.output.splitlines()
    assert header.split() == columns
    assert dict(zip(columns, row.split(), strict=False))["MAXCONN"] == "7"
    # status ends with the same table (relayctl(1), status).
    status = CliRunner().invoke(cli.app, ["status"], obj=httpx.MockTransport(_fake))
    assert status.output.splitlines()[-2:] == [header, row]


def test_tokens_list_prints_the_columns_the_man_page_names() -> None:
    columns = man_columns("tokens list")
    assert columns == list(cli_output.TOKEN_COLUMNS)
    token = {"name": "dash", "read": "*", "write": [8001], "created": "2026-11-30T09:00:00Z"}
    answer = httpx.MockTransport(lambda request: httpx.Response(200, json=[token]))
    listed = CliRunner().invoke(cli.app, ["tokens", "list"], obj=answer)
    header, row = listed.output.splitlines()
    assert header.split() == [word for column in columns for word in column.split()]
    starts = [header.index(column) for column in columns]
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    assert cells == ["dash", "all", "8001", "2026-11-30T09:00:00Z", "-", "-"]


def test_the_token_example_of_the_man_page_is_what_tokens_add_prints() -> None:
    example = "TOKEN=$(relayctl tokens add dashboard --read all)"
    assert example in section(RELAYCTL_1, "TOKENS")
    assert example in section(RELAYCTL_1, "EXAMPLES")
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"name": "dashboard", "read": "*", "token": "rlyd_x"})

    argv = shlex.split(example.removeprefix("TOKEN=$(").removesuffix(")"))[1:]
    kwargs: dict[str, Any] = {}
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        kwargs["mix_stderr"] = False  # click 8.1 (typer 0.15); later ones keep them apart
    added = CliRunner(**kwargs).invoke(cli.app, argv, obj=httpx.MockTransport(handle))
    assert (added.exit_code, added.stdout) == (0, "rlyd_x\n")
    assert [json.loads(r.content) for r in seen] == [{"name": "dashboard", "read": "*"}]


def test_exit_codes_in_the_man_pages_and_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    relayctl_codes = exit_codes(RELAYCTL_1)
    assert relayctl_codes == {
        0,
        cli_output.EXIT_REFUSED,
        cli_output.EXIT_USAGE,
        cli_output.EXIT_UNAVAILABLE,
        cli_output.EXIT_INTERRUPTED,
    }
    paragraphs = re.split(r"\n\s*\n", readme)
    relayctl_part = next(p for p in paragraphs if p.startswith("Exit codes:"))
    relayd_part = next(p for p in paragraphs if p.startswith("`relayd` exits"))
    for codes, part in (
        (relayctl_codes, relayctl_part),
        (exit_codes((MAN / "relayd.8").read_text()), relayd_part),
    ):
        said = {int(n) for n in re.findall(r"(?<![\w.-])(\d+)(?![\w.%-])", part)}
        assert codes <= said, part


# --- examples/relayd.toml -----------------------------------------------------------


def test_the_example_config_holds_the_defaults_but_for_its_hosts_and_ports() -> None:
    example = tomllib.loads((ROOT / "examples" / "relayd.toml").read_text())
    defaults = Settings().model_dump()
    for table in ("http", "admin", "auth", "defaults", "relay", "drain"):
        for key, value in example[table].items():
            if key != "host":
                assert value == defaults[table][key], f"[{table}] {key}"
    assert example["http"]["host"] != defaults["http"]["host"]  # what the header says
    first = example["ports"][0]
    port_defaults = PortSettings(port=first["port"]).model_dump()
    # every key, but those whose default is "unset" (shown as comments)
    assert set(first) == {k for k, v in port_defaults.items() if v is not None} | {"name"}
    for key, value in first.items():
        if key not in ("port", "host", "name"):
            assert value == port_defaults[key], f"[[ports]] {key}"


# --- the man pages ------------------------------------------------------------------


@pytest.mark.parametrize("page", sorted(p.name for p in MAN.iterdir()))
def test_man_page_lints_clean(page: str) -> None:
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        pytest.skip("mandoc is not installed (apt-get install mandoc)")
    lint = subprocess.run(
        [mandoc, "-T", "lint", "-W", "warning", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
