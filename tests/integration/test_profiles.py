"""Profiles through a real JupyterHub and Incus: servers started through the REST API with
``user_options`` get their profile's settings (seen in the container and in the server's
environment); what is not offered is refused with HTTP 400 and a message, and nothing is made
for it. One hub for all of it, its profile_list an async callable."""

from __future__ import annotations

import asyncio

from lxdspawner.lxd import NotFound
from lxdspawner.names import instance_name
from testbench.hubtools import q, running_hub, server_api_path

from .test_spawner import server_pid, sh

PROFILES = """
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = PREFIX
c.LxdSpawner.home_volume_size = ""
c.LxdSpawner.get_uid_gid = lambda spawner: (1000, 1000)
c.Spawner.environment = {"SITE": "campus"}
c.Spawner.start_timeout = 90


async def profile_list(spawner):
    return [
        {
            "display_name": "Small",
            "default": True,
            "spawner_override": {"mem_limit": "512M", "environment": {"SIZE": "small"}},
        },
        {
            "display_name": "Large (staff)",
            "slug": "large",
            "groups": ["staff"],
            "spawner_override": {"mem_limit": "1G", "environment": {"SIZE": "large"}},
            "profile_options": {
                "course": {
                    "display_name": "Course",
                    "choices": {
                        "intro": {"spawner_override": {"environment": {"COURSE": "intro"}}}
                    },
                    "unlisted_choice": {
                        "enabled": True,
                        "validation_regex": "[a-z]{2,10}",
                        "validation_message": "2 to 10 lower-case letters",
                        "spawner_override": {"environment": {"COURSE": "{value}"}},
                    },
                },
            },
        },
    ]


c.LxdSpawner.profile_list = profile_list
"""


async def environ(incus, name: str) -> dict[str, str]:
    pid = await server_pid(incus, name)
    lines = (await sh(incus, name, f"tr '\\0' '\\n' < /proc/{pid}/environ")).splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


async def refused(hub, incus, prefix: str, user: str, options: dict) -> str:
    """Start ``user``'s server with ``options``: it must be a 400, and no container made."""
    await hub.ensure_user(user)
    status, body = await hub.api("POST", server_api_path(user), json={"user_options": options})
    assert status == 400, (status, body)
    try:
        await incus.get_instance(instance_name(user, "", prefix))
    except NotFound:
        pass
    else:
        raise AssertionError(f"a container was made for {user}'s refused server")
    return body["message"]


async def test_profiles_choose_the_settings_and_nothing_else(tmp_path, prefix, incus, leftovers):
    config = PROFILES.replace("PREFIX", repr(prefix))
    async with running_hub(tmp_path, config) as hub:
        await hub.ensure_user("ana")
        await hub.ensure_user("bob")
        status, body = await hub.api("POST", f"/groups/{q('staff')}", json={"users": ["ana"]})
        assert status == 201, body

        message = await refused(hub, incus, prefix, "bob", {"profile": "large"})
        assert "'large' is only for members of other groups" in message
        message = await refused(hub, incus, prefix, "bob", {"profile": "huge"})
        assert "unknown profile 'huge'" in message
        message = await refused(
            hub, incus, prefix, "ana", {"profile": "large", "course--unlisted-choice": "Phys 1"}
        )
        assert "'Phys 1' is not accepted: 2 to 10 lower-case letters" in message
        message = await refused(hub, incus, prefix, "ana", {"profile": "large", "image": "x"})
        assert "unknown user option(s) image" in message

        # A member of staff gets the large profile with a course of her own; cleo, who names
        # none, the default. (Not bob: a start without user_options reuses the last ones,
        # which JupyterHub keeps even when they were refused.)
        await asyncio.gather(
            hub.start_server(
                "ana", user_options={"profile": "large", "course--unlisted-choice": "physics"}
            ),
            hub.start_server("cleo"),
        )
        ana, bob = instance_name("ana", "", prefix), instance_name("cleo", "", prefix)
        assert (await incus.get_instance(ana))["config"]["limits.memory"] == str(1024**3)
        assert (await incus.get_instance(bob))["config"]["limits.memory"] == str(512 * 1024**2)
        env = await environ(incus, ana)
        assert (env["SITE"], env["SIZE"], env["COURSE"]) == ("campus", "large", "physics")
        env = await environ(incus, bob)
        assert (env["SITE"], env["SIZE"]) == ("campus", "small") and "COURSE" not in env

        assert "unhandled user_options" not in hub.log()

        # ana's next server, with the small profile, keeps nothing of the large one.
        await hub.stop_server("ana")
        await hub.start_server("ana", user_options={"profile": "small"})
        assert (await incus.get_instance(ana))["config"]["limits.memory"] == str(512 * 1024**2)
        env = await environ(incus, ana)
        assert env["SIZE"] == "small" and "COURSE" not in env
