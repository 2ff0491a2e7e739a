"""Which cluster member a new server goes to: pure functions, no I/O.

The spawner takes a snapshot (the members as LXD reports them, our instances, the spawns it
has in flight, ``host_weights``), turns it into `Member` values with `members_from_api`,
and asks the placement policy for a member name; it then creates the instance with that
explicit ``target``. LXD's own scheduler is not used: LXD 5.0's only counts instances, and
no scheduler can know about the spawns this hub has started but LXD has not yet created.
Counting those (``in_flight``) is what spreads a burst: 30 students pressing Start together
land 10/10/10 on three equal members, not 30/0/0.

The policy is one function an operator can replace (``c.LxdSpawner.placement_policy``)::

    def placement_policy(members: Sequence[Member], request: PlacementRequest) -> str:
        '''Return the name of the member to create the server on, or raise
        NoMemberAvailable (its message is shown to the user and logged).'''

It receives every member of the cluster, usable or not, and must be fast (it runs in the
hub's event loop for every spawn) and must not block. `weighted_least_loaded` is the
default; a custom policy can wrap it, e.g. to keep a class on its own members::

    def by_course(members, request):
        if request.user.startswith("cs101-"):
            request = dataclasses.replace(request, require="@cs101")
        return weighted_least_loaded(members, request)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import capacity
from .objects import KEY_MANAGED, MANAGED_BY

#: The only status in which LXD accepts new instances on a member. Others seen in
#: ``/1.0/cluster/members``: "Offline" (no heartbeat within cluster.offline_threshold),
#: "Evacuated" (drained by ``cluster evacuate``), "Blocked" (waiting for an upgrade).
ONLINE = "Online"


@dataclass(frozen=True)
class Member:
    """One cluster member as placement sees it.

    ``instances``: our instances on it (any state: a stopped container still holds its
    disk and comes back); ``in_flight``: spawns this hub has targeted at it that have not
    finished yet; ``weight``: from ``host_weights`` (default 1.0; 0 means never).
    """

    name: str
    status: str
    groups: tuple[str, ...]
    instances: int
    in_flight: int
    weight: float = 1.0
    #: Only when the request needs capacity (guarantees, GPUs; see capacity.py): what
    #: ``/1.0/resources`` says the member has (None: not read, ``resources_error`` says why),
    #: and what our servers on it and the spawns in flight to it are guaranteed and hold.
    resources: capacity.Resources | None = None
    resources_error: str = ""
    usage: capacity.Usage = capacity.NOTHING

    @property
    def load(self) -> int:
        return self.instances + self.in_flight

    @property
    def score(self) -> float:
        """weight / (instances + in_flight + 1): the highest score wins."""
        return self.weight / (self.load + 1)


@dataclass(frozen=True)
class PlacementRequest:
    """What is being placed. ``require``: None (anywhere), a member name, or "@group"
    (any member of that cluster group)."""

    user: str
    server_name: str = ""
    require: str | None = None
    #: The member holding the user's volume (``data_volume``) on a pool local to each
    #: member: the server must go there, whatever ``require`` and the weights say.
    data_member: str | None = None
    data_volume: str = ""
    #: The server's guarantees and GPUs (see capacity.py): empty, placement counts only.
    need: capacity.Need = capacity.Need()


class NoMemberAvailable(Exception):
    """No member can take the server. The message names every member and why it was skipped;
    ``reasons`` maps member name to that reason."""

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reasons = dict(reasons or {})


#: The signature of a placement policy: every member (usable or not) and the request in,
#: the chosen member's name out; raise NoMemberAvailable when none will do.
PlacementPolicy = Callable[[Sequence[Member], PlacementRequest], str]


def why_unusable(member: Member, require: str | None = None) -> str | None:
    """Why ``member`` cannot take a new server under ``require``, or None if it can."""
    if require:
        if require.startswith("@"):
            if require[1:] not in member.groups:
                groups = ", ".join(member.groups) or "none"
                return f"not in cluster group {require[1:]!r} (its groups: {groups})"
        elif member.name != require:
            return f"not the required member {require!r}"
    if member.status != ONLINE:
        return f"status {member.status!r}, not Online"
    if member.weight <= 0:
        return "weight 0 in host_weights"
    return None


def why_full(member: Member, request: PlacementRequest) -> str | None:
    """Why ``member`` has no room for the request's guarantees and GPUs, or None."""
    return capacity.why_full(member.resources, member.usage, request.need, member.resources_error)


def why_not(member: Member, request: PlacementRequest) -> str | None:
    """Why ``member`` cannot take the request's server: unusable, or full; None if it can."""
    return why_unusable(member, request.require) or why_full(member, request)


def with_capacity(
    members: Sequence[Member],
    resources: Mapping[str | None, capacity.Resources | str],
    usage: Mapping[str | None, capacity.Usage],
) -> list[Member]:
    """``members`` with what each has (its resources, or why they could not be read) and
    what our servers and the spawns in flight hold there."""
    out = []
    for m in members:
        have = resources.get(m.name, "not read: the member is not Online")
        out.append(
            replace(
                m,
                resources=have if isinstance(have, capacity.Resources) else None,
                resources_error=have if isinstance(have, str) else "",
                usage=usage.get(m.name, capacity.NOTHING),
            )
        )
    return out


def held(member: Member, request: PlacementRequest) -> capacity.Usage:
    """What the request's server holds on ``member``, which has room for it: its guarantees
    and the GPUs chosen there."""
    need = request.need
    gpus: tuple[str, ...] = ()
    if need.gpu is not None and member.resources is not None:
        chosen = capacity.choose_gpus(member.resources, member.usage, need.gpu)
        gpus = chosen if isinstance(chosen, tuple) else ()
    return capacity.Usage(need.mem, need.cpu, frozenset(gpus))


