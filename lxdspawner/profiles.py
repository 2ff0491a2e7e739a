"""Profiles: KubeSpawner's ``profile_list`` for lxdspawner, the spawn page's options form,
and the validation of ``user_options`` (see README "Profiles").

A user chooses among what the operator offered, never more. ``user_options`` (from the form or
straight from the REST API) only *name* things: a profile, a choice of each of its options, and
for an option whose ``unlisted_choice`` is enabled a free value. The settings the spawner gets
come from the operator's ``spawner_override`` dicts alone; the free value only fills the
literal ``{value}`` in the strings of the operator's override of that unlisted choice, never a
key. A free value may hold no brace and no control character, whatever the operator's regex
says: it can land in settings that are themselves templates (``home_dir``'s ``{username}``,
``instance_patches``' Jinja2), where a brace would be an expression.

The pure part (``normalize``, ``select``, ``options_from_form``, ``render_form``) takes plain
data; :class:`ProfileSettings` is the spawner's mixin: the traits, the form hooks and
:meth:`ProfileSettings.apply_profile` (called first thing in ``start()``), which sets the
overrides on the spawner and, at the next spawn, puts the configured values back first.

How an override meets a setting (the rule of JupyterHub's own ``group_overrides``):
a dict merged into a dict setting (``environment``, ``extra_devices``, ``volumes``...)
is merged recursively, a ``None`` value removing that key; anything else (lists included:
``profiles``, ``files_to_push``...) replaces the setting's value. Within a profile, the
profile's ``spawner_override`` comes first, then each option's choice in the options' order,
merged the same way (a later dict adds to an earlier one).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import jinja2
from traitlets import Any as AnyTrait
from traitlets import TraitError, Unicode, validate
from traitlets.config import Configurable

from .failures import SpawnError

#: The choice that means "the value I typed" (KubeSpawner's marker, in the form and the API).
UNLISTED = "unlisted_choice"
#: ``user_options["<option>" + UNLISTED_SUFFIX]`` is an unlisted choice's value.
UNLISTED_SUFFIX = "--unlisted-choice"
#: Form fields of the options: ``profile-option-<profile slug>--<option>[--unlisted-choice]``.
FORM_PREFIX = "profile-option-"
#: The longest unlisted value accepted.
MAX_VALUE_LENGTH = 1000
#: Where ``{value}`` is substituted (a literal: no other brace is interpreted).
PLACEHOLDER = "{value}"

_PROFILE_KEYS = {
    "display_name",
    "description",
    "slug",
    "default",
    "spawner_override",
    "kubespawner_override",
    "profile_options",
    "groups",
}
_OPTION_KEYS = {"display_name", "choices", "unlisted_choice"}
_CHOICE_KEYS = {
    "display_name",
    "description",
    "default",
    "spawner_override",
    "kubespawner_override",
}
_UNLISTED_KEYS = {
    "enabled",
    "display_name",
    "validation_regex",
    "validation_message",
    "spawner_override",
    "kubespawner_override",
}
_FORBIDDEN_IN_VALUE = re.compile(r"[{}\x00-\x1f\x7f]")


class ProfileError(ValueError):
    """The operator's profile_list is wrong; the message names the profile and the key."""


class OptionsError(ValueError):
    """The user's choice is not one that is offered (HTTP 400); the message says which."""


@dataclasses.dataclass(frozen=True)
class Choice:
    slug: str
    display_name: str
    description: str
    default: bool
    override: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Unlisted:
    display_name: str
    regex: str | None
    message: str
    override: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    display_name: str
    choices: tuple[Choice, ...]
    unlisted: Unlisted | None

    @property
    def default_choice(self) -> str | None:
        """The choice taken when the user names none: the one marked default, else the first;
        None when the option has only an unlisted choice."""
        for choice in self.choices:
            if choice.default:
                return choice.slug
        return self.choices[0].slug if self.choices else None

    def choice(self, slug: str) -> Choice | None:
        return next((c for c in self.choices if c.slug == slug), None)


