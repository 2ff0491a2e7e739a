"""Profiles (lxdspawner/profiles.py): what a user may choose, what the spawner then gets, and
the form the spawn page shows. In process; the spawner is a real LxdSpawner, never started
(its start() is tested with a fake daemon in test_spawner_inprocess.py; here apply_profile(),
the call start() makes first)."""

from __future__ import annotations

import html
import re
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from traitlets import TraitError
from traitlets.config import Config

from lxdspawner import LxdSpawner, profiles
from lxdspawner.failures import SpawnError
from lxdspawner.profiles import (
    UNLISTED,
    OptionsError,
    normalize,
    options_from_form,
    render_form,
    select,
)

PROFILES = [
    {
        "display_name": "Small CPU",
        "description": "2 GiB, for teaching",
        "default": True,
        "spawner_override": {"mem_limit": "2G", "environment": {"SIZE": "small"}},
    },
    {
        "display_name": "Big <GPU> & co",
        "slug": "gpu",
        "groups": ["gpu-users"],
        "spawner_override": {"mem_limit": "16G", "image": "cuda"},
        "profile_options": {
            "image": {
                "display_name": "Image",
                "choices": {
                    "torch": {
                        "display_name": "PyTorch",
                        "spawner_override": {"image": "torch", "environment": {"FW": "torch"}},
                    },
                    "jax": {
                        "display_name": "JAX",
                        "default": True,
                        "kubespawner_override": {"image": "jax"},
                    },
                },
                "unlisted_choice": {
                    "enabled": True,
                    "display_name": "Another image",
                    "validation_regex": r"[a-z0-9-]+",
                    "validation_message": "lower-case letters, digits and dashes",
                    "spawner_override": {
                        "image": "{value}",
                        "environment": {"CUSTOM": "image {value}"},
                    },
                },
            },
        },
    },
]


def make(groups=(), user_options=None, **settings) -> LxdSpawner:
    config = Config()
    config.LxdSpawner.hub_id = "hub-1"
    config.LxdSpawner.environment = {"BASE": "1"}
    for key, value in settings.items():
        setattr(config.LxdSpawner, key, value)
    user = SimpleNamespace(
        name="ana",
        escaped_name="ana",
        url="/user/ana/",
        groups=[SimpleNamespace(name=g) for g in groups],
    )
    spawner = LxdSpawner(config=config, user=user)
    spawner.user_options = user_options or {}
    return spawner


# -- the operator's list ---------------------------------------------------------------------


def test_slugs_come_from_display_names_and_choices_from_their_keys():
    small, gpu = normalize(PROFILES)
    assert small.slug == "small-cpu" and gpu.slug == "gpu"
    assert [c.slug for c in gpu.options[0].choices] == ["torch", "jax"]
    assert gpu.options[0].default_choice == "jax"
    assert gpu.options[0].choice("jax").override == {"image": "jax"}  # kubespawner_override
    assert gpu.groups == {"gpu-users"} and small.groups is None


@given(st.text(max_size=40))
def test_a_derived_slug_is_lower_case_letters_digits_and_single_dashes(name):
    slug = profiles.slugify(name)
    assert re.fullmatch(r"([a-z0-9]+(-[a-z0-9]+)*)?", slug)


@pytest.mark.parametrize(
    ("profile_list", "message"),
    [
        ([{"display_name": "A", "spawner_override": {"no_such_setting": 1}}], "'no_such_setting'"),
        (
            [{"display_name": "A", "spawner_override": {}, "kubespawner_override": {}}],
            "not both",
        ),
        ([{"display_name": "A"}, {"slug": "a"}], "two profiles"),
        ([{"display_name": "A", "groups": []}], "groups is empty"),
        ([{"display_name": "A", "colour": "red"}], "unknown key(s) colour"),
        ([{"display_name": "A", "profile_options": {"x": {}}}], "no choices"),
        (
            [
                {
                    "display_name": "A",
                    "profile_options": {
                        "x": {"unlisted_choice": {"enabled": True, "validation_regex": "("}}
                    },
                }
            ],
            "validation_regex",
        ),
        ([{"description": "no name"}], "display_name or a slug"),
    ],
)
def test_a_wrong_profile_list_is_refused_at_config_time_naming_what(profile_list, message):
    with pytest.raises(TraitError) as e:
        make(profile_list=profile_list)
    assert message in str(e.value)
    assert "profile_list" in str(e.value)


def test_an_override_of_an_unknown_setting_names_the_profile_and_the_key():
    with pytest.raises(TraitError, match="profile 'a'.*'imagee'"):
        make(profile_list=[{"display_name": "A", "spawner_override": {"imagee": "x"}}])