def weighted_least_loaded(members: Sequence[Member], request: PlacementRequest) -> str:
    """The default policy: among usable members, the highest weight / (load + 1).

    Usable: Online, weight above 0, and matching ``request.require``. Load counts our
    instances and the spawns in flight. Ties go to the first name in sort order, so the
    same snapshot always gives the same answer. This is the original LXD spawner's rule
    ("fewest containers, weighted by host_weights"), plus the in-flight spawns.
    """
    if request.data_member:
        return pinned(members, request)
    best: Member | None = None
    best_score = 0.0
    require = request.require
    for member in members:
        if why_unusable(member, require) is not None:
            continue
        if request.need and why_full(member, request) is not None:
            continue
        score = member.weight / (member.instances + member.in_flight + 1)
        if best is None or score > best_score or (score == best_score and member.name < best.name):
            best, best_score = member, score
    if best is None:
        raise no_member_available(members, request)
    return best.name


def pinned(members: Sequence[Member], request: PlacementRequest) -> str:
    """The member holding the user's data, if it can take the server now; otherwise the
    error naming the member and the volume. Never another member: a fresh empty home there
    would look to the user like their files were lost."""
    member = next((m for m in members if m.name == request.data_member), None)
    full = None
    if member is not None and member.status == ONLINE:
        full = why_full(member, request)
        if full is None:
            return member.name
    if full is not None:
        state, when = f"full ({full})", "once servers there have stopped"
    else:
        state = "not in the cluster" if member is None else f"{member.status}, not Online"
        when = f"once {request.data_member} is back"
    raise NoMemberAvailable(
        f"{request.data_volume or 'the volume'} of user {request.user!r} is on cluster member "
        f"{request.data_member}, which is {state}: the server cannot start elsewhere without "
        f"those files. Start again {when}, or have an admin move "
        f"the data with `lxdspawner volumes move {request.user} --to MEMBER`",
        {request.data_member: state},
    )


def no_member_available(members: Sequence[Member], request: PlacementRequest) -> NoMemberAvailable:
    """The error for a request no member can take, naming every member and its reason."""
    if request.server_name:
        what = f"server {request.server_name!r} of user {request.user!r}"
    else:
        what = f"the server of user {request.user!r}"
    where = ""
    if request.require:
        where = (
            f" in cluster group {request.require[1:]!r}"
            if request.require.startswith("@")
            else f" on member {request.require!r}"
        )
    if not members:
        return NoMemberAvailable(
            f"no cluster member can take {what}{where}: the cluster reports no members"
        )
    reasons = {m.name: why_not(m, request) or "usable" for m in members}
    if request.require and not request.require.startswith("@"):
        if request.require not in reasons:
            return NoMemberAvailable(
                f"no cluster member can take {what}: the required member {request.require!r} "
                f"is not in the cluster (members: {', '.join(sorted(reasons))})",
                reasons,
            )
    detail = "; ".join(f"{name}: {reasons[name]}" for name in sorted(reasons))
    return NoMemberAvailable(f"no cluster member can take {what}{where} ({detail})", reasons)


def count_by_location(instances: Iterable[Mapping]) -> Counter[str]:
    """Our instances per member, from ``GET /1.0/instances?recursion=1`` (each object's
    ``location``), counting only those with ``user.jupyterhub.managed-by = lxdspawner``.

    One pass, whatever the number of members. This is the only part of a decision that
    grows with the number of instances (about 100 ns per instance); a caller that keeps
    counts per member up to date (a shared cache) can use `members_from_counts` instead.
    """
    if not isinstance(instances, Sequence):
        instances = list(instances)  # read twice if the fast way fails
    try:
        # LXD's objects always carry "config" and "location": a comprehension is the fast way.
        return Counter(
            [i["location"] for i in instances if i["config"].get(KEY_MANAGED) == MANAGED_BY]
        )
    except (KeyError, TypeError, AttributeError):
        pass
    counts: Counter[str] = Counter()
    for inst in instances:
        config = inst.get("config")
        if config and config.get(KEY_MANAGED) == MANAGED_BY:
            counts[inst.get("location") or ""] += 1
    return counts


def members_from_counts(
    cluster_members: Iterable[Mapping],
    counts: Mapping[str, int],
    in_flight: Mapping[str, int] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[Member]:
    """Members from ``GET /1.0/cluster/members?recursion=1`` and instance counts per member
    (a shared cache of our instances can supply those without listing them again)."""
    in_flight = in_flight or {}
    weights = weights or {}
    members = []
    for m in cluster_members:
        name = m.get("server_name") or ""
        members.append(
            Member(
                name=name,
                status=m.get("status") or "Unknown",
                groups=tuple(m.get("groups") or ()),
                instances=int(counts.get(name, 0)),
                in_flight=int(in_flight.get(name, 0)),
                weight=float(weights.get(name, 1.0)),
            )
        )
    return members


def members_from_api(
    cluster_members: list[dict],
    instances: list[dict],
    in_flight: Mapping[str, int] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[Member]:
    """Members from the answers of ``GET /1.0/cluster/members?recursion=1`` and
    ``GET /1.0/instances?recursion=1``, with the spawns in flight per member and the
    ``host_weights``. An empty member list means a standalone daemon: nothing to place."""
    return members_from_counts(cluster_members, count_by_location(instances), in_flight, weights)


__all__ = [
    "ONLINE",
    "Member",
    "NoMemberAvailable",
    "PlacementPolicy",
    "PlacementRequest",
    "count_by_location",
    "held",
    "members_from_api",
    "members_from_counts",
    "no_member_available",
    "pinned",
    "weighted_least_loaded",
    "why_full",
    "why_not",
    "why_unusable",
    "with_capacity",
]
