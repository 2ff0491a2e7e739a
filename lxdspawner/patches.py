"""LXD-native overrides: ``instance_patches`` and ``extra_objects``, rendered and merged.

Pure: templates in, request bodies out, no I/O (the daemon side is in :mod:`extraobjects`).

Why the YAML is parsed *before* the templates are expanded: the template variables include
what users choose (their names, their servers' names, their profile's slug). Expanding a
YAML text and parsing the result would let a username such as ``a"\\nsecurity.privileged:
"true`` write structure. So a patch is first parsed (YAML or a dict), then each string in it,
keys and values alike, is expanded on its own as a Jinja2 template: whatever a variable
holds, it ends up as (part of) one string, never as a key, a list or a mapping. The price:
a template lives inside a string (quote it, as in Ansible: ``FOO: "{{ username }}"``); to
vary the structure, use several patches (or a profile's ``spawner_override``).

The environment is Jinja2's immutable sandbox with ``StrictUndefined``: a template cannot
reach Python's internals or mutate what it is given, and a misspelt variable is an error
naming the patch, not an empty string.

Merge rules (a patch onto the create request; patches in sorted key order):

- mappings merge recursively (``config``, ``devices``, a device's keys);
- anything else (a list such as ``profiles``, a string) replaces what was there;
- ``null`` deletes the key (``devices: {eth1: null}``).

A patch may not take away what makes the instance ours or holds its user: the ownership
keys (``user.jupyterhub.*``) and the isolation lxdspawner adds (the hardening's config keys,
its root disk and NIC) are checked after each patch, and a patch that changes or deletes one
is refused, naming the patch, the key and the setting to use instead.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import names
from .ownership import KEY_HUB, KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY, Owner

#: Keys of the create request a patch may set.
PATCHABLE = ("config", "devices", "profiles")
#: Config keys of every lxdspawner object: no patch or object body may write them.
OWN_PREFIX = "user.jupyterhub."
#: On an extra object: which entry of ``extra_objects`` made it, and whether it is kept.
KEY_OBJECT = "user.jupyterhub.object"
KEY_KEEP = "user.jupyterhub.keep"

NETWORK_ACL = "network-acl"
VOLUME = "volume"
KINDS = (NETWORK_ACL, VOLUME)
_ACL_FIELDS = ("name", "description", "ingress", "egress", "config")
_VOLUME_FIELDS = ("name", "description", "config", "content_type")


class PatchError(ValueError):
    """A patch or object that cannot be used; the message names its setting and key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Context:
    """The template variables. ``username``, ``servername`` and ``profile`` are the users'."""

    username: str
    servername: str
    instance_name: str
    profile: str = ""
    member: str = ""
    remote: str = ""

    def variables(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ExtraObject:
    """One rendered entry of ``extra_objects``: what to create, with our keys in its config."""

    key: str
    kind: str
    name: str
    body: Mapping[str, Any]
    keep: bool = False
    pool: str = ""

    @property
    def label(self) -> str:
        if self.kind == VOLUME:
            return f"extra_objects[{self.key!r}] (volume {self.pool}/{self.name})"
        return f"extra_objects[{self.key!r}] (network ACL {self.name})"


# -- templates ------------------------------------------------------------------------------

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_MARKUP = re.compile(r"\{\{|\{%|\{#")


@functools.lru_cache(maxsize=512)
def _template(text: str) -> jinja2.Template:
    return _ENV.from_string(text)


def _render_string(text: str, variables: Mapping[str, str], where: str) -> str:
    if not _MARKUP.search(text):
        return text
    try:
        return _template(text).render(variables)
    except jinja2.TemplateSyntaxError as e:
        message = f"{where}: template error in {text!r}: {e.message} (line {e.lineno})"
        raise PatchError(message) from None
    except jinja2.TemplateError as e:
        raise PatchError(f"{where}: template error in {text!r}: {e.message or e}") from None


def _render(value: Any, variables: Mapping[str, str], where: str) -> Any:
    """``value`` with each string (keys too) expanded on its own: no variable makes structure."""
    if isinstance(value, str):
        return _render_string(value, variables, where)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key = _render(k, variables, where) if isinstance(k, str) else k
            if key in out:
                raise PatchError(f"{where}: two keys become {key!r} once expanded")
            out[key] = _render(v, variables, where)
        return out
    if isinstance(value, (list, tuple)):
        return [_render(v, variables, where) for v in value]
    return value


def _check_syntax(value: Any, where: str) -> None:
    if isinstance(value, str):
        if _MARKUP.search(value):
            try:
                _template(value)
            except jinja2.TemplateSyntaxError as e:
                raise PatchError(
                    f"{where}: template error in {value!r}: {e.message} (line {e.lineno})"
                ) from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_syntax(k, where)
            _check_syntax(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_syntax(v, where)


def parse(value: Any, where: str) -> dict:
    """A patch or object as a dict: a YAML text (parsed, templates unexpanded) or a dict."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            hint = ""
            if "{{" in value or "{%" in value:
                hint = ' (quote a value that starts with a template: "{{ ... }}")'
            raise PatchError(f"{where}: not valid YAML{hint}: {e}") from None
        if value is None:
            return {}
    if not isinstance(value, Mapping):
        raise PatchError(f"{where}: must be a mapping (YAML or a dict), not {value!r}")
    _check_syntax(value, where)
    return copy.deepcopy(dict(value))


# -- instance_patches -----------------------------------------------------------------------


def check_patches(patches: Mapping[str, Any]) -> dict[str, dict]:
    """Parse and check ``instance_patches`` at config time (PatchError naming the key)."""
    parsed = {}
    for key in sorted(patches):
        where = f"instance_patches[{key!r}]"
        patch = parse(patches[key], where)
        unknown = sorted(set(patch) - set(PATCHABLE), key=str)
        if unknown:
            raise PatchError(
                f"{where}: {', '.join(map(repr, unknown))} cannot be patched; a patch may set "
                + ", ".join(PATCHABLE)
            )
        parsed[key] = patch
    return parsed


def _as_config_value(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise PatchError(f"{where}: must be a string, not {value!r}")


def _normalize(patch: dict, where: str) -> dict:
    """Config and device values as the daemon takes them (strings); None kept (delete)."""
    out = dict(patch)
    config = out.get("config")
    if config is not None:
        if not isinstance(config, Mapping):
            raise PatchError(f"{where}: config must be a mapping of keys to strings")
        out["config"] = {k: _as_config_value(v, f"{where} config {k!r}") for k, v in config.items()}
    devices = out.get("devices")
    if devices is not None:
        if not isinstance(devices, Mapping):
            raise PatchError(f"{where}: devices must be a mapping of device names to devices")
        out["devices"] = {}
        for name, device in devices.items():
            if device is not None and not isinstance(device, Mapping):
                raise PatchError(f"{where}: device {name!r} must be a mapping (or null)")
            out["devices"][name] = (
                None
                if device is None
                else {
                    k: _as_config_value(v, f"{where} device {name!r} key {k!r}")
                    for k, v in device.items()
                }
            )
    profiles = out.get("profiles")
    if profiles is not None and (
        not isinstance(profiles, list) or not all(isinstance(p, str) and p for p in profiles)
    ):
        raise PatchError(f"{where}: profiles must be a list of profile names")
    return out


def render_patches(patches: Mapping[str, Any], context: Context) -> tuple[tuple[str, dict], ...]:
    """``instance_patches`` expanded for one server, in sorted key order."""
    variables = context.variables()
    rendered = []
    for key, patch in check_patches(patches).items():
        where = f"instance_patches[{key!r}]"
        rendered.append((key, _normalize(_render(patch, variables, where), where)))
    return tuple(rendered)


def merge(base: Mapping, patch: Mapping) -> dict:
    """``patch`` onto ``base``: mappings recursively, anything else replaced, None deletes."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)  # drops the Nones of a new mapping
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Protected:
    """What no patch may change: our config keys (ownership, isolation) and devices."""

    config: Mapping[str, str]
    devices: Mapping[str, Mapping[str, str]]


def apply(
    request: Mapping[str, Any],
    patches: Sequence[tuple[str, Mapping]],
    protected: Protected,
) -> dict:
    """The create request (``config``, ``devices``, ``profiles``) with ``patches`` merged
    in order; PatchError naming the patch that touches a protected key."""
    result = copy.deepcopy(dict(request))
    for key, patch in patches:
        where = f"instance_patches[{key!r}]"
        for k in patch.get("config") or {}:
            if str(k).startswith(OWN_PREFIX):
                raise PatchError(
                    f"{where} sets config key {k!r}: the {OWN_PREFIX}* keys say whose an "
                    "instance is and are lxdspawner's alone"
                )
        result = merge(result, patch)
        config = result.get("config") or {}
        for k, v in protected.config.items():
            if config.get(k) != v:
                raise PatchError(
                    f"{where} changes config key {k!r} ({v!r}), which lxdspawner's isolation "
                    "sets: use the settings for it (isolated_idmap, guest_api, "
                    "privileged_containers), or extra_instance_config"
                )
        devices = result.get("devices") or {}
        for name, device in protected.devices.items():
            now = devices.get(name) or {}
            changed = [k for k, v in device.items() if now.get(k) != v]
            if changed:
                raise PatchError(
                    f"{where} changes device {name!r} ({', '.join(changed)}), which "
                    "lxdspawner's isolation sets (disk_limit, network_isolation): use those "
                    "settings, or extra_devices"
                )
    return result


def blame(patches: Sequence[tuple[str, Mapping]], message: str) -> str:
    """For a create the daemon refused with ``message``: which patches it may be about, as
    `` (...)``: those setting a config key, device or profile the message names, else those
    setting a value it quotes (Incus says "Invalid value: lots"), else all."""
    if not patches:
        return ""

    def names_of(patch: Mapping) -> list[str]:
        words = [*(patch.get("config") or {}), *(patch.get("devices") or {})]
        return [str(w) for w in words + list(patch.get("profiles") or [])]

    def values_of(patch: Mapping) -> list[str]:
        values = list((patch.get("config") or {}).values())
        for device in (patch.get("devices") or {}).values():
            values += list((device or {}).values())
        return [v for v in values if isinstance(v, str) and len(v) >= 3]

    keys = [k for k, p in patches if any(w in message for w in names_of(p))]
    keys = keys or [k for k, p in patches if any(v in message for v in values_of(p))]
    keys = keys or [k for k, _ in patches]
    return " (instance_patches " + ", ".join(repr(k) for k in keys) + " merged into the request)"


# -- extra_objects --------------------------------------------------------------------------


def check_objects(objects: Mapping[str, Any]) -> dict[str, dict]:
    """Parse and check ``extra_objects`` at config time (PatchError naming the key)."""
    parsed = {}
    for key in sorted(objects):
        where = f"extra_objects[{key!r}]"
        entry = parse(objects[key], where)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise PatchError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        unknown = sorted(set(entry) - {"kind", "body", "keep", "pool"}, key=str)
        if unknown:
            raise PatchError(
                f"{where}: unknown {', '.join(map(repr, unknown))} (kind, body, keep, pool)"
            )
        body = entry.get("body")
        if not isinstance(body, Mapping) or not body.get("name"):
            raise PatchError(f"{where}: body must be a mapping with a name")
        fields = _ACL_FIELDS if kind == NETWORK_ACL else _VOLUME_FIELDS
        extra = sorted(set(body) - set(fields), key=str)
        if extra:
            raise PatchError(
                f"{where}: a {kind} body takes {', '.join(fields)}, "
                f"not {', '.join(map(repr, extra))}"
            )
        if kind == VOLUME and not entry.get("pool"):
            raise PatchError(f"{where}: a volume needs its pool (pool: ...)")
        if not isinstance(entry.get("keep", False), bool):
            raise PatchError(f"{where}: keep must be true or false")
        parsed[key] = entry
    return parsed


def object_keys(owner: Owner, key: str, keep: bool) -> dict[str, str]:
    """The config keys of a server's extra object: whose it is, which entry, kept or not."""
    keys = {**owner.keys(), KEY_OBJECT: key}
    if keep:
        keys[KEY_KEEP] = "true"
    return keys


def render_objects(
    objects: Mapping[str, Any], context: Context, owner: Owner
) -> tuple[ExtraObject, ...]:
    """``extra_objects`` expanded for one server, each body carrying our keys."""
    variables = context.variables()
    out = []
    for key, entry in check_objects(objects).items():
        where = f"extra_objects[{key!r}]"
        entry = _render(entry, variables, where)
        body = _normalize_object(entry["body"], where)
        name = body["name"]
        if not isinstance(name, str) or not names.is_safe_path_component(name):
            raise PatchError(f"{where}: name {name!r} is not a valid object name")
        keep = bool(entry.get("keep", False))
        body["config"] = {**body.get("config", {}), **object_keys(owner, key, keep)}
        out.append(
            ExtraObject(
                key=key,
                kind=entry["kind"],
                name=name,
                body=body,
                keep=keep,
                pool=str(entry.get("pool") or ""),
            )
        )
    return tuple(out)


def _normalize_object(body: Mapping, where: str) -> dict:
    body = dict(body)
    config = body.get("config") or {}
    if not isinstance(config, Mapping):
        raise PatchError(f"{where}: config must be a mapping of keys to strings")
    for k in config:
        if str(k).startswith(OWN_PREFIX):
            raise PatchError(f"{where} sets config key {k!r}: the {OWN_PREFIX}* keys are ours")
    body["config"] = {
        k: v
        for k, v in ((k, _as_config_value(v, f"{where} config {k!r}")) for k, v in config.items())
        if v is not None
    }
    return body


def is_servers_object(config: Mapping[str, str] | None, owner: Owner) -> bool:
    """Whether an object (its config) is an extra object of ``owner``'s server."""
    config = config or {}
    return (
        bool(config.get(KEY_OBJECT))
        and config.get(KEY_MANAGED) == MANAGED_BY
        and config.get(KEY_HUB) == owner.hub
        and config.get(KEY_USER) == owner.user
        and config.get(KEY_SERVER, "") == owner.server
    )


def is_reusable(config: Mapping[str, str] | None, obj: ExtraObject, owner: Owner) -> bool:
    """Whether an existing object of ``obj``'s name is this server's own, from this entry."""
    return is_servers_object(config, owner) and (config or {}).get(KEY_OBJECT) == obj.key


def goes_with_server(config: Mapping[str, str] | None, owner: Owner) -> bool:
    """Whether an object is deleted when ``owner``'s container is: ours, and not kept."""
    return is_servers_object(config, owner) and (config or {}).get(KEY_KEEP) != "true"
