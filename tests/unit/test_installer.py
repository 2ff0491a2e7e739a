"""`lxdspawner install`: the CLI hands its arguments to the package's script, as root only,
and the script's questions to the daemon get plain answers (no daemon here)."""

from __future__ import annotations

import subprocess

from lxdspawner import cli, installer


def test_the_script_is_package_data_and_gets_the_venv():
    argv = installer.command(["--domain", "hub.example.org"], prefix="/opt/jupyterhub")
    assert argv[0] == "bash" and argv[1].endswith("lxdspawner/install/install.sh")
    assert argv[2:] == ["--venv", "/opt/jupyterhub", "--domain", "hub.example.org"]
    assert installer.command(["--venv", "/srv/hub"])[2:] == ["--venv", "/srv/hub"]
    for name in ("jupyterhub_config.py", "jupyterhub.service", "jupyterhub-proxy.service",
                 "Caddyfile", "incus-preseed.yaml"):  # fmt: skip
        assert (installer.script().parent / name).is_file(), name


def test_not_root_is_refused_with_the_command(monkeypatch, capsys):
    monkeypatch.setattr(installer.os, "geteuid", lambda: 1000)
    assert cli.main(["install", "--domain", "x.org"]) == 2
    assert "run as root" in capsys.readouterr().err


def test_script_help_and_bad_options():
    script = str(installer.script())
    done = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--from-bundle DIR" in done.stdout
    done = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option '--bogus'" in done.stderr
    done = subprocess.run(
        ["bash", script, "--domain", "x;rm -rf /"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "--domain 'x;rm -rf /'" in done.stdout + done.stderr


def test_daemon_questions_without_a_daemon(tmp_path):
    missing = str(tmp_path / "none.socket")
    assert installer.daemon_name(missing) is None
    assert installer.has_image(missing, "jupyter-base") is False
    assert installer.main(["answers", missing]) == 1
    assert installer.main(["bogus"]) == 2


def test_acme_ca_values_are_checked_before_anything_runs(tmp_path):
    """--acme-ca goes into the Caddyfile: only a plain https URL, only with --domain; its root
    must be a PEM certificate."""
    script = str(installer.script())

    def refused(*args: str) -> str:
        done = subprocess.run(["bash", script, *args], capture_output=True, text=True)
        assert done.returncode == 1, done.stdout + done.stderr
        return done.stdout + done.stderr

    url = "https://ca.example.org/acme/acme/directory"
    assert "--acme-ca needs --domain" in refused("--acme-ca", url)
    injected = "https://ca.example.org/ {\n}\nevil {"
    assert "an https:// URL of letters" in refused(
        "--domain", "hub.example.org", "--acme-ca", injected
    )
    assert "an https:// URL" in refused("--domain", "h.example.org", "--acme-ca", "http://ca/")
    not_pem = tmp_path / "root.crt"
    not_pem.write_text("hello\n")
    assert "not a PEM certificate file" in refused(
        "--domain", "h.example.org", "--acme-ca", url, "--acme-ca-root", str(not_pem)
    )
    assert "--acme-ca-root needs --acme-ca" in refused("--acme-ca-root", str(not_pem))