@dataclasses.dataclass(frozen=True)
class Profile:
    slug: str
    display_name: str
    description: str
    default: bool
    override: Mapping[str, Any]
    options: tuple[Option, ...]
    #: JupyterHub groups whose members may use it; None: everybody.
    groups: frozenset[str] | None

    def allows(self, groups: Iterable[str] | None) -> bool:
        """Whether a member of ``groups`` may see and use it (None: do not check)."""
        return self.groups is None or groups is None or bool(self.groups & set(groups))

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a user chose, validated: the profile, each option's choice (a slug, or UNLISTED
    with its value), and the overrides that makes, merged and with ``{value}`` filled."""

    profile: Profile
    choices: Mapping[str, str]
    values: Mapping[str, str]
    override: Mapping[str, Any]

    @property
    def uses_free_value(self) -> bool:
        return bool(self.values)


# -- the operator's profile_list -------------------------------------------------------------


def slugify(text: str) -> str:
    """A slug from a display name, as KubeSpawner derives one: lower case, every run of other
    characters than letters and digits one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProfileError(f"{where}: must be a string, not {value!r}")
    return value


def _override(entry: Mapping, where: str, known: Callable[[str], bool] | None) -> dict:
    """The entry's spawner_override (or kubespawner_override, the same), its keys checked."""
    if "spawner_override" in entry and "kubespawner_override" in entry:
        raise ProfileError(f"{where}: give spawner_override or kubespawner_override, not both")
    override = entry.get("spawner_override", entry.get("kubespawner_override")) or {}
    if not isinstance(override, Mapping):
        raise ProfileError(f"{where}: spawner_override must be a dict, not {override!r}")
    for key in override:
        if not isinstance(key, str) or (known is not None and not known(key)):
            raise ProfileError(
                f"{where}: spawner_override sets {key!r}, which is not a setting of the spawner"
            )
    return dict(override)


def _unknown_keys(entry: Mapping, allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in entry if k not in allowed)
    if extra:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(allowed))})"
        )


def _unlisted(entry: Any, where: str, known: Callable[[str], bool] | None) -> Unlisted | None:
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ProfileError(f"{where}: must be a dict, not {entry!r}")
    _unknown_keys(entry, _UNLISTED_KEYS, where)
    if not entry.get("enabled", False):
        return None
    regex = entry.get("validation_regex") or None
    if regex is not None:
        try:
            re.compile(_text(regex, f"{where}.validation_regex"))
        except re.error as e:
            raise ProfileError(f"{where}.validation_regex {regex!r}: {e}") from e
    return Unlisted(
        display_name=_text(entry.get("display_name"), f"{where}.display_name") or "Other",
        regex=regex,
        message=_text(entry.get("validation_message"), f"{where}.validation_message"),
        override=_override(entry, where, known),
    )


def _option(name: Any, entry: Any, where: str, known: Callable[[str], bool] | None) -> Option:
    if not isinstance(name, str) or not name or name == "profile" or name.endswith(UNLISTED_SUFFIX):
        raise ProfileError(
            f"{where}: an option's name must be a non-empty string other than 'profile', "
            f"not ending in {UNLISTED_SUFFIX!r}"
        )
    where = f"{where}[{name!r}]"
    if not isinstance(entry, Mapping):
        raise ProfileError(f"{where}: must be a dict, not {entry!r}")
    _unknown_keys(entry, _OPTION_KEYS, where)
    choices_in = entry.get("choices") or {}
    if not isinstance(choices_in, Mapping):
        raise ProfileError(f"{where}.choices: must be a dict of choices keyed by their slug")
    choices = []
    for slug, choice in choices_in.items():
        here = f"{where}.choices[{slug!r}]"
        if not isinstance(slug, str) or not slug or slug == UNLISTED:
            raise ProfileError(f"{here}: a choice's slug must be a non-empty string ≠ {UNLISTED!r}")
        if not isinstance(choice, Mapping):
            raise ProfileError(f"{here}: must be a dict, not {choice!r}")
        _unknown_keys(choice, _CHOICE_KEYS, here)
        choices.append(
            Choice(
                slug=slug,
                display_name=_text(choice.get("display_name"), f"{here}.display_name") or slug,
                description=_text(choice.get("description"), f"{here}.description"),
                default=bool(choice.get("default", False)),
                override=_override(choice, here, known),
            )
        )
    unlisted = _unlisted(entry.get("unlisted_choice"), f"{where}.unlisted_choice", known)
    if not choices and unlisted is None:
        raise ProfileError(f"{where}: has no choices and no enabled unlisted_choice")
    return Option(
        name=name,
        display_name=_text(entry.get("display_name"), f"{where}.display_name") or name,
        choices=tuple(choices),
        unlisted=unlisted,
    )