def test_an_override_may_set_jupyterhubs_and_lxdspawners_settings():
    override = {"default_url": "/lab", "remove": False, "profiles": ["default", "gpu"]}
    make(profile_list=[{"display_name": "A", "spawner_override": override}])


# -- the user's choice -----------------------------------------------------------------------


def test_no_profile_named_takes_the_default_else_the_first():
    offered = normalize(PROFILES)
    assert select(offered, {}, ["gpu-users"]).profile.slug == "small-cpu"
    second_default = [dict(PROFILES[0], default=False), dict(PROFILES[1], groups=None)]
    assert select(normalize(second_default), None, []).profile.slug == "small-cpu"
    flipped = [dict(PROFILES[1], groups=None, default=True), PROFILES[0]]
    assert select(normalize(flipped), {}, []).profile.slug == "gpu"


def test_groups_decide_who_may_use_a_profile():
    offered = normalize(PROFILES)
    with pytest.raises(OptionsError, match="'gpu' is only for members of other groups"):
        select(offered, {"profile": "gpu"}, ["students"])
    assert select(offered, {"profile": "gpu"}, ["students", "gpu-users"]).profile.slug == "gpu"
    assert [p.slug for p in profiles.visible(offered, ["students"])] == ["small-cpu"]
    only_gpu = normalize([PROFILES[1]])
    with pytest.raises(OptionsError, match="no profile is available"):
        select(only_gpu, {}, [])


def test_choices_merge_over_the_profiles_override():
    offered = normalize(PROFILES)
    chosen = select(offered, {"profile": "gpu", "image": "torch"}, ["gpu-users"])
    assert chosen.override == {"mem_limit": "16G", "image": "torch", "environment": {"FW": "torch"}}
    default = select(offered, {"profile": "gpu"}, ["gpu-users"])
    assert default.choices == {"image": "jax"} and default.override["image"] == "jax"


@pytest.mark.parametrize(
    ("user_options", "message"),
    [
        ({"profile": "nope"}, "unknown profile 'nope'"),
        ({"profile": "gpu", "image": "tensorflow"}, "unknown choice 'tensorflow'"),
        ({"profile": "gpu", "image": "torch", "privileged_containers": True}, "unknown user opt"),
        ({"profile": "small-cpu", "image": "torch"}, "unknown user option(s) image"),
        ({"profile": "small-cpu", "image--unlisted-choice": "x"}, "unknown user option"),
        ({"profile": "gpu", "image--unlisted-choice": "Bad Name"}, "lower-case letters"),
        ({"profile": "gpu", "image--unlisted-choice": "a{username}"}, "braces"),
        ({"profile": "gpu", "image--unlisted-choice": "a\nb"}, "control characters"),
        ({"profile": "gpu", "image": UNLISTED}, "needs a value"),
        ({"profile": "gpu", "image": "jax", "image--unlisted-choice": "x"}, "not both"),
        ({"profile": ["gpu"]}, "must be a profile's slug"),
        ({"profile": "gpu", "image": 3}, "must be a string"),
        ({"profile": "gpu", "image--unlisted-choice": 3}, "must be a string"),
    ],
)
def test_what_is_not_offered_is_refused_naming_it(user_options, message):
    with pytest.raises(OptionsError) as e:
        select(normalize(PROFILES), user_options, ["gpu-users"])
    assert message in str(e.value)


def test_an_unlisted_value_must_match_the_whole_regex():
    offered = normalize(PROFILES)
    with pytest.raises(OptionsError, match="not accepted"):
        select(offered, {"profile": "gpu", "image--unlisted-choice": "ok-but/not"}, ["gpu-users"])


def test_an_unlisted_value_fills_value_in_the_operators_strings_only():
    offered = normalize(PROFILES)
    for options in (
        {"profile": "gpu", "image--unlisted-choice": "my-image"},
        {"profile": "gpu", "image": UNLISTED, "image--unlisted-choice": "my-image"},
    ):
        chosen = select(offered, options, ["gpu-users"])
        assert chosen.choices == {"image": UNLISTED} and chosen.values == {"image": "my-image"}
        assert chosen.override == {
            "mem_limit": "16G",
            "image": "my-image",
            "environment": {"CUSTOM": "image my-image"},
        }


def test_an_unlisted_value_where_none_is_enabled_is_refused():
    no_unlisted = [
        {
            "display_name": "A",
            "profile_options": {"size": {"choices": {"s": {}}, "unlisted_choice": {}}},
        }
    ]
    with pytest.raises(OptionsError, match="takes no value of your own"):
        select(normalize(no_unlisted), {"size--unlisted-choice": "huge"}, [])


