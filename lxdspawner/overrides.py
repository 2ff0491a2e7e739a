"""The LXD-native override settings of LxdSpawner (``instance_patches``, ``extra_objects``;
see patches.py, extraobjects.py and README "Instance patches and extra objects"): a mixin,
so they are LxdSpawner's own settings, and the one step of a spawn that applies them."""

from __future__ import annotations

import dataclasses

from traitlets import Dict, List, TraitError, Unicode, validate
from traitlets.config import Configurable

from . import objects, ownership, patches
from .failures import SpawnError

_TEMPLATING = """Each string in it (keys too) is a Jinja2 template (sandboxed, undefined
        variables are errors) with `username`, `servername`, `instance_name`, `profile` (the
        chosen profile's slug, "" if none), `member` (the cluster member, "" standalone) and
        `remote` ("" for the default one). The YAML is parsed before the templates are
        expanded, so no username can write structure: quote a value that is a template,
        `FOO: "{{ username }}"`."""


class OverrideSettings(Configurable):
    """The settings; :meth:`_render_overrides` renders them for one server and makes its
    objects."""

    instance_patches = Dict(
        config=True,
        help=f"""Fragments merged into every container's create request, in sorted key order:
        `{{name: YAML text or dict}}` with `config`, `devices` and/or `profiles`. Mappings
        merge recursively, lists replace, `null` deletes a key. {_TEMPLATING} A patch may
        not change the `user.jupyterhub.*` keys or the isolation lxdspawner adds (refused,
        naming the patch). Example: `{{"10-env": 'config: {{environment.TEAM:
        "{{{{ profile }}}}"}}'}}`.""",
    )
    extra_objects = Dict(
        config=True,
        help=f"""Objects made on the daemon for each server before its container (which may
        name them) and deleted when its container is (unless `keep: true`): `{{name:
        {{"kind": "network-acl" | "volume", "body": {{...}}, "pool": ... (volumes),
        "keep": False}}}}`, as YAML text or a dict. The body is the daemon's (`name`,
        `description`, `ingress`/`egress` or `config`, `content_type`); our ownership keys
        are added to its config. {_TEMPLATING} One of the same name that is not this
        server's fails the spawn.""",
    )
    #: The kinds of extra objects this server may have made (its state): what to look for
    #: when its container goes, even when extra_objects has changed since.
    object_kinds = List(Unicode())

    @validate("instance_patches")
    def _check_instance_patches(self, proposal: dict) -> dict:
        try:
            patches.check_patches(proposal["value"])
        except patches.PatchError as e:
            raise TraitError(e.message) from e
        return proposal["value"]

    #: The kinds extra_objects names (set by its check: poll() asks, and must not parse).
    _configured_kinds: tuple[str, ...] = ()

    @validate("extra_objects")
    def _check_extra_objects(self, proposal: dict) -> dict:
        try:
            parsed = patches.check_objects(proposal["value"])
        except patches.PatchError as e:
            raise TraitError(e.message) from e
        self._configured_kinds = tuple(sorted({e["kind"] for e in parsed.values()}))
        return proposal["value"]

    def _object_kinds(self) -> list[str]:
        """The kinds to look for: those recorded and those configured now."""
        return sorted({*self.object_kinds, *self._configured_kinds})

    def _override_context(self, spec: objects.ServerSpec, member: str) -> patches.Context:
        # The profile the spawn runs with (profiles.py), the default one included; never
        # the user's raw user_options, which name a profile only when they chose one.
        profile = getattr(self, "profile_slug", None) or ""
        remote = getattr(self, "recorded_remote_name", "")  # the daemon this spawn uses
        return patches.Context(
            username=spec.username,
            servername=spec.server_name,
            instance_name=spec.instance,
            profile=profile if isinstance(profile, str) else "",
            member=member,
            remote=remote if isinstance(remote, str) else "",
        )

    #: The spawner's (LxdSpawner's, as is ``_emit``, its progress messages).
    owner: ownership.Owner

    async def _render_overrides(
        self, daemon, spec: objects.ServerSpec, member: str
    ) -> objects.ServerSpec:
        """``spec`` with the patches rendered for this server (checked against what they may
        not change), and its extra objects made: after placement, before the create."""
        owner = self.owner
        if not self.instance_patches and not self.extra_objects:
            return spec
        context = self._override_context(spec, member)
        try:
            spec = dataclasses.replace(
                spec, patches=patches.render_patches(self.instance_patches, context)
            )
            objects.instance_request(spec)  # refuse a patch on our keys before anything is made
            wanted = patches.render_objects(self.extra_objects, context, owner)
        except patches.PatchError as e:
            raise SpawnError(e.message, reason="patch") from e
        if wanted:
            self.object_kinds = sorted({*self.object_kinds, *(o.kind for o in wanted)})
            made = await daemon.make_objects(wanted, owner, member or None)
            if made:
                self._emit(f"Created {', '.join(made)}", 9)
        return spec