def normalize(profile_list: Any, known: Callable[[str], bool] | None = None) -> tuple[Profile, ...]:
    """Check the operator's ``profile_list`` and turn it into :class:`Profile` values.

    ``known(key)`` says whether the spawner has a setting of that name: an override of
    anything else is refused here, naming the profile and the key. Raises ProfileError.
    """
    if not isinstance(profile_list, (list, tuple)):
        raise ProfileError(f"profile_list must be a list of dicts, not {profile_list!r}")
    profiles: list[Profile] = []
    for i, entry in enumerate(profile_list):
        where = f"profile_list[{i}]"
        if not isinstance(entry, Mapping):
            raise ProfileError(f"{where}: must be a dict, not {entry!r}")
        _unknown_keys(entry, _PROFILE_KEYS, where)
        display = _text(entry.get("display_name"), f"{where}.display_name")
        slug = _text(entry.get("slug"), f"{where}.slug") or slugify(display)
        if not slug:
            raise ProfileError(f"{where}: give it a display_name or a slug")
        where = f"profile {slug!r}"
        if any(p.slug == slug for p in profiles):
            raise ProfileError(f"{where}: two profiles have this slug")
        groups = entry.get("groups")
        if groups is not None:
            if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
                raise ProfileError(f"{where}.groups: must be a list of group names")
            if not groups:
                raise ProfileError(f"{where}.groups is empty: leave it out to offer it to all")
        options_in = entry.get("profile_options") or {}
        if not isinstance(options_in, Mapping):
            raise ProfileError(f"{where}.profile_options: must be a dict keyed by option name")
        profiles.append(
            Profile(
                slug=slug,
                display_name=display or slug,
                description=_text(entry.get("description"), f"{where}.description"),
                default=bool(entry.get("default", False)),
                override=_override(entry, where, known),
                options=tuple(
                    _option(name, option, f"{where}.profile_options", known)
                    for name, option in options_in.items()
                ),
                groups=frozenset(groups) if groups is not None else None,
            )
        )
    return tuple(profiles)


def visible(profiles: Iterable[Profile], groups: Iterable[str] | None) -> tuple[Profile, ...]:
    """The profiles a member of ``groups`` sees."""
    groups = set(groups) if groups is not None else None
    return tuple(p for p in profiles if p.allows(groups))


def default_profile(profiles: Iterable[Profile]) -> Profile | None:
    """The profile marked default, else the first."""
    profiles = tuple(profiles)
    return next((p for p in profiles if p.default), profiles[0] if profiles else None)


# -- the user's choice ----------------------------------------------------------------------


def merge(base: Mapping[str, Any], more: Mapping[str, Any], *, drop_none: bool = False) -> dict:
    """``base`` updated by ``more``, neither changed: dicts merged recursively, anything else
    replaced. With ``drop_none`` (an override meeting a setting's value, JupyterHub's
    group_overrides rule) a None removes its key; without (overrides combined), it stays, to
    remove the key from the setting later."""
    out = copy.deepcopy(dict(base))
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value, drop_none=drop_none)
        elif value is None and drop_none:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


