"""Every name lxdspawner gives, and the parsers of those it must recognise.

Servers' instances (from JupyterHub user and server names, below); the shared read-only
copies of an image's directories (:func:`shared_volume_name`, parsed back by
:func:`shared_volume_fingerprint` for ``lxdspawner gc``), their disk devices and the helper
containers that fill them; LXD 5.0's shifted bases (:func:`base_name`); the warm pool's members
(:func:`pool_member_name`); the prepull helpers; the doctor's probes (:func:`probe_name`); the
network ACLs (:func:`acl_name`). One function per format: change one, and what parses it
changes with it.

Instance names from JupyterHub user and server names:

LXD and Incus instance names are 1 to 63 characters of ASCII letters, digits and hyphens,
start with a letter and do not end with a hyphen. JupyterHub usernames may be almost anything
(``ana.maria@uni.es``, ``Élodie``, 80 characters), so:

- a username that is already a safe name stays as it is: ``alice`` → ``jupyter-alice``;
- anything else becomes a readable slug plus 16 hex digits (64 bits) of the SHA-256 of the
  exact raw name: ``ana.maria@uni.es`` → ``jupyter-ana-maria-uni-es-1a2b3c4d5e6f7a8b``;
- a named server always carries a hash of the (user, server) pair:
  ``jupyter-alice-lab-5e6f7a8b9c0d1e2f``.

A name kept as it is never ends in ``-`` plus 8 hex digits, and every hashed name does, so
the two kinds cannot collide; hashed names only collide if SHA-256 prefixes do. A name is
never proof of ownership all the same (users choose their names, and other hubs or people
may hold one): the spawner checks an instance's keys (see :mod:`ownership`) and, when a name
is held by anything else, takes the next of the server's numbered alternatives
(``attempt=1, 2, ...``), which hash the attempt in too.

The rules never change for a given input, so names are stable across hub restarts; a server
recorded in the hub's state keeps its name whatever these rules say later (8 hex digits until
version 0.1).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata

MAX_LENGTH = 63
HASH_LENGTH = 16
DEFAULT_PREFIX = "jupyter"

# fullmatch and \Z, never "$": "$" also matches before a final newline ("alice\n").
_SAFE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
# A kept name never ends in "-" and 8 or more hex digits: every hashed name does (16 now, 8
# before), so the two kinds cannot collide.
_ENDS_LIKE_HASH = re.compile(r"-[0-9a-f]{8,}\Z")
_PREFIX = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


def _digest(*parts: str) -> str:
    # Each part is prefixed with its length, so ("ab", "c") and ("a", "bc") hash differently
    # whatever characters the names hold.
    framed = "".join(f"{len(p)}:{p}" for p in parts)
    return hashlib.sha256(framed.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LENGTH]


def slugify(raw: str) -> str:
    """Lower-case ASCII letters and digits, with single hyphens between runs: readable, lossy."""
    ascii_text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def _is_kept_as_is(name: str, room: int) -> bool:
    return len(name) <= room and bool(_SAFE.fullmatch(name)) and not _ENDS_LIKE_HASH.search(name)


def _join(prefix: str, slug: str, digest: str) -> str:
    room = MAX_LENGTH - len(prefix) - 1 - len(digest) - 1
    slug = slug[:room].strip("-")
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


def validate_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix) or len(prefix) > 20 or prefix.endswith("-"):
        raise ValueError(
            f"name prefix {prefix!r} is not usable: it must start with a letter, hold only "
            "letters, digits and hyphens, not end with a hyphen, and be at most 20 characters"
        )
    return prefix


def instance_name(
    username: str, server_name: str = "", prefix: str = DEFAULT_PREFIX, attempt: int = 0
) -> str:
    """The instance name for a user's default server (``server_name=""``) or a named one.

    ``attempt`` > 0 gives the server's numbered alternatives, for when the usual name is held
    by an instance that is not this server's.
    """
    validate_prefix(prefix)
    room = MAX_LENGTH - len(prefix) - 1
    if not server_name and not attempt:
        if _is_kept_as_is(username, room):
            return f"{prefix}-{username}"
        return _join(prefix, slugify(username), _digest(username))
    # Keep the user part readable first; the server part gets what room is left.
    user_slug = slugify(username)[:24].strip("-")
    slug = "-".join(s for s in (user_slug, slugify(server_name)) if s)
    parts = (username, server_name) + ((f"attempt {attempt}",) if attempt else ())
    return _join(prefix, slug, _digest(*parts))


#: Longest file name Linux file systems take, in bytes.
_MAX_COMPONENT = 255


def is_safe_path_component(text: str) -> bool:
    """Whether ``text`` can stand as one directory name: not ``.`` or ``..``, no ``/``, no
    control or line-separating character (systemd ends lines at CR and NUL too), not empty,
    at most 255 bytes."""
    return (
        text not in ("", ".", "..")
        and "/" not in text
        and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") for c in text)
        and len(text.encode("utf-8", "surrogatepass")) <= _MAX_COMPONENT
    )


def home_component(username: str) -> str:
    """The user's directory name under /home: the username when it is a safe path component,
    else a readable slug plus a hash (``..`` → ``user-3f2a...``). It lives in the user's own
    container, so it need not be unique among users; it must only stay one directory."""
    if is_safe_path_component(username):
        return username
    slug = slugify(username)[:40].strip("-") or "user"
    return f"{slug}-{_digest(username)}"


def home_path(template: str, username: str) -> str:
    """``home_dir`` for a user: ``{username}`` (or ``{USERNAME}``) becomes one safe directory
    name (:func:`home_component`); the result must be an absolute path below /."""
    component = home_component(username)
    home = template.replace("{username}", component).replace("{USERNAME}", component)
    home = posixpath.normpath(home) if home.startswith("/") else home
    if not home.startswith("/") or home == "/":
        raise ValueError(
            f"home_dir = {template!r} gives {home!r} for this user: it must be an absolute "
            "path below /"
        )
    return home


def is_valid_instance_name(name: str) -> bool:
    return (
        1 <= len(name) <= MAX_LENGTH
        and bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name))
        and not name.endswith("-")
    )


# -- the names of what lxdspawner makes per image, not per user ------------------------------

SHARED_VOLUME_PREFIX = "lxdspawner-shared"
#: The disk device of a shared directory in a server (and of the volume in its fill helper).
SHARED_DEVICE = "lxdspawner-shared"
_SHARED_VOLUME = re.compile(
    re.escape(SHARED_VOLUME_PREFIX) + r"-(?P<fingerprint>[0-9a-f]{12})-[0-9a-f]{6}"
)


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _path_digest(path: str) -> str:
    return _short(path.rstrip("/"))


def shared_volume_name(fingerprint: str, path: str) -> str:
    """The read-only copy of ``path`` of an image: the same for every hub on the daemon,
    since the copy depends only on the image and the path."""
    return f"{SHARED_VOLUME_PREFIX}-{fingerprint[:12]}-{_path_digest(path)}"


def shared_volume_fingerprint(name: str) -> str | None:
    """The (12-digit) image fingerprint of a shared volume's name; None for any other name."""
    match = _SHARED_VOLUME.fullmatch(name)
    return match["fingerprint"] if match else None


