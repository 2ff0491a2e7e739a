"""``lxdspawner image build``'s pure parts: the recipe file and its checks, the cache key, the
spec handed to build-custom.sh, the metadata and the command line. The build itself and the
import run against the real Incus in tests/integration/test_imagebuild.py."""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

import pytest
import yaml

from lxdspawner import cli, imagebuild, imagerecipe
from lxdspawner.imagerecipe import RecipeError

BASE = "637475e8fd294d2326f64f9e5831ce35de3a3e97b28a02c870429f2b5e5e0b03"
BUILDER = b"#!/bin/bash\n# build-custom.sh\n"


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "motd.txt").write_text("hello\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.cfg").write_text("a = 1\n")
    (tmp_path / "post.sh").write_text("#!/bin/sh\necho done > /etc/marker\n")
    return tmp_path


def write(directory: Path, text: str, name: str = "datascience.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


FULL = """\
alias: ds
description: Data science
packages: [jq, graphviz, "libfoo1=1.2-3", "bar/bookworm-backports"]
pip: [tabulate, "pandas>=2.2", "numpy==2.*"]
files:
  - {src: motd.txt, dest: /etc/motd, mode: "0644"}
  - {src: conf, dest: /etc/conf.d/}
script: post.sh
"""


def test_a_full_recipe(recipe_dir):
    recipe = imagerecipe.load(write(recipe_dir, FULL))
    assert recipe.alias == "ds"
    assert recipe.base == "jupyter-base"
    assert recipe.packages == ("jq", "graphviz", "libfoo1=1.2-3", "bar/bookworm-backports")
    assert recipe.pip == ("tabulate", "pandas>=2.2", "numpy==2.*")
    assert [(f.dest, f.mode, f.source) for f in recipe.files] == [
        ("/etc/motd", 0o644, recipe_dir / "motd.txt"),
        ("/etc/conf.d", None, recipe_dir / "conf"),
    ]
    assert recipe.script == recipe_dir / "post.sh"


def test_defaults_the_alias_from_the_file_name_and_alias_option_wins(recipe_dir):
    assert imagerecipe.load(write(recipe_dir, "packages: [jq]\n")).alias == "datascience"
    assert imagerecipe.load(write(recipe_dir, "")).packages == ()
    assert imagerecipe.load(write(recipe_dir, FULL), alias="other").alias == "other"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pakages: [jq]\n", "pakages: unknown key (known: alias, description, base"),
        ("packages: jq\n", "packages = 'jq': must be a list of strings"),
        ("packages: [jq, 3]\n", "packages = ['jq', 3]: must be a list of strings"),
        ("packages: ['-o=APT::x']\n", "packages[0] = '-o=APT::x': not a Debian package name"),
        ("packages: ['jq; rm -rf /']\n", "packages[0] = 'jq; rm -rf /': not a Debian package"),
        ("pip: ['-r /etc/shadow']\n", "pip[0] = '-r /etc/shadow': a requirement (name and "),
        ("pip: ['--index-url=http://evil']\n", "pip[0] = '--index-url=http://evil': a requir"),
        ("pip: ['pandas >>> 2']\n", "pip[0] = 'pandas >>> 2': not a pip requirement"),
        ("base: debian\n", "base = 'debian': unknown base (known: jupyter-base)"),
        ("alias: 'a b'\n", "alias = 'a b': an image alias is 1 to 63 letters"),
        ("alias: 7\n", "alias = 7: must be a string"),
        ("files: {src: motd.txt}\n", "files = {'src': 'motd.txt'}: must be a list of"),
        ("files: [motd.txt]\n", "files[0] = 'motd.txt': must be a mapping src, dest"),
        ("files: [{src: motd.txt}]\n", "files[0]: dest is missing"),
        ("files: [{src: motd.txt, dest: /x, owner: me}]\n", "files[0].owner: unknown key"),
        ("files: [{src: motd.txt, dest: etc/motd}]\n", "files[0].dest = 'etc/motd': must be an "),
        ("files: [{src: motd.txt, dest: /etc/../x}]\n", "files[0].dest = '/etc/../x': must not"),
        ("files: [{src: motd.txt, dest: /proc/x}]\n", "files[0].dest = '/proc/x': the image's /"),
        ("files: [{src: motd.txt, dest: /}]\n", "files[0].dest = '/': the image's /"),
        ("files: [{src: motd.txt, dest: /x, mode: 644}]\n", "files[0].mode = 644: must be an oc"),
        ("files: [{src: nope.txt, dest: /x}]\n", "files[0].src = 'nope.txt': "),
        ("script: nope.sh\n", "script = 'nope.sh': "),
        ("script: motd.txt\n", "script = 'motd.txt': must start with a #! line"),
        ("- jq\n", "must be a YAML mapping with keys alias"),
        ("packages: [jq\n", "not valid YAML"),
    ],
)
def test_each_bad_key_is_named_with_its_value(recipe_dir, text, message):
    path = write(recipe_dir, text)
    with pytest.raises(RecipeError) as error:
        imagerecipe.load(path)
    assert str(error.value).startswith(f"{path}: "), error.value
    assert message in str(error.value)