def substitute(value: Any, text: str) -> Any:
    """``value`` with every literal ``{value}`` in its strings (in lists, tuples and dicts'
    values, never their keys) replaced by ``text``. Callables are left as they are."""
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, text)
    if isinstance(value, Mapping):
        return {k: substitute(v, text) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, text) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, text) for v in value)
    return value


def check_value(option: Option, value: str, profile: Profile) -> str:
    """An unlisted value, checked: a string, no brace nor control character, at most
    MAX_VALUE_LENGTH characters, and a full match of the operator's validation_regex."""
    unlisted = option.unlisted
    assert unlisted is not None
    where = f"profile {profile.slug!r}, option {option.name!r}"
    if not isinstance(value, str):
        raise OptionsError(f"{where}: the value must be a string, not {value!r}")
    if len(value) > MAX_VALUE_LENGTH:
        raise OptionsError(f"{where}: the value is longer than {MAX_VALUE_LENGTH} characters")
    if _FORBIDDEN_IN_VALUE.search(value):
        raise OptionsError(
            f"{where}: the value {value!r} may not contain braces or control characters"
        )
    if unlisted.regex is not None and not re.fullmatch(unlisted.regex, value):
        why = unlisted.message or f"it must match {unlisted.regex!r}"
        raise OptionsError(f"{where}: {value!r} is not accepted: {why}")
    return value


def select(
    profiles: Iterable[Profile],
    user_options: Mapping[str, Any] | None,
    groups: Iterable[str] | None,
) -> Selection:
    """Validate ``user_options`` against the offered profiles (those ``groups`` allow; None:
    do not check groups) → the :class:`Selection`. Raises OptionsError naming what is wrong:
    an unknown profile, choice or key, a profile the groups do not allow, an unlisted value
    where none is enabled or that fails its regex."""
    profiles = tuple(profiles)
    options = dict(user_options or {})
    offered = visible(profiles, groups)
    slug = options.pop("profile", None)
    if slug is None or slug == "":
        profile = default_profile(offered)
        if profile is None:
            raise OptionsError("no profile is available to you (profile_list: check its groups)")
    else:
        if not isinstance(slug, str):
            raise OptionsError(f"profile must be a profile's slug (a string), not {slug!r}")
        profile = next((p for p in profiles if p.slug == slug), None)
        if profile is None:
            raise OptionsError(
                f"unknown profile {slug!r} (offered: {', '.join(p.slug for p in offered)})"
            )
        if profile not in offered:
            raise OptionsError(f"profile {slug!r} is only for members of other groups")

    choices: dict[str, str] = {}
    values: dict[str, str] = {}
    override: dict[str, Any] = merge({}, profile.override)
    for option in profile.options:
        picked = options.pop(option.name, None)
        value = options.pop(option.name + UNLISTED_SUFFIX, None)
        where = f"profile {profile.slug!r}, option {option.name!r}"
        if value == "":
            value = None
        if picked == "":
            picked = None
        if picked is not None and not isinstance(picked, str):
            raise OptionsError(f"{where}: the choice must be a string, not {picked!r}")
        if value is not None and picked not in (None, UNLISTED):
            raise OptionsError(f"{where}: give either a choice or an unlisted value, not both")
        if picked == UNLISTED or value is not None:
            if option.unlisted is None:
                raise OptionsError(f"{where}: takes no value of your own")
            if value is None:
                raise OptionsError(
                    f"{where}: {UNLISTED!r} needs a value in {option.name}{UNLISTED_SUFFIX}"
                )
            values[option.name] = check_value(option, value, profile)
            choices[option.name] = UNLISTED
            override = merge(override, substitute(option.unlisted.override, value))
            continue
        slug = picked if picked is not None else option.default_choice
        if slug is None:
            continue  # only an unlisted choice, and no value given: nothing to apply
        choice = option.choice(slug)
        if choice is None:
            known = ", ".join(c.slug for c in option.choices)
            raise OptionsError(f"{where}: unknown choice {slug!r} (offered: {known})")
        choices[option.name] = slug
        override = merge(override, choice.override)
    if options:
        unknown = ", ".join(sorted(map(str, options)))
        raise OptionsError(f"profile {profile.slug!r}: unknown user option(s) {unknown}")
    return Selection(profile=profile, choices=choices, values=values, override=override)