def shared_device_name(path: str) -> str:
    return f"{SHARED_DEVICE}-{_path_digest(path)}"


def fill_helper_name(fingerprint: str, path: str, member: str | None) -> str:
    """The container that fills a shared volume; instance names are unique in a whole
    cluster, so one per member."""
    return f"{shared_volume_name(fingerprint, path)}-fill-{_short(member or '')}"


def base_name(prefix: str, fingerprint: str) -> str:
    """LXD 5.0's stopped base of an image, which servers are copies of."""
    return f"{prefix}-base-{fingerprint[:12]}"


#: A warm pool member: ``<prefix>-pool-<8 hex of its key>-<8 random hex>``.
_POOL_MEMBER = re.compile(
    r"(?P<prefix>[a-zA-Z][a-zA-Z0-9-]*)-pool-(?P<key>[0-9a-f]{8})-[0-9a-f]{8}"
)


def pool_member_name(prefix: str, key: str, token: str) -> str:
    """A warm pool member (see pool.py): ``token`` is 8 random hex digits, so members of one
    key never collide. It ends like a hashed name (``-`` and 8 hex digits), which a username
    kept as it is never does; a name is not proof of anything all the same: a member is known
    by its keys."""
    validate_prefix(prefix)
    if not re.fullmatch(r"[0-9a-f]{8}", token):
        raise ValueError(f"pool member token {token!r}: must be 8 hex digits")
    return f"{prefix}-pool-{key[:8]}-{token}"