@pytest.mark.parametrize("src", ["../secret", "/etc/shadow", "conf/../../secret", "link", "out"])
def test_sources_never_leave_the_recipe_directory(tmp_path, src):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (tmp_path / "secret").write_text("no")
    (recipes / "link").symlink_to(tmp_path / "secret")
    (recipes / "out").symlink_to(tmp_path)
    path = write(recipes, f"files: [{{src: '{src}', dest: /etc/x}}]\n")
    with pytest.raises(RecipeError, match="inside the recipe's directory|leads out of"):
        imagerecipe.load(path)
    with pytest.raises(RecipeError, match="inside the recipe's directory|leads out of"):
        imagerecipe.load(write(recipes, f"script: '{src}'\n"))


def test_a_directory_with_a_symbolic_link_inside_is_refused(recipe_dir):
    (recipe_dir / "conf" / "shadow").symlink_to("/etc/shadow")
    with pytest.raises(RecipeError, match=r"files\[0\].src = 'conf': .*shadow is not a regular"):
        imagerecipe.load(write(recipe_dir, "files: [{src: conf, dest: /etc/conf}]\n"))


def test_the_hash_is_stable_and_sees_every_input(recipe_dir):
    path = write(recipe_dir, FULL)

    def digest(base: str = BASE, builder: bytes = BUILDER, alias: str = "") -> str:
        return imagerecipe.recipe_hash(imagerecipe.load(path, alias), base, builder)

    first = digest()
    assert len(first) == 16 and first == digest()
    # Formatting, comments and the alias do not change what is built.
    path.write_text("# a comment\n" + FULL.replace("alias: ds", "alias: other") + "\n\n")
    assert digest() == first and digest(alias="x") == first
    seen = {first}

    def changed() -> None:
        now = digest()
        assert now not in seen
        seen.add(now)

    path.write_text(FULL.replace("jq, ", ""))
    changed()
    path.write_text(FULL)
    (recipe_dir / "motd.txt").write_text("hello again\n")
    changed()
    (recipe_dir / "motd.txt").chmod(0o600)
    changed()
    (recipe_dir / "conf" / "b.cfg").write_text("b = 2\n")
    changed()
    (recipe_dir / "post.sh").write_text("#!/bin/sh\necho other > /etc/marker\n")
    changed()
    assert digest(base="0" * 64) not in seen
    assert digest(builder=BUILDER + b"# changed\n") not in seen


def test_the_spec_carries_values_as_files(recipe_dir, tmp_path):
    recipe = imagerecipe.load(write(recipe_dir, FULL))
    spec = tmp_path / "spec"
    imagebuild.write_spec(recipe, spec)
    assert (
        spec / "packages"
    ).read_text() == "jq\ngraphviz\nlibfoo1=1.2-3\nbar/bookworm-backports\n"
    assert (spec / "requirements.txt").read_text() == "tabulate\npandas>=2.2\nnumpy==2.*\n"
    assert (spec / "files" / "0000" / "dest").read_text() == "/etc/motd"
    assert (spec / "files" / "0000" / "mode").read_text() == "0644"
    assert (spec / "files" / "0000" / "src").read_text() == "hello\n"
    assert (spec / "files" / "0001" / "mode").read_text() == ""
    assert (spec / "files" / "0001" / "src" / "a.cfg").read_text() == "a = 1\n"
    assert (spec / "script").read_bytes().startswith(b"#!/bin/sh")


