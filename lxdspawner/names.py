"""Instance names from JupyterHub user and server names.

LXD and Incus instance names are 1 to 63 characters of ASCII letters, digits and hyphens,
start with a letter and do not end with a hyphen. JupyterHub usernames may be almost anything
(``ana.maria@uni.es``, ``Élodie``, 80 characters), so:

- a username that is already a safe name stays as it is: ``alice`` → ``jupyter-alice``;
- anything else becomes a readable slug plus 8 hex digits of the SHA-256 of the exact raw
  name: ``ana.maria@uni.es`` → ``jupyter-ana-maria-uni-es-1a2b3c4d``;
- a named server always carries a hash of the (user, server) pair:
  ``jupyter-alice-lab-5e6f7a8b``.

A name kept as it is never ends in ``-`` plus 8 hex digits, and every hashed name does, so
the two kinds cannot collide; hashed names only collide if SHA-256 prefixes do. The rules
never change for a given input, so names are stable across hub restarts and upgrades.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_LENGTH = 63
HASH_LENGTH = 8
DEFAULT_PREFIX = "jupyter"

# fullmatch and \Z, never "$": "$" also matches before a final newline ("alice\n").
_SAFE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_ENDS_LIKE_HASH = re.compile(rf"-[0-9a-f]{{{HASH_LENGTH}}}\Z")
_PREFIX = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


def _digest(*parts: str) -> str:
    # NUL cannot occur in either name, so ("ab", "c") and ("a", "bc") hash differently.
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:HASH_LENGTH]


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


def instance_name(username: str, server_name: str = "", prefix: str = DEFAULT_PREFIX) -> str:
    """The instance name for a user's default server (``server_name=""``) or a named one."""
    validate_prefix(prefix)
    room = MAX_LENGTH - len(prefix) - 1
    if not server_name:
        if _is_kept_as_is(username, room):
            return f"{prefix}-{username}"
        return _join(prefix, slugify(username), _digest(username))
    # Keep the user part readable first; the server part gets what room is left.
    user_slug = slugify(username)[:24].strip("-")
    slug = "-".join(s for s in (user_slug, slugify(server_name)) if s)
    return _join(prefix, slug, _digest(username, server_name))


def is_valid_instance_name(name: str) -> bool:
    return (
        1 <= len(name) <= MAX_LENGTH
        and bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name))
        and not name.endswith("-")
    )