# -- the form --------------------------------------------------------------------------------


def form_field(profile: str, option: str, unlisted: bool = False) -> str:
    """The form field of an option of a profile (KubeSpawner's names)."""
    return f"{FORM_PREFIX}{profile}--{option}" + (UNLISTED_SUFFIX if unlisted else "")


def options_from_form(form_data: Mapping[str, list]) -> dict[str, str]:
    """The spawn page's form → ``user_options`` in KubeSpawner's shape: the chosen profile
    and the fields of its options only (every profile's fields are in the page, for browsers
    without JavaScript); an unlisted text field only when its option says ``unlisted_choice``
    or has no choice field."""

    def first(key: str) -> str | None:
        values = form_data.get(key) or [None]
        value = values[0]
        return value.decode() if isinstance(value, bytes) else value

    slug = first("profile")
    if not slug:
        return {}
    prefix = f"{FORM_PREFIX}{slug}--"
    options: dict[str, str] = {"profile": slug}
    fields = {k[len(prefix) :]: first(k) for k in form_data if k.startswith(prefix)}
    for name, value in fields.items():
        if name.endswith(UNLISTED_SUFFIX) or value is None:
            continue
        options[name] = value
    for name, value in fields.items():
        if not name.endswith(UNLISTED_SUFFIX) or not value:
            continue
        option = name[: -len(UNLISTED_SUFFIX)]
        if options.get(option, UNLISTED) == UNLISTED:
            options[name] = value
    return options


def remembered(
    profiles: tuple[Profile, ...], user_options: Mapping[str, Any] | None
) -> tuple[str | None, dict[str, dict[str, tuple[str | None, str]]]]:
    """What the form preselects: the last chosen profile if offered (else the default), and
    per profile and option (choice slug, unlisted text): the last ones for the last profile,
    the defaults elsewhere. Lenient: anything no longer offered falls back to the default."""
    options = dict(user_options or {})
    last = options.get("profile")
    chosen = next((p for p in profiles if p.slug == last), None) or default_profile(profiles)
    picks: dict[str, dict[str, tuple[str | None, str]]] = {}
    for profile in profiles:
        picks[profile.slug] = {}
        for option in profile.options:
            choice, text = option.default_choice, ""
            if profile is chosen and last == profile.slug:
                picked = options.get(option.name)
                value = options.get(option.name + UNLISTED_SUFFIX)
                if isinstance(picked, str) and option.choice(picked) is not None:
                    choice = picked
                if option.unlisted is not None and isinstance(value, str) and value:
                    text = value
                    if picked in (None, UNLISTED, ""):
                        choice = UNLISTED
            picks[profile.slug][option.name] = (choice, text)
    return (chosen.slug if chosen else None), picks


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def default_template() -> str:
    return resources.files(__package__).joinpath("templates/profiles.html").read_text()


def render_form(
    profiles: tuple[Profile, ...],
    user_options: Mapping[str, Any] | None,
    template: str = "",
) -> str:
    """The form's HTML: ``template`` (Jinja2 source; empty: lxdspawner's), given
    ``profile_list`` (the profiles offered), ``selected`` (a slug), ``picks`` (see
    :func:`remembered`), ``field`` (the fields' names) and ``UNLISTED``. Autoescaped:
    operators' and users' text is text."""
    selected, picks = remembered(profiles, user_options)
    return _ENV.from_string(template or default_template()).render(
        profile_list=profiles,
        selected=selected,
        picks=picks,
        field=form_field,
        UNLISTED=UNLISTED,
    )


# -- the spawner's part ---------------------------------------------------------------------


