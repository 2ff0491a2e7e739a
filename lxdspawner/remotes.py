"""Several daemons for one hub: the ``remotes`` and ``remote`` settings (a mixin of LxdSpawner,
as :mod:`lxdspawner.storage` is) and the choice of the :class:`~lxdspawner.lxd.Remote` a new
server goes to.

The unnamed settings (``endpoint``, ``project``, the certificates) stay the default remote;
``remotes`` adds named ones; ``remote`` picks one per server (a profile's override, a
``pre_spawn_hook``). An ``endpoint`` that is not a URL names a remote of the ``incus``/``lxc``
command line (:mod:`lxdspawner.lxd.cliremotes`). The choice is made when a server starts and
recorded in its state (the resolved Remote and the name): poll, stop and a restarted hub go
to the daemon holding the container, whatever ``remote`` says later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from traitlets import Dict, TraitError, Unicode, validate
from traitlets.config import Configurable

from .lxd import Remote, cliremotes

#: The keys of one entry of ``remotes``: the fields of a Remote.
KEYS = ("endpoint", "project", "client_cert", "client_key", "server_cert")


class UnknownRemote(ValueError):
    """``remote`` names neither an entry of ``remotes`` nor a command-line remote."""


def check_remotes(value: Any) -> dict[str, dict[str, str]]:
    """``remotes`` as given, checked: a ValueError names the entry and key at fault."""
    if not isinstance(value, Mapping):
        raise ValueError(f"remotes = {value!r}: must be a dict of name -> settings")
    for name, entry in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"remotes[{name!r}]: a remote's name must be a non-empty string")
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"remotes[{name!r}] = {entry!r}: must be a dict with keys {', '.join(KEYS)}"
            )
        for key, setting in entry.items():
            if key not in KEYS:
                raise ValueError(
                    f"remotes[{name!r}][{key!r}]: unknown key (known: {', '.join(KEYS)})"
                )
            if not isinstance(setting, str):
                raise ValueError(f"remotes[{name!r}][{key!r}] = {setting!r}: must be a string")
    return {name: dict(entry) for name, entry in value.items()}


def from_settings(settings: Mapping[str, str], *, environ=None, home=None) -> Remote:
    """The Remote of one set of settings. An endpoint that is not a URL is a command-line
    remote's name; the settings given beside it (a project, certificates) override the
    tool's."""
    endpoint = settings.get("endpoint", "")
    if cliremotes.is_url(endpoint):
        return Remote(**{k: settings.get(k, "") for k in KEYS})
    found = cliremotes.resolve(endpoint, environ, home)
    return Remote(
        **{k: settings.get(k) or getattr(found, k) for k in KEYS if k != "endpoint"},
        endpoint=found.endpoint,
    )


def choose(
    name: str,
    remotes: Mapping[str, Mapping[str, str]],
    default: Mapping[str, str],
    *,
    environ=None,
    home=None,
) -> Remote:
    """The Remote called ``name``: "" the default settings, else an entry of ``remotes``,
    else a command-line remote of that name. UnknownRemote names all that are known."""
    if not name:
        return from_settings(default, environ=environ, home=home)
    if name in remotes:
        return from_settings(remotes[name], environ=environ, home=home)
    try:
        return cliremotes.resolve(name, environ, home)
    except cliremotes.CliRemoteError as e:
        known = [*remotes, *cliremotes.known_names(environ, home)]
        raise UnknownRemote(
            f"remote = {name!r}: no such remote; known: "
            + (", ".join(repr(k) for k in dict.fromkeys(known)) or "none")
            + f" ('' is the default). The command line's: {e.message}"
        ) from e


class RemoteSettings(Configurable):
    """The traits; LxdSpawner's ``endpoint`` and friends are the default remote."""

    remotes = Dict(
        config=True,
        help="""Named daemons beside the default one (`endpoint` and the settings next to it),
        for servers whose `remote` names them:
        `{"campus": {"endpoint": "https://lxd1.campus:8443", "client_cert": "/etc/hub/c.crt",
        "client_key": "/etc/hub/c.key", "server_cert": "/etc/hub/campus.crt",
        "project": "jupyter"}, "lab": {"endpoint": "lab"}}`. Keys: endpoint, project,
        client_cert, client_key, server_cert. An endpoint that is not a URL (`"lab"`) is a
        remote of the `incus`/`lxc` command line (see README "Remotes"); the keys given
        beside it override the tool's. Default: none.""",
    )
    remote = Unicode(
        "",
        config=True,
        help="""Which daemon new servers go to: "" (default) the default remote (`endpoint`),
        else a name of `remotes`, else a remote of the `incus`/`lxc` command line. Set it per
        user in a profile's `spawner_override` or a `pre_spawn_hook`. A running server stays
        where it was started: its state records its remote.""",
    )

    endpoint: str
    project: str
    client_cert: str
    client_key: str
    server_cert: str

    @validate("remotes")
    def _check_remotes(self, proposal: dict) -> dict:
        try:
            return check_remotes(proposal["value"])
        except ValueError as e:
            raise TraitError(str(e)) from e

    def remote_to_start_on(self) -> Remote:
        """``configured_remote`` for a spawn: a SpawnError the spawn page shows (400 for an
        unknown name, naming the known ones)."""
        from .failures import SpawnError

        try:
            return self.configured_remote
        except UnknownRemote as e:
            raise SpawnError(str(e), status_code=400) from e
        except cliremotes.CliRemoteError as e:
            raise SpawnError(f"remote = {self.remote!r}: {e.message}") from e

    @property
    def configured_remote(self) -> Remote:
        """Where new servers go (``remote``): may raise UnknownRemote or CliRemoteError."""
        return choose(
            self.remote,
            self.remotes,
            {k: getattr(self, k) for k in KEYS},
        )