@given(st.text(max_size=30))
def test_a_value_only_ever_replaces_the_placeholder_never_a_key(value):
    override = {"environment": {"{value}": "x-{value}-{other}"}, "args": ["{value}", 1]}
    out = profiles.substitute(override, value)
    assert list(out["environment"]) == ["{value}"]
    assert out["environment"]["{value}"] == f"x-{value}-{{other}}"
    assert out["args"] == [value, 1]


@given(
    st.dictionaries(
        st.sampled_from(["profile", "image", "x", "image--unlisted-choice"]), st.text(max_size=12)
    )
)
def test_whatever_the_user_sends_the_override_is_one_the_operator_wrote(options):
    offered = normalize(PROFILES)
    try:
        chosen = select(offered, options, ["gpu-users"])
    except OptionsError:
        return
    images = {"cuda", "torch", "jax", chosen.values.get("image")}
    assert set(chosen.override) <= {"mem_limit", "image", "environment"}
    assert chosen.override.get("image") in images
    if chosen.values:
        assert re.fullmatch(r"[a-z0-9-]+", chosen.values["image"])


# -- on the spawner ----------------------------------------------------------------------------


async def test_the_profile_sets_the_spawner_and_the_next_spawn_starts_from_the_config():
    s = make(["gpu-users"], {"profile": "gpu", "image": "torch"}, profile_list=PROFILES)
    assert s.image == "jupyter-base"
    await s.apply_profile()
    assert (s.image, s.mem_limit, s.profile_slug) == ("torch", 16 * 1024**3, "gpu")
    assert s.environment == {"BASE": "1", "FW": "torch"}  # merged into the configured dict

    s.user_options = {"profile": "small-cpu"}
    s.clear_state()  # what JupyterHub does at every spawn's beginning
    assert (s.image, s.mem_limit, s.environment) == ("jupyter-base", None, {"BASE": "1"})
    await s.apply_profile()
    assert s.image == "jupyter-base" and s.mem_limit == 2 * 1024**3
    assert s.environment == {"BASE": "1", "SIZE": "small"}

    # Without clear_state (start() called alone) the previous profile is undone too.
    s.user_options = {"profile": "gpu", "image--unlisted-choice": "mine"}
    await s.apply_profile()
    assert s.environment == {"BASE": "1", "CUSTOM": "image mine"} and s.image == "mine"


async def test_a_none_in_a_dict_override_removes_that_key():
    listed = [{"display_name": "A", "spawner_override": {"environment": {"BASE": None}}}]
    s = make(profile_list=listed)
    await s.apply_profile()
    assert s.environment == {}
    s.clear_state()
    assert s.environment == {"BASE": "1"}


async def test_a_refused_choice_is_a_400_and_changes_nothing():
    s = make([], {"profile": "gpu"}, profile_list=PROFILES)
    with pytest.raises(SpawnError) as e:
        await s.apply_profile()
    assert e.value.status_code == 400 and "only for members" in e.value.message
    assert s.image == "jupyter-base" and s.profile_slug is None


async def test_an_override_that_does_not_fit_its_setting_is_undone_whole():
    listed = [{"display_name": "A", "spawner_override": {"image": "x", "process_limit": "many"}}]
    s = make(profile_list=listed)
    with pytest.raises(SpawnError) as e:
        await s.apply_profile()
    assert "profile 'a': spawner_override process_limit = 'many'" in e.value.message
    assert e.value.status_code == 500  # the operator's: no value of the user's in it
    assert s.image == "jupyter-base"


async def test_a_callable_and_an_async_callable_profile_list():
    seen = []

    def sync_list(spawner):
        seen.append(spawner.user.name)
        return PROFILES[:1]

    async def async_list(spawner):
        return [dict(PROFILES[0], spawner_override={"image": f"for-{spawner.user.name}"})]

    s = make(profile_list=sync_list)
    await s.apply_profile()
    assert seen == ["ana"] and s.mem_limit == 2 * 1024**3
    s = make(profile_list=async_list)
    await s.apply_profile()
    assert s.image == "for-ana"
    assert 'value="small-cpu"' in await s.get_options_form()
    s = make(profile_list=lambda spawner: [{"display_name": "A", "spawner_override": {"x": 1}}])
    with pytest.raises(SpawnError, match="profile_list: profile 'a'.*'x'"):
        await s.apply_profile()
    with pytest.raises(SpawnError, match="profile_list: profile 'a'.*'x'"):
        await s.get_options_form()


async def test_override_values_may_be_callables_taking_the_spawner():
    async def home(spawner):
        return f"/data/{spawner.user.name}"

    listed = [
        {
            "display_name": "A",
            "spawner_override": {"home_dir": home, "default_url": lambda s: "/lab"},
        }
    ]
    s = make(profile_list=listed)
    await s.apply_profile()
    assert (s.home_dir, s.default_url) == ("/data/ana", "/lab")


