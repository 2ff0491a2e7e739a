"""Command templates with the username in them, checked against the real /bin/sh; the runner."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lxdspawner.commands import (
    OUTPUT_LIMIT,
    UnsafeTemplate,
    check_template,
    expand_username,
    minimal_environment,
    run_on_hub,
)

SETTING = "post_hub_commands"
HOME = "/home/h u b"  # a space: "$HOME" unquoted would split

# Pieces of shell that break naive quoting, mixed with any text: NUL cannot be in an argv, and
# lone surrogates cannot be encoded (JupyterHub names arrive as UTF-8).
_DANGER = [";", "'", '"', "`", "$(", ")", "|", "\\", "\n", "\r", "$HOME", "${", "}", "#"]
_DANGER += ["touch x", ";>X;", "{USERNAME}", "{username}", "*", "~", "<<", " ", "é", "\u2028"]
_any_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))
usernames = st.lists(st.one_of(st.sampled_from(_DANGER), _any_text), max_size=8).map("".join)

ATTACKS = ["a;echo INJECTED;b", "r`touch x`r", "s$(touch x)s", 'u";touch x;"u', "'; touch x; '"]

MARKER = "QZMARKQZ"  # a harmless name, in no template: it can only come from the placeholder
few = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sh(command: str, *, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` with the real /bin/sh in an empty directory; it must stay empty."""
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env={"PATH": path, "HOME": HOME, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        assert os.listdir(cwd) == [], f"{command!r} created {os.listdir(cwd)}"
    return done


def printed(template: str, name: str) -> str:
    done = sh(expand_username(template, name, setting=SETTING))
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


# -- the username stays literal, in the real shell ------------------------------------------

TEMPLATES = [
    ("printf '%s\\n' x{USERNAME}y", "x{}y\n"),
    ("printf '%s\\n' 'x{USERNAME}y'", "x{}y\n"),
    ("printf '%s\\n' \"x{USERNAME}y\"", "x{}y\n"),
    ("printf '%s\\n' \"a $HOME\" 'b' x{username}y", f"a {HOME}\nb\nx{{}}y\n"),
    # Several placeholders, both spellings, each quoting, in one word.
    ("printf '%s\\n' {USERNAME}\"{username}\"'{USERNAME}'", "{}{}{}\n"),
    # Braces and expansions around it stay as they are.
    (
        "printf '%s\\n' \"{{USERNAME}}\" '${USERNAME}' \"${HOME}\"{username}",
        "{{}}\n${}\n" + HOME + "{}\n",
    ),
    # An escaped quote before it, a subshell, a pipe, a comment after it.
    ('( printf \'%s\\n\' "a\\"{USERNAME}" ) | cat # done', 'a"{}\n'),
    # A line continuation, && and a placeholder in a test.
    ("test -n x{USERNAME} && printf '%s\\n' \\\n  '<{USERNAME}>'", "<{}>\n"),
    # A bare name would join $x (becoming $xalice) or follow ~ (becoming a home directory).
    ("x=v; printf '%s\\n' $x{USERNAME} ~{USERNAME} a=~{username}", "v{}\n~{}\na=~{}\n"),
    # A command substitution before it that holds quotes and a ")".
    ("printf '%s\\n' \"$(echo ')')\"x{USERNAME}", ")x{}\n"),
]


@pytest.mark.parametrize("template, expected", TEMPLATES, ids=[t for t, _ in TEMPLATES])
@few
@given(name=usernames)
@example(name="")
@example(name="alice")  # shlex.quote would leave it bare
@example(name="root")
@example(name="{username}")  # not expanded again
@example(name="\\")
@example(name="'")
@example(name="a\nb\rc")
def test_the_shell_prints_the_username_literally(template, expected, name):
    check_template(template, setting=SETTING)
    assert printed(template, name) == expected.replace("{}", name)


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize(
    "template",
    [
        "printf '%s\\n' 'server started for {USERNAME}'",  # README's `logger '... {USERNAME}'`
        "printf '%s\\n' \"server started for {USERNAME}\"",
        "printf '%s\\n' server' 'started' 'for' '{USERNAME}",
    ],
)
def test_the_attacks_from_the_issue_print_the_name(template, name):
    assert printed(template, name) == f"server started for {name}\n"


def test_the_expansion_closes_and_reopens_the_quote():
    def expand(command: str, name: str) -> str:
        return expand_username(command, name, setting=SETTING)

    assert expand("logger 'for {USERNAME}'", "alice") == "logger 'for ''alice'''"
    assert expand('logger "for {username}"', "a'b") == 'logger "for "\'a\'"\'"\'b\'""'
    assert expand("mkdir /srv/{USERNAME}", "{username}") == "mkdir /srv/'{username}'"


def test_the_backquoted_example_is_refused_when_the_config_loads():
    command = "echo `id {USERNAME}`"
    with pytest.raises(ValueError) as refused:
        check_template(command, setting="post_hub_commands")
    assert str(refused.value) == (
        'post_hub_commands: {USERNAME} stands inside a command substitution in "echo `id '
        '{USERNAME}`"; it can only be used unquoted or inside plain single or double quotes. '
        'Use "$JUPYTERHUB_USER" instead (the username is in that environment variable).'
    )
    for name in ATTACKS:
        with pytest.raises(UnsafeTemplate, match=re.escape("$JUPYTERHUB_USER")):
            expand_username(command, name, setting="post_hub_commands")


# -- what is refused, and what is not -------------------------------------------------------

REFUSED = [
    ("echo `id {USERNAME}`", "inside a command substitution"),
    ('echo "`id {USERNAME}`"', "inside a command substitution"),
    ("echo $(id {USERNAME})", "inside a command substitution"),
    ("echo \"$(printf '%s' '{USERNAME}')\"", "inside a command substitution"),
    ("echo $(echo $(echo {username}))", "inside a command substitution"),
    ("echo ${HOME:-{USERNAME}}", "inside a parameter expansion"),
    ("echo ${USERNAME}", "inside a parameter expansion"),
    ('echo "${USERNAME}"', "inside a parameter expansion"),
    ("echo $((1 + {USERNAME}))", "inside an arithmetic expansion"),
    ("cat <<EOF\nhello {USERNAME}\nEOF", "after a here-document operator (<<)"),
    ("cat <<'EOF'\n'{USERNAME}'\nEOF", "after a here-document operator (<<)"),
    ("cat <<EOF > /tmp/{USERNAME}\nx\nEOF", "after a here-document operator (<<)"),
    ("echo $(cat <<EOF\n{USERNAME}\nEOF\n)", "after a here-document operator (<<)"),
    ("echo \\{USERNAME}", "right after a backslash"),
    ('echo "\\{USERNAME}"', "right after a backslash"),
    ("echo hi # for {USERNAME}", "inside a comment"),
    ("echo hi;# {USERNAME}\necho", "inside a comment"),
    ("echo $(true # ) {USERNAME}\n)", "inside a command substitution"),
]

UNSURE = [
    ("echo '{USERNAME}", "a single quote is never closed"),
    ("echo \"{USERNAME}' '", "a double quote is never closed"),
    ("echo {USERNAME} 'tail", "a single quote is never closed"),
    ("echo `{USERNAME}", "inside a command substitution"),  # refused before it is unclosed
    ("echo $(true {USERNAME}", "inside a command substitution"),
    ("echo $(date {USERNAME}", "inside a command substitution"),
    ("echo $(true; {USERNAME}", "inside a command substitution"),
    ("echo $(true ; echo) {USERNAME} $(echo", "a $( is never closed"),
    ("echo {USERNAME})", "a ) has no matching ("),
    ("(echo {USERNAME}", "a ( is never closed"),
    ("echo $(case a in a) echo;; esac) {USERNAME}", "case pattern"),
    ("echo $(case a in (a) echo;; esac) '{USERNAME}'", "case pattern"),
    ("echo \"${x:-'}'}\" {USERNAME}", "quote inside ${...}"),
    ("echo $(( (1) ) {USERNAME}", "inside $((...))"),
    ("echo $(( '1' )) {USERNAME}", "quote inside $((...))"),
    ("alias q=\"'\"\nq {USERNAME}'", "alias"),
    ("echo $'\\'' {USERNAME}", "$'...'"),
    ("((echo {USERNAME}))", "(("),
    ("echo {USERNAME} \\", "ends with a backslash"),
    # A backslash-newline joins tokens: "<<", "$(", "case".
    ("cat <\\\n<EOF\n{USERNAME}\nEOF", "a line ends with a backslash inside a word"),
    ('echo "$\\\n(echo ")" {USERNAME} ")"', "a line ends with a backslash inside a word"),
    ("echo $(ca\\\nse a in a) echo;; esac) {USERNAME}", "inside a word"),
]


@pytest.mark.parametrize("template, why", REFUSED + UNSURE, ids=[t for t, _ in REFUSED + UNSURE])
def test_refused(template, why):
    with pytest.raises(ValueError) as refused:
        check_template(template, setting="commands_to_prepare")
    message = str(refused.value)
    assert message.startswith("commands_to_prepare: ")
    assert why in message
    assert f'"{template}"' in message
    assert '"$JUPYTERHUB_USER" instead' in message
    with pytest.raises(UnsafeTemplate) as again:
        expand_username(template, "alice", setting="commands_to_prepare")
    assert str(again.value) == message


@pytest.mark.parametrize(
    "template",
    [
        "",
        "echo 'unterminated",
        'echo "$(case x in x) echo;; esac)"',
        "echo ${HOME} {a,b} {} {USER} {USERNAME",
        "cat <<EOF\n'\nEOF",
        "echo \\",
        "((1))",
        "alias q=echo",
        "echo `date` $((1 << 2)) # {USERNAMES}",
    ],
)
def test_a_command_without_placeholder_is_always_accepted_and_kept(template):
    check_template(template, setting=SETTING)
    assert expand_username(template, "x'y", setting=SETTING) == template


@pytest.mark.parametrize(
    "template",
    [
        "printf '%s\\n' 'a\\' {USERNAME}",  # no escapes in single quotes: the quote is closed
        "printf '%s\\n' '\\{USERNAME}'",
        "printf '%s\\n' a#b {USERNAME}",  # "#" inside a word is no comment
        "printf '%s\\n' $(echo x)#'{USERNAME}'",
        "printf '%s\\n' $((1 << 2)) {USERNAME}",  # a shift, not a here-document
        "printf '%s\\n' ${x#\\}} {USERNAME}",
        "printf '%s\\n' \"$(echo ')')\" {USERNAME}",
        "printf '%s\\n' $(# comment )\n) {USERNAME}",
        "case {USERNAME} in (*) printf '%s\\n' {USERNAME};; esac",
        "printf '%s\\n' $(echo $(echo a) \"b\") {USERNAME}",
    ],
)
def test_the_scanner_follows_dash(template):
    """Contexts where a naive scanner goes wrong: the name must still be printed as it is."""
    check_template(template, setting=SETTING)
    marker = sh(expand_username(template, MARKER, setting=SETTING)).stdout
    assert MARKER.encode() in marker
    for name in ATTACKS:
        assert sh(expand_username(template, name, setting=SETTING)).stdout == (
            marker.replace(MARKER.encode(), name.encode())
        )


# -- random templates: whatever is accepted behaves as with a harmless name -----------------

# Whole constructs, mostly, and single characters that unbalance them. No "case" (a pattern
# may match one name and not another), no "echo" (dash's echo reads backslashes in its
# arguments): either would let the name change the output, injection or not.
_ATOMS = [" ", "a", "1", "$HOME", "*", "{USERNAME}", "{username}", "\\'", '\\"', "\\\\", "\\$"]
_ATOMS += [";", "|", "&&", "\n", "\\\n", "${x:-b}", "$((1))", "$(:)", "`:`", "#", "<<", "alias "]
_RAW = ["'", '"', "`", "(", ")", "$(", "${x:-", "}", "$((", "\\", "$'", "$", "<"]


def _wrapped(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    parts = st.lists(inner, max_size=4).map("".join)
    return st.one_of(
        parts,
        parts.map(lambda s: f"'{s}'"),
        parts.map(lambda s: f'"{s}"'),
        parts.map(lambda s: f"$({s})"),
        parts.map(lambda s: f"`{s}`"),
        parts.map(lambda s: f"({s})"),
        parts.map(lambda s: "${x:-" + s + "}"),
    )


_leaves = st.sampled_from(_ATOMS * 3 + _RAW)
templates = (
    st.lists(st.recursive(_leaves, _wrapped, max_leaves=12), min_size=1, max_size=6)
    .map("".join)
    .filter(lambda t: "{USERNAME}" in t or "{username}" in t)
)
# Each holds a character no builtin's name has; ">X" needs no program to leave a file behind.
_HOSTILE = ATTACKS + _DANGER[:10] + [";>X;", "$(>X)", "`>X`", "'>X'", '">X"']
hostile = st.tuples(_any_text, st.sampled_from(_HOSTILE), _any_text).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=templates, name=hostile)
def test_an_accepted_random_template_treats_the_name_as_text(body, name):
    # "$$" is the shell's process id, the one thing two runs of one command print differently.
    assume("$$" not in body)
    template = "printf '[%s]\\n' " + body
    try:
        marked = expand_username(template, MARKER, setting=SETTING)
    except UnsafeTemplate:
        with pytest.raises(UnsafeTemplate):
            check_template(template, setting=SETTING)
        return
    # No PATH: only builtins run, so random words cannot start programs.
    expected = sh(marked, path="/nonexistent")
    got = sh(expand_username(template, name, setting=SETTING), path="/nonexistent")
    assert got.returncode == expected.returncode
    assert got.stdout == expected.stdout.replace(MARKER.encode(), name.encode())


# -- the environment and the runner on the hub host -------------------------------------------


def test_minimal_environment(monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    assert minimal_environment("ana", "lab") == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "JUPYTERHUB_USER": "ana",
        "JUPYTERHUB_SERVER_NAME": "lab",
    }
    monkeypatch.delenv("HOME")
    assert minimal_environment("ana", "")["HOME"] == "/"


async def test_the_hub_environment_does_not_reach_the_command(monkeypatch):
    monkeypatch.setenv("CONFIGPROXY_AUTH_TOKEN", "s3cret-token")
    monkeypatch.setenv("LXDSPAWNER_FAKE_SECRET", "s3cret")
    env = minimal_environment("ana maria", "")
    code, out = await run_on_hub("env", env=env, timeout=10)
    assert code == 0
    assert "s3cret" not in out
    seen = dict(line.split("=", 1) for line in out.splitlines())
    assert set(seen) - set(env) <= {"PWD"}  # dash exports the directory it runs in
    assert seen["JUPYTERHUB_USER"] == "ana maria"


async def test_exit_code_and_both_streams():
    code, out = await run_on_hub("echo out; echo err >&2; exit 3", env={}, timeout=10)
    assert (code, out) == (3, "out\nerr\n")


async def test_stdin_is_empty_and_output_is_decoded_leniently():
    code, out = await run_on_hub("cat; printf 'a\\377b'", env={}, timeout=10)
    assert (code, out) == (0, "a\ufffdb")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # killed, waiting for whoever inherited it to reap it


async def test_a_timeout_kills_the_command_and_its_children():
    started = time.monotonic()
    code, out = await run_on_hub(
        "sh -c 'sleep 30 & echo $!; sleep 30'", env=minimal_environment("a", ""), timeout=0.5
    )
    assert time.monotonic() - started < 3
    assert code is None
    child = int(out.split()[0])
    for _ in range(50):
        if _gone(child):
            break
        await asyncio.sleep(0.02)
    assert _gone(child)


async def test_cancelling_kills_the_command(tmp_path):
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(
        run_on_hub(f"echo $$ > {pidfile}; exec sleep 30", env={}, timeout=60)
    )
    for _ in range(500):  # the shell writes it at once; a file cannot be awaited
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(int(pidfile.read_text()))


async def test_output_is_capped_to_its_tail():
    command = "head -c 10000000 /dev/zero | tr '\\0' a; printf END"
    code, out = await run_on_hub(command, env=minimal_environment("a", ""), timeout=30)
    assert code == 0
    assert len(out) == OUTPUT_LIMIT
    assert out.endswith("aaaEND")


async def test_the_event_loop_keeps_running():
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    code, _ = await run_on_hub("sleep 0.3", env=minimal_environment("a", ""), timeout=10)
    ticker.cancel()
    assert code == 0
    assert ticks >= 10