def test_the_metadata_keeps_the_templates_and_gets_our_properties(tmp_path):
    base = tmp_path / "base.tar.xz"
    meta = {"architecture": "x86_64", "properties": {"description": "base", "os": "Debian"}}
    with tarfile.open(base, "w:xz") as t:
        for name, data in (
            ("metadata.yaml", yaml.safe_dump(meta).encode()),
            ("templates/hosts.tpl", b"127.0.0.1 {{ container.name }}\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = tmp_path / "meta.tar.xz"
    imagebuild.custom_metadata(base, out, {"description": "ds", "lxdspawner.recipe": "abc"})
    with tarfile.open(out) as t:
        got = yaml.safe_load(t.extractfile("metadata.yaml"))
        assert t.extractfile("templates/hosts.tpl").read().startswith(b"127.0.0.1")
    assert got["properties"]["description"] == "ds"
    assert got["properties"]["os"] == "Debian"
    assert got["properties"]["lxdspawner.recipe"] == "abc"
    assert got["architecture"] == "x86_64" and got["creation_date"] > 0


def test_pip_in_the_chroot_keeps_only_what_exists_there(monkeypatch):
    class Done:
        stdout = (
            "global.index-url='https://mirror.example/simple'\n"
            "global.extra-index-url='file:///opt/pypi/simple https://extra.example/simple'\n"
            "global.find-links='/opt/wheels'\n"
            ":env:.default-timeout='180'\n"
            "global.timeout='30'\n"
        )

    monkeypatch.setattr(imagebuild.subprocess, "run", lambda *a, **k: Done())
    assert imagebuild.pip_environment() == [
        "PIP_DEFAULT_TIMEOUT=180",
        "PIP_EXTRA_INDEX_URL=https://extra.example/simple",
        "PIP_INDEX_URL=https://mirror.example/simple",
    ]


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["image", "build", *argv])


def test_the_command_line():
    args = parse()
    assert (args.recipe, args.config, args.alias, args.force, args.remote) == (
        "jupyter-base",
        None,
        "",
        False,
        "",
    )
    args = parse("ds.yaml", "-f", "/etc/jupyterhub/c.py", "--remote", "lab", "--alias", "x")
    assert (args.recipe, args.config, args.remote, args.alias) == (
        "ds.yaml",
        "/etc/jupyterhub/c.py",
        "lab",
        "x",
    )
    assert parse("--force", "--endpoint", "unix:///s").endpoint == "unix:///s"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["image"].format_help()
    assert "build" in help_text


def test_bad_input_exits_2_naming_it(recipe_dir, capsys):
    path = write(recipe_dir, "packages: [jq]\npip: ['-e .']\n")
    assert cli.main(["image", "build", str(path)]) == 2
    assert f"lxdspawner image build: {path}: pip[0] = '-e .'" in capsys.readouterr().err
    assert cli.main(["image", "build", str(recipe_dir / "missing.yaml")]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err
    assert cli.main(["image", "build", "--alias", "a/b"]) == 2
    assert "--alias = 'a/b': an image alias" in capsys.readouterr().err
    config = recipe_dir / "jupyterhub_config.py"
    config.write_text("c.LxdSpawner.remotes = {'lab': {'endpoint': 'unix:///nowhere'}}\n")
    assert cli.main(["image", "build", "-f", str(config), "--endpoint", "unix:///x"]) == 2
    assert "either -f (the hub's config) or --endpoint" in capsys.readouterr().err
    assert cli.main(["image", "build", "-f", str(config), "--remote", "nope"]) == 2
    assert "remote = 'nope': no such remote; known: 'lab'" in capsys.readouterr().err


def test_upload_progress_without_a_terminal():
    out = io.StringIO()
    reporter = imagebuild.Reporter(out, tty=False)
    mb = 1 << 20
    with reporter.upload("uploading", 100 * mb) as progress:
        for sent in range(0, 101 * mb, 5 * mb):
            progress(sent, 100 * mb)
    assert out.getvalue().splitlines() == [
        "uploading: 100.0 MB",
        "uploading: 25.0 of 100.0 MB",
        "uploading: 50.0 of 100.0 MB",
        "uploading: 75.0 of 100.0 MB",
        "uploading: 100.0 of 100.0 MB",
    ]
    terminal = io.StringIO()
    with imagebuild.Reporter(terminal, tty=True).upload("uploading", 10 * mb) as progress:
        progress(10 * mb, 10 * mb)
    assert "10.5 MB" in terminal.getvalue() or "10.0/10.0 MB" in terminal.getvalue()


def test_not_root_is_refused_before_anything(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["image", "build"]) == 2
    assert "must run as root (sudo)" in capsys.readouterr().err
