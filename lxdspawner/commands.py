"""The operators' shell command templates, with the username put in safely, and the hub-side runner.

``commands_to_prepare`` (in the container) and ``post_hub_commands`` (on the hub host, often as
root) are ``/bin/sh -c`` strings written by the operator, in which ``{USERNAME}`` (or
``{username}``) stands for the JupyterHub username: text the user chose, anything but ``/``.
``shlex.quote`` alone keeps it one literal word only where it stands unquoted: inside
``'...'``, ``"..."`` or backquotes its quotes close the operator's, and the rest of the name
runs as shell (``logger 'started for {USERNAME}'`` with the name ``'; touch x; '``).

So a small scanner follows POSIX sh (dash) quoting up to each placeholder, and the quoted name
is spliced in so that it stays one literal piece of the word it stands in: unquoted, or inside
plain single or double quotes of the top-level command. Anywhere else (a command
substitution, ``${...}``, ``$((...))``, after ``<<``, in a comment, after a backslash) the
template is refused, and so it is wherever the scanner cannot be sure of the quoting (an
unterminated quote, a ``)`` it cannot match, ``case`` inside ``$(...)``): the error names the
setting and points at ``"$JUPYTERHUB_USER"``, which the commands get in their environment.
The guarantee is about this shell's reading of the command: a program that reads its argument
as shell again (``eval``, ``sh -c``, ``su -c``, ``ssh``) gets the name as text and must quote
it itself.

``run_on_hub`` runs a hub-side command with the environment of ``minimal_environment``, never
the hub's own (which holds the proxy token, the cookie secret, database and cloud
credentials), keeps only the tail of its output, and on timeout kills its whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

PLACEHOLDERS = ("{USERNAME}", "{username}")

#: PATH for hub-side commands: the system directories, never the hub's own (a virtualenv, a
#: user's ~/bin).
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The most of a hub-side command's output kept in memory: its last 64 KiB.
OUTPUT_LIMIT = 64 * 1024

_CHUNK = 64 * 1024


class UnsafeTemplate(ValueError):
    """A command template in which the username cannot be put safely, whatever it is."""


# -- the context scanner ------------------------------------------------------------------


class _Kind(Enum):
    TOP = "the command"
    SINGLE = "a single quote"
    DOUBLE = "a double quote"
    BACKQUOTE = "a backquote"
    COMMAND = "a $("
    ARITHMETIC = "a $(("
    PARAMETER = "a ${"
    COMMENT = "a comment"


# Where a placeholder may not stand, as the error says it.
_REFUSED = {
    _Kind.BACKQUOTE: "inside a command substitution",
    _Kind.COMMAND: "inside a command substitution",
    _Kind.ARITHMETIC: "inside an arithmetic expansion",
    _Kind.PARAMETER: "inside a parameter expansion",
    _Kind.COMMENT: "inside a comment",
}

# The frames whose text the shell reads as commands: there "#", "<<", "(" and ")" mean
# something. Backquotes also hold commands, but their end is only the next unescaped
# backquote (dash reads no quotes while looking for it), and nothing inside them is accepted.
_CODE = (_Kind.TOP, _Kind.COMMAND)

# After these a new token starts, so a "#" there begins a comment (dash: "echo >#x" is a
# syntax error, "echo a#b" prints "a#b").
_TOKEN_ENDS = frozenset(" \t\n;&|<>()")

# Words that change how the rest is read: a case pattern's ")" inside $(...) does not close
# it, and an alias may expand to an unbalanced quote on the following lines.
_RESERVED = re.compile(r"(case|alias)(?=[ \t\n;&|()<>]|\Z)")


@dataclass
class _Frame:
    kind: _Kind
    parens: int = 0  # "(" open in this frame: subshells in code, groups in $((...))
    word_start: bool = True  # in code: the next character starts a token


@dataclass(frozen=True)
class _Placeholder:
    start: int
    text: str
    kind: _Kind  # TOP, SINGLE or DOUBLE: how the quoted name is spliced in


class _Refusal(Exception):
    def __init__(self, placeholder: str, *, where: str = "", reason: str = "") -> None:
        super().__init__(where or reason)
        self.placeholder = placeholder
        self.where = where
        self.reason = reason


def _placeholder_at(command: str, i: int) -> str | None:
    for text in PLACEHOLDERS:
        if command.startswith(text, i):
            return text
    return None


def _first_placeholder(command: str) -> str | None:
    found = [(command.find(text), text) for text in PLACEHOLDERS if text in command]
    return min(found)[1] if found else None


def _nested(stack: list[_Frame]) -> str:
    """Why a placeholder cannot stand here, or "" if it may (top level, or plain quotes)."""
    for frame in stack[1:]:
        if frame.kind in _REFUSED:
            return _REFUSED[frame.kind]
    return ""


def _scan(command: str) -> list[_Placeholder]:
    """Every placeholder with the quoting it stands in; _Refusal if one cannot be put safely."""
    first = _first_placeholder(command)
    if first is None:
        return []

    def unsure(reason: str) -> _Refusal:
        return _Refusal(first, reason=reason)

    found: list[_Placeholder] = []
    stack = [_Frame(_Kind.TOP)]

    def push(kind: _Kind) -> None:
        stack[-1].word_start = False  # whatever it opened is part of the current word
        stack.append(_Frame(kind))

    def pop() -> None:
        stack.pop()
        stack[-1].word_start = False

    i, n = 0, len(command)
    while i < n:
        frame, kind = stack[-1], stack[-1].kind
        placeholder = _placeholder_at(command, i)
        if placeholder is not None:
            where = _nested(stack)
            if where:
                raise _Refusal(placeholder, where=where)
            found.append(_Placeholder(i, placeholder, kind))
            frame.word_start = False
            i += len(placeholder)
            continue
        c, after = command[i], command[i + 1 : i + 2]

        if kind is _Kind.SINGLE:  # no escapes: only the next "'" ends it
            if c == "'":
                pop()
            i += 1
            continue
        if kind is _Kind.COMMENT:  # up to the newline, which the frame below reads
            if c == "\n":
                stack.pop()
            else:
                i += 1
            continue

        if c == "\\":
            # "\{USERNAME}" would become "\'name'": the escaped quote opens a new one.
            escaped = _placeholder_at(command, i + 1)
            if escaped is not None:
                raise _Refusal(escaped, where=_nested(stack) or "right after a backslash")
            if not after:
                raise unsure("it ends with a backslash")
            if after == "\n":
                # A backslash-newline is removed before tokens are read, so it can join "$"
                # and "(", "<" and "<", "ca" and "se": only one after a blank is left alone.
                if i and command[i - 1] not in " \t\n":
                    raise unsure("a line ends with a backslash inside a word")
            else:
                frame.word_start = False
            i += 2
            continue
        if kind is _Kind.BACKQUOTE:
            if c == "`":
                pop()
            i += 1
            continue
        if c == "$":
            if command.startswith("$((", i):
                push(_Kind.ARITHMETIC)
                i += 3
            elif after == "(":
                push(_Kind.COMMAND)
                i += 2
            elif after == "{":
                inner = _placeholder_at(command, i + 1)
                # "${USERNAME}" names a shell variable; spliced, it would be $'...' (bash: C-style).
                if inner is not None:
                    raise _Refusal(inner, where=_REFUSED[_Kind.PARAMETER])
                push(_Kind.PARAMETER)
                i += 2
            elif after == "'" and kind in _CODE:
                raise unsure("it has $'...', which bash reads as C-style quoting and dash does not")
            else:
                frame.word_start = False
                i += 1
            continue
        if c == "`":
            push(_Kind.BACKQUOTE)
            i += 1
            continue

        if kind is _Kind.DOUBLE:
            if c == '"':
                pop()
            i += 1
            continue
        if kind is _Kind.PARAMETER:
            if c == "}":
                pop()
            elif c in "'\"":
                # dash reads "${x:-'}'}" as ''} and ${x:-'}'} as }: quotes in ${...} differ.
                raise unsure("a quote inside ${...} is read differently inside double quotes")
            i += 1
            continue
        if kind is _Kind.ARITHMETIC:
            if c == "(":
                frame.parens += 1
            elif c == ")" and frame.parens:
                frame.parens -= 1
            elif c == ")":
                if after != ")":
                    raise unsure("a ) inside $((...)) has no matching (")
                pop()
                i += 1
            elif c in "'\"":
                raise unsure("a quote inside $((...)) is read differently by different shells")
            i += 1
            continue

        # Code: the top level or the inside of $(...).
        if c == "'":
            push(_Kind.SINGLE)
        elif c == '"':
            push(_Kind.DOUBLE)
        elif c == "#" and frame.word_start:
            stack.append(_Frame(_Kind.COMMENT))
        elif c == "<" and after == "<":
            # The here-document's body is read with other rules (quotes mean nothing in it,
            # its end is a line of its own): refuse every placeholder from here on.
            rest = _first_placeholder(command[i:])
            if rest is not None:
                raise _Refusal(rest, where="after a here-document operator (<<)")
            return found
        elif c == "(":
            if after == "(":
                raise unsure("it has ((, which bash reads as arithmetic and dash as two subshells")
            frame.parens += 1
            frame.word_start = True
        elif c == ")":
            if frame.parens:
                frame.parens -= 1
                frame.word_start = True
            elif kind is _Kind.COMMAND:
                pop()
            else:
                raise unsure("a ) has no matching (")
        elif c in _TOKEN_ENDS:
            frame.word_start = True
        else:
            word = _RESERVED.match(command, i) if frame.word_start else None
            if word is not None and word.group(1) == "alias":
                raise unsure("it defines an alias, which changes how the next lines are read")
            if word is not None and kind is _Kind.COMMAND:
                raise unsure("a case pattern's ) inside $(...) does not close it")
            frame.word_start = False
        i += 1

    if stack[-1].kind is _Kind.COMMENT:  # a comment may end with the command
        stack.pop()
    if len(stack) > 1:
        raise unsure(f"{stack[-1].kind.value} is never closed")
    if stack[0].parens:
        raise unsure("a ( is never closed")
    return found


_INSTEAD = '"$JUPYTERHUB_USER" instead (the username is in that environment variable).'


def _message(command: str, setting: str, refusal: _Refusal) -> str:
    if refusal.where:
        return (
            f'{setting}: {refusal.placeholder} stands {refusal.where} in "{command}"; it can only '
            f"be used unquoted or inside plain single or double quotes. Use {_INSTEAD}"
        )
    return (
        f'{setting}: cannot tell where {refusal.placeholder} stands in "{command}": '
        f"{refusal.reason}. Change that, or use {_INSTEAD}"
    )


def _placeholders(command: str, setting: str) -> list[_Placeholder]:
    try:
        return _scan(command)
    except _Refusal as refusal:
        raise UnsafeTemplate(_message(command, setting, refusal)) from None


def check_template(command: str, *, setting: str) -> None:
    """Raise the UnsafeTemplate (a ValueError) that expand_username would raise for any name."""
    _placeholders(command, setting)


def quote(username: str) -> str:
    """``username`` in single quotes, always: ``shlex.quote`` without its bare form.

    ``shlex.quote`` leaves a name such as ``alice`` bare, and a bare name is no longer literal
    where it joins what precedes it: ``$HOME{USERNAME}`` would become ``$HOMEalice`` (another
    variable), ``~{USERNAME}`` a home directory.
    """
    return "'" + username.replace("'", "'\"'\"'") + "'"


def expand_username(command: str, username: str, *, setting: str) -> str:
    """``command`` with each placeholder replaced by ``username`` as one literal piece of its word.

    Unquoted, the placeholder becomes ``quote(username)``; inside single or double quotes, the
    quote is closed around it: ``'x{USERNAME}'`` → ``'x''<quoted>''``. Nothing else in the
    command changes. Raises UnsafeTemplate (a ValueError) naming ``setting`` where no quoting
    can be sure to hold.
    """
    quoted = quote(username)
    pieces: list[str] = []
    end = 0
    # One pass over the template: a username that contains "{username}" is not expanded again.
    for placeholder in _placeholders(command, setting):
        close = {_Kind.SINGLE: "'", _Kind.DOUBLE: '"'}.get(placeholder.kind, "")
        pieces += [command[end : placeholder.start], close, quoted, close]
        end = placeholder.start + len(placeholder.text)
    pieces.append(command[end:])
    return "".join(pieces)


# -- running on the hub host --------------------------------------------------------------


def minimal_environment(username: str, server_name: str) -> dict[str, str]:
    """The whole environment of a hub-side command: a fixed PATH, the locale, HOME, the names."""
    return {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME") or "/",
        "JUPYTERHUB_USER": username,
        "JUPYTERHUB_SERVER_NAME": server_name,
    }


def _kill_group(pgid: int) -> None:
    # The shell leads its own session and group (start_new_session): killing the group also
    # ends what it started in the background, which would otherwise hold the pipe open.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_on_hub(
    command: str, *, env: Mapping[str, str], timeout: float
) -> tuple[int | None, str]:
    """Run ``/bin/sh -c command``; return its exit code (None on timeout) and its output's tail.

    stdout and stderr are read together, in chunks, and only the last OUTPUT_LIMIT bytes are
    kept. The command is over when the shell has exited and its output is closed: a background
    job still writing to it counts as part of it (redirect its output to let it outlive the
    command). On timeout, or if the caller is cancelled, the whole process group is killed.
    """
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    output = bytearray()

    async def collect() -> int:
        while chunk := await stdout.read(_CHUNK):
            output.extend(chunk)
            del output[:-OUTPUT_LIMIT]
        return await proc.wait()

    returncode: int | None = None
    try:
        returncode = await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        # Timed out or cancelled: nothing of the command may outlive this call.
        if returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return returncode, output.decode(errors="replace")


async def run_post_hub_commands(
    templates: list[str],
    username: str,
    server_name: str,
    *,
    timeout: float,
    log: logging.Logger,
    label: str,
) -> None:
    """``post_hub_commands``, one after the other, each logged with its output's tail: an
    error for a refused template, a timeout or a failure (the server runs anyway)."""
    env = minimal_environment(username, server_name)
    for command in templates:
        try:
            line = expand_username(command, username, setting="post_hub_commands")
        except ValueError as e:
            log.error("%s", e)
            continue
        code, output = await run_on_hub(line, env=env, timeout=timeout)
        output = output[-2000:].strip() or "(no output)"
        if code is None:
            log.error(
                "post_hub_commands for %s: %r killed after %g s (post_hub_command_timeout): %s",
                label,
                command,
                timeout,
                output,
            )
        elif code:
            log.error(
                "post_hub_commands for %s: %r failed with exit code %s: %s",
                label,
                command,
                code,
                output,
            )
        else:
            log.info("post_hub_commands for %s: %r: %s", label, command, output)