def is_pool_member_name(name: str) -> bool:
    """Whether ``name`` has the form of :func:`pool_member_name` (for display and for not
    reusing a claimed member's name; never for ownership)."""
    return bool(_POOL_MEMBER.fullmatch(name))


def prepull_name(token: str) -> str:
    """A ``lxdspawner prepull`` helper (``token``: random, so runs never collide)."""
    return f"lxdspawner-prepull-{token}"


def probe_name(token: str) -> str:
    """A ``lxdspawner doctor`` probe container (``token``: random, so runs never collide)."""
    return f"lxdspawner-doctor-{token}"


def acl_name(prefix: str, *parts: str) -> str:
    """A network ACL: ``<prefix>-`` and 8 hex digits of ``parts`` (a valid ACL name on both
    daemons when the prefix is; see network.py)."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"{prefix}-{digest[:8]}"


# -- users' volumes ---------------------------------------------------------------------------

#: The placeholders a volume name template may hold (``volumes`` keys).
VOLUME_PLACEHOLDERS = ("{username}", "{servername}")


def _is_plain_volume_name(name: str) -> bool:
    return len(name) <= MAX_LENGTH and bool(_SAFE.fullmatch(name))


def volume_name(template: str, username: str = "", server_name: str = "") -> str:
    """A custom volume's name from a ``volumes`` key (``scratch-{username}``).

    The instance names' rules: a template without placeholders (a shared volume the operator
    names) must already be a safe name and is used as it is; ``{username}`` alone becomes the
    username when it is safe and does not end like a hash (``scratch-alice``); anything else
    (an unsafe username, any ``{servername}``) becomes a readable slug plus 16 hex digits of
    the template, the raw username and the raw server name (``scratch-ana-maria-1a2b...``),
    so two users, or two servers, never share a name. Raises ValueError naming the template
    when it cannot give a safe name.
    """
    if not any(p in template for p in VOLUME_PLACEHOLDERS):
        if (
            not _is_plain_volume_name(template)
            or _ENDS_LIKE_HASH.search(template)
            or not template[0].isalpha()
        ):
            raise ValueError(
                f"volume name {template!r} is not usable: a lower-case letter, then letters, "
                f"digits and single hyphens, at most {MAX_LENGTH} characters, not ending in '-' "
                "and 8 or more hex digits"
            )
        return template
    rest = template.replace("{username}", "").replace("{servername}", "")
    if "{" in rest or "}" in rest or (rest and not _SAFE.fullmatch(rest.strip("-"))):
        raise ValueError(
            f"volume name template {template!r} is not usable: besides {{username}} and "
            "{servername} it may hold lower-case letters, digits and hyphens only"
        )
    if "{servername}" not in template and _is_kept_as_is(username, MAX_LENGTH):
        name = template.replace("{username}", username)
        if _is_plain_volume_name(name) and not _ENDS_LIKE_HASH.search(name) and name[0].isalpha():
            return name
    slug = slugify(
        template.replace("{username}", slugify(username)[:24]).replace(
            "{servername}", slugify(server_name)[:16]
        )
    )
    digest = _digest("volume", template, username, server_name)
    if not slug[:1].isalpha():
        slug = f"v-{slug}"
    slug = slug[: MAX_LENGTH - len(digest) - 1].strip("-")
    return f"{slug}-{digest}"


def home_volume_name(
    username: str, server_name: str = "", prefix: str = DEFAULT_PREFIX, per_server: bool = False
) -> str:
    """A user's home volume: ``jupyter-home-alice``; with ``per_server``, a named server has
    its own (``jupyter-home-alice-lab-<hash>``), the default server keeps the user's."""
    validate_prefix(prefix)
    if per_server and server_name:
        return volume_name(f"{prefix}-home-{{username}}-{{servername}}", username, server_name)
    return volume_name(f"{prefix}-home-{{username}}", username)


#: The disk device of a user's volume in their server: ``lxdspawner-vol-<6 hex of the path>``.
VOLUME_DEVICE = "lxdspawner-vol"


def volume_device_name(path: str) -> str:
    return f"{VOLUME_DEVICE}-{_path_digest(path)}"