async def test_no_profile_list_no_form_and_user_options_untouched():
    s = make(user_options={"anything": 1})
    assert await s.get_options_form() == ""
    assert await s.apply_profile() is None
    assert s.run_options_from_form({"a": ["b"]}) == {"a": ["b"]}


def test_after_a_hub_restart_the_running_servers_profile_is_in_effect_again():
    listed = [{"display_name": "Keep", "spawner_override": {"remove": False}}]
    s = make([], {"profile": "keep"}, profile_list=listed)
    s.load_state({"lxd_state_version": 2, "instance": "jupyter-ana", "endpoint": ""})
    assert s.remove is False
    s.clear_state()
    assert s.remove is True


# -- the form --------------------------------------------------------------------------------


def test_options_from_form_takes_the_chosen_profiles_fields_only():
    form = {
        "profile": ["gpu"],
        "profile-option-gpu--image": ["torch"],
        "profile-option-gpu--image--unlisted-choice": ["remembered-but-not-chosen"],
        "profile-option-small-cpu--size": ["big"],
    }
    assert options_from_form(form) == {"profile": "gpu", "image": "torch"}
    form["profile-option-gpu--image"] = [UNLISTED]
    assert options_from_form(form) == {
        "profile": "gpu",
        "image": UNLISTED,
        "image--unlisted-choice": "remembered-but-not-chosen",
    }
    assert options_from_form({}) == {}


async def test_the_form_shows_what_the_user_may_choose_and_preselects_the_last_choice():
    s = make(["gpu-users"], {"profile": "gpu", "image": "torch"}, profile_list=PROFILES)
    page = await s.get_options_form()
    assert re.search(r'value="gpu"\s+checked', page)
    assert not re.search(r'value="small-cpu"\s+checked', page)
    assert re.search(r'<option value="torch" selected>PyTorch', page)
    assert '<option value="jax">' in page
    assert "Big &lt;GPU&gt; &amp; co" in page  # the operator's text, escaped
    assert 'name="profile-option-gpu--image--unlisted-choice"' in page

    # A member of no group sees the default profile only, preselected.
    s = make([], {"profile": "gpu"}, profile_list=PROFILES)
    page = await s.get_options_form()
    assert 'value="gpu"' not in page and re.search(r'value="small-cpu"\s+checked', page)


def test_the_form_round_trips_and_escapes_the_users_own_value():
    offered = normalize(PROFILES)
    value = 'x"><script>alert(1)</script>'
    page = render_form(offered, {"profile": "gpu", "image--unlisted-choice": value})
    assert "<script>" not in page
    assert 'value="x&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert re.search(rf'<option value="{UNLISTED}" selected>', page)

    # What a browser submits from the page as shown is the choice it showed.
    fields = dict(re.findall(r'name="([^"]+)"[^>]*?value="([^"]*)"', page))
    chosen = re.search(r'name="profile" value="([^"]+)"\s+checked', page).group(1)
    submitted = {"profile": [chosen]}
    for name in re.findall(r'<select name="([^"]+)"', page):
        selected = re.search(
            rf'<select name="{re.escape(name)}".*?<option value="([^"]+)" selected', page, re.S
        )
        first = re.search(
            rf'<select name="{re.escape(name)}".*?<option value="([^"]+)"', page, re.S
        )
        submitted[name] = [(selected or first).group(1)]
    for name, val in fields.items():
        if name.endswith("--unlisted-choice"):
            submitted[name] = [html.unescape(val)]
    options = options_from_form(submitted)
    assert options == {
        "profile": "gpu",
        "image": UNLISTED,
        "image--unlisted-choice": value,
    }


def test_an_operators_template_replaces_the_form():
    template = (
        "{% for p in profile_list %}[{{ p.slug }}"
        "{% if p.slug == selected %}*{% endif %}]{% endfor %}"
    )
    s_page = render_form(normalize(PROFILES), {"profile": "gpu"}, template)
    assert s_page == "[small-cpu][gpu*]"


def test_the_template_is_package_data():
    assert "<input" in profiles.default_template()


def test_after_a_hub_restart_an_async_profile_list_is_left_for_the_next_spawn():
    async def listed(spawner):
        return [{"display_name": "Keep", "spawner_override": {"remove": False}}]

    s = make([], {"profile": "keep"}, profile_list=listed)
    s.load_state({"lxd_state_version": 2, "instance": "jupyter-ana", "endpoint": ""})
    assert s.remove is True and s.profile_slug is None