class ProfileSettings(Configurable):
    """``profile_list`` and the form on LxdSpawner.

    It comes before ``Spawner`` among LxdSpawner's bases, so that its form hooks
    (``get_options_form``, ``run_options_from_form``, ``options_from_query``) take over from
    JupyterHub's when a profile_list is set, and leave them alone when none is.
    """

    profile_list = AnyTrait(
        [],
        config=True,
        help="""Profiles a user chooses from on the spawn page (or with `user_options` through
        the REST API), in KubeSpawner's format: a list of dicts, or a callable (may be async)
        taking the spawner and returning one. Each profile: `display_name`, `description`,
        `slug` (default: from display_name), `default`, `groups` (only members of these
        JupyterHub groups see and may use it; leave out for everybody), `spawner_override`
        (or `kubespawner_override`): `{setting: value}` for any setting of the spawner
        (`image`, `profiles`, `mem_limit`, `cpu_limit`, `environment`, `default_url`,
        `remote`, `target`, `gpu`, ...; a value may be a callable taking the spawner), and
        `profile_options`: `{name: {"display_name": ..., "choices": {slug: {"display_name":
        ..., "default": True, "spawner_override": {...}}}, "unlisted_choice": {"enabled":
        True, "display_name": ..., "validation_regex": "...", "validation_message": ...,
        "spawner_override": {"image": "{value}"}}}}`. A dict override is merged into a dict
        setting (None removes a key); anything else replaces the setting. The user's values
        only choose: `{"profile": slug, "<option>": choice, "<option>--unlisted-choice":
        value}`; anything else is refused (HTTP 400). Empty (the default): no form.""",
    )
    profile_form_template = Unicode(
        "",
        config=True,
        help="""Jinja2 source of the profiles' form, replacing lxdspawner's
        (lxdspawner/templates/profiles.html: copy it to start). It gets `profile_list`,
        `selected`, `picks[profile.slug][option.name]` = (choice, unlisted text), `field(slug,
        option, unlisted=False)` and `UNLISTED`; autoescaping is on.""",
    )

    @validate("profile_list")
    def _check_profile_list(self, proposal: dict) -> Any:
        value = proposal["value"]
        if callable(value):
            return value
        try:
            normalize(value, self._overridable)
        except ProfileError as e:
            raise TraitError(f"profile_list: {e}") from e
        return value

    def _overridable(self, key: str) -> bool:
        trait = self.traits().get(key)
        return trait is not None and bool(trait.metadata.get("config"))

    @property
    def _user_groups(self) -> set[str]:
        user = getattr(self, "user", None)
        return {g.name for g in (getattr(user, "groups", None) or ())}

    async def _profiles(self) -> tuple[Profile, ...]:
        """The profile_list, called if a callable; ProfileError if it is wrong."""
        value = self.profile_list
        if callable(value):
            value = value(self)
            if inspect.isawaitable(value):
                value = await value
        return normalize(value or [], self._overridable)

    # -- the form: JupyterHub's hooks --------------------------------------------------------

    async def get_options_form(self):
        if not self.profile_list:
            return await super().get_options_form()
        try:
            profiles = await self._profiles()
        except ProfileError as e:
            raise SpawnError(f"profile_list: {e}", reason="profile") from e
        if not profiles:
            return await super().get_options_form()
        offered = visible(profiles, self._user_groups)
        return render_form(offered, self.user_options, self.profile_form_template)

    def run_options_from_form(self, form_data):
        if not self.profile_list:
            return super().run_options_from_form(form_data)
        return options_from_form(form_data)

    def options_from_query(self, query_data):
        if not self.profile_list:
            return super().options_from_query(query_data)
        return options_from_form(query_data)

    async def _run_apply_user_options(self, user_options):
        # JupyterHub warns of "unhandled user_options" when no apply_user_options hook is
        # set: with a profile_list they are ours, handled in start().
        if self.profile_list and self.apply_user_options is None:
            return
        await super()._run_apply_user_options(user_options)

    # -- applying the choice -----------------------------------------------------------------

    #: The configured values of the settings the applied profile changed, to put back.
    _profile_saved: dict[str, Any] | None = None
    #: The slug of the profile in effect (None: none).
    profile_slug: str | None = None

    def restore_profile_overrides(self) -> None:
        """Put back what the previous profile changed: the spawner object lives across a
        user's spawns, and another profile must start from the configured values."""
        saved, self._profile_saved = self._profile_saved or {}, None
        for key, value in saved.items():
            setattr(self, key, value)
        self.profile_slug = None

    async def apply_profile(self) -> Selection | None:
        """Validate ``user_options`` and set the chosen profile's overrides (first thing in
        ``start()``, before anything is computed or created). A wrong choice is the user's
        SpawnError, HTTP 400; a wrong profile_list the operator's, 500."""
        self.restore_profile_overrides()
        if not self.profile_list:
            return None
        try:
            profiles = await self._profiles()
            if not profiles:
                return None
            selection = select(profiles, self.user_options, self._user_groups)
            await self._set_overrides(selection)
        except OptionsError as e:
            raise SpawnError(str(e), reason="profile", status_code=400) from e
        except OverrideError as e:
            raise SpawnError(str(e), reason="profile", status_code=400 if e.by_user else 500) from e
        except ProfileError as e:
            raise SpawnError(f"profile_list: {e}", reason="profile") from e
        self.log.info(
            "%s: profile %s%s",
            self._log_name,
            selection.profile.slug,
            "".join(f", {k}={v}" for k, v in selection.choices.items()),
        )
        return selection

    async def _set_overrides(self, selection: Selection) -> None:
        values = {}
        for key, value in selection.override.items():
            if callable(value):
                value = value(self)
                if inspect.isawaitable(value):
                    value = await value
            values[key] = value
        self._assign(selection, values)

    def _assign(self, selection: Selection, values: Mapping[str, Any]) -> None:
        """Set the settings, remembering the configured values; all or none."""
        saved: dict[str, Any] = {}
        self._profile_saved = saved
        try:
            for key, value in values.items():
                current = getattr(self, key)
                saved.setdefault(key, copy.deepcopy(current))
                if isinstance(value, Mapping) and isinstance(current, Mapping):
                    value = merge(current, value, drop_none=True)
                try:
                    setattr(self, key, value)
                except TraitError as e:
                    raise OverrideError(selection, key, value, e) from e
        except BaseException:
            self.restore_profile_overrides()
            raise
        self.profile_slug = selection.profile.slug

    def load_state(self, state: dict) -> None:
        """After a hub restart, a running server's profile is in effect again (its `remove`,
        `stop_timeout`...: a kept container must stay kept). Its groups are not checked
        again. A callable profile_list or override value is called; one that is async cannot
        be here (load_state is not): its overrides are then missing until the next spawn,
        and the hub log says so."""
        super().load_state(state)
        if not state or not self.profile_list or self._profile_saved is not None:
            return
        try:
            profiles = self.profile_list
            if callable(profiles):
                profiles = profiles(self)
                if inspect.isawaitable(profiles):
                    _close(profiles)
                    raise ProfileError("profile_list is async")
            selection = select(
                normalize(profiles or [], self._overridable), self.user_options, None
            )
            values = {}
            for key, value in selection.override.items():
                if callable(value):
                    value = value(self)
                    if inspect.isawaitable(value):
                        _close(value)
                        raise ProfileError(f"the override of {key} is async")
                values[key] = value
            self._assign(selection, values)
        except (ValueError, TraitError) as e:
            self.log.warning(
                "The profile of %s's server is not applied again after the hub's restart: %s",
                getattr(getattr(self, "user", None), "name", "?"),
                e,
            )


def _close(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


class OverrideError(ValueError):
    """A profile's override does not fit its setting (a wrong type, or a free value that
    makes an invalid one)."""

    def __init__(self, selection: Selection, key: str, value: Any, error: Exception):
        self.by_user = selection.uses_free_value
        super().__init__(
            f"profile {selection.profile.slug!r}: spawner_override {key} = {value!r}: {error}"
        )
