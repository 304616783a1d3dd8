"""Elastic consumer group configuration, byte-compatible with orbit.go ``pcgroups``.

The config lives in KV ``elastic-consumer-groups`` under ``{stream}.{group}`` as the JSON
Go's ``encoding/json`` writes for::

    type ElasticConsumerGroupConfig struct {
        MaxMembers          uint                 `json:"max_members"`
        PartitioningFilters []PartitioningFilter `json:"partitioning_filters"`
        MaxBufferedMsgs     int64                `json:"max_buffered_msg,omitempty"`
        MaxBufferedBytes    int64                `json:"max_buffered_bytes,omitempty"`
        Members             []string             `json:"members,omitempty"`
        MemberMappings      []MemberMapping      `json:"member_mappings,omitempty"`
    }
    type PartitioningFilter struct { Filter string `json:"filter"`;
                                     PartitioningWildcards []int `json:"partitioning_wildcards"` }
    type MemberMapping struct { Member string `json:"member"`;
                                Partitions []int `json:"partitions"` }

So: fields in that order, no spaces, ``<``, ``>``, ``&`` escaped as ``\\u003c`` ...,
empty ``members``/``member_mappings``/zero buffers omitted, and a nil slice written as
``null`` where there is no ``omitempty``. ``None`` stands for Go's nil and ``[]`` for an
empty slice, so decoding and re-encoding keeps ``null`` vs ``[]`` as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from ._errors import ConfigError

PRIORITY_GROUP = "PCG"


class PartitionConfigError(ConfigError):
    """An elastic consumer group config is invalid or does not match this worker's."""


@dataclass(frozen=True)
class PartitioningFilter:
    filter: str
    partitioning_wildcards: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MemberMapping:
    member: str
    partitions: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ElasticConfig:
    max_members: int
    partitioning_filters: tuple[PartitioningFilter, ...] | None = None
    max_buffered_msg: int = 0
    max_buffered_bytes: int = 0
    members: tuple[str, ...] | None = None
    member_mappings: tuple[MemberMapping, ...] | None = None
    # KV revision this config was read at (not serialised); 0 = not stored yet
    revision: int = field(default=0, compare=False)

    # ----------------------------------------------------------------- JSON
    def to_json(self) -> bytes:
        parts = [f'"max_members":{int(self.max_members)}']
        if self.partitioning_filters is None:
            parts.append('"partitioning_filters":null')
        else:
            pfs = ",".join(
                '{"filter":'
                + _go_str(pf.filter)
                + ',"partitioning_wildcards":'
                + _go_ints(pf.partitioning_wildcards)
                + "}"
                for pf in self.partitioning_filters
            )
            parts.append(f'"partitioning_filters":[{pfs}]')
        if self.max_buffered_msg:
            parts.append(f'"max_buffered_msg":{int(self.max_buffered_msg)}')
        if self.max_buffered_bytes:
            parts.append(f'"max_buffered_bytes":{int(self.max_buffered_bytes)}')
        if self.members:
            parts.append('"members":[' + ",".join(_go_str(m) for m in self.members) + "]")
        if self.member_mappings:
            mms = ",".join(
                '{"member":' + _go_str(mm.member) + ',"partitions":' + _go_ints(mm.partitions) + "}"
                for mm in self.member_mappings
            )
            parts.append(f'"member_mappings":[{mms}]')
        return ("{" + ",".join(parts) + "}").encode()

    @classmethod
    def from_json(cls, data: bytes, revision: int = 0) -> ElasticConfig:
        """Decode as Go's ``json.Unmarshal`` into orbit.go's struct would: wrong JSON types
        (``"2"``, ``2.5``, ``true`` for a number, a string for a list ...) are refused;
        unknown keys are ignored."""
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise PartitionConfigError(f"elastic consumer group config is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise PartitionConfigError("elastic consumer group config must be a JSON object")
        # both nested lists are objects of one string and one list of ints
        pfs_raw = _str_ints(
            obj.get("partitioning_filters"),
            "partitioning_filters",
            "filter",
            "partitioning_wildcards",
        )
        pfs = None if pfs_raw is None else tuple(PartitioningFilter(*x) for x in pfs_raw)
        mms_raw = _str_ints(obj.get("member_mappings"), "member_mappings", "member", "partitions")
        mms = None if mms_raw is None else tuple(MemberMapping(*x) for x in mms_raw)
        members_raw = _list(obj.get("members"), "members")
        members = None if members_raw is None else tuple(_str(m, "member") for m in members_raw)
        return cls(
            max_members=_int(obj.get("max_members", 0), "max_members", 0, 2**64 - 1),
            partitioning_filters=pfs,
            max_buffered_msg=_int(obj.get("max_buffered_msg", 0), "max_buffered_msg"),
            max_buffered_bytes=_int(obj.get("max_buffered_bytes", 0), "max_buffered_bytes"),
            members=members,
            member_mappings=mms,
            revision=revision,
        )

    # ------------------------------------------------------------ membership
    def is_member(self, name: str) -> bool:
        return name in (self.members or ()) or any(
            m.member == name for m in self.member_mappings or ()
        )

    def with_member(self, name: str) -> ElasticConfig:
        if self.member_mappings:
            raise PartitionConfigError("cannot add members to a group that uses member mappings")
        if name in (self.members or ()):
            return self
        return replace(self, members=(*(self.members or ()), name))

    def without_members(self, names: set[str]) -> ElasticConfig:
        if self.member_mappings:
            raise PartitionConfigError(
                "cannot remove members from a group that uses member mappings"
            )
        kept = tuple(m for m in self.members or () if m not in names)
        return replace(self, members=kept if kept or self.members is not None else None)

    def with_mappings(self, mappings: tuple[MemberMapping, ...]) -> ElasticConfig:
        cfg = replace(self, members=(), member_mappings=mappings)
        validate(cfg)
        return cfg

    def without_mappings(self) -> ElasticConfig:
        return replace(self, member_mappings=())


def _bad(what: str, v: Any, want: str) -> PartitionConfigError:
    return PartitionConfigError(
        f"elastic consumer group config has a bad field: {what} is {json.dumps(v)}, not {want}"
    )


def _int(v: Any, what: str, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(what, v, f"an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _bad(what, v, "a string")
    return v


def _list(v: Any, what: str) -> list[Any] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise _bad(what, v, "a list")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(what, v, "an object")
    return v


def _str_ints(
    v: Any, what: str, str_key: str, ints_key: str
) -> list[tuple[str, tuple[int, ...] | None]] | None:
    """A list of ``{str_key: string, ints_key: [int, ...]}`` objects, Go-strictly."""
    items = _list(v, what)
    if items is None:
        return None
    out = []
    for item in items:
        o = _obj(item, what)
        out.append((_str(o.get(str_key, ""), str_key), _int_list(o.get(ints_key), ints_key)))
    return out


def _int_list(v: Any, what: str) -> tuple[int, ...] | None:
    items = _list(v, what)
    return None if items is None else tuple(_int(x, what) for x in items)


def _go_ints(v: tuple[int, ...] | None) -> str:
    return "null" if v is None else "[" + ",".join(str(int(x)) for x in v) + "]"


def _go_str(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe escaping)."""
    out = json.dumps(s, ensure_ascii=False)
    return (
        out.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


# --------------------------------------------------------------- validation
def validate(cfg: ElasticConfig) -> None:
    """The checks orbit.go's ``validateConfig`` makes, with the same meaning."""
    n = cfg.max_members
    if n < 1:
        raise PartitionConfigError("the max number of members must be >= 1")
    for pf in cfg.partitioning_filters or ():
        if not pf.filter:
            raise PartitionConfigError("partitioning filters must have a non-empty filter")
        tokens = pf.filter.split(".")
        wildcards = tokens.count("*")
        if wildcards == 0 and tokens[-1] != ">":
            raise PartitionConfigError(
                "partitioning filters must have at least one * wildcard or end with >"
            )
        pw = pf.partitioning_wildcards or ()
        if len(pw) > wildcards:
            raise PartitionConfigError("more partitioning wildcards than * wildcards in the filter")
        if len(set(pw)) != len(pw):
            raise PartitionConfigError("partitioning wildcard indexes must be unique")
        if any(w < 1 or w > wildcards for w in pw):
            raise PartitionConfigError(
                "partitioning wildcard indexes must be between 1 and the number of * wildcards"
            )
    if cfg.members and cfg.member_mappings:
        raise PartitionConfigError("either members or member mappings, not both")
    if cfg.member_mappings:
        if len(cfg.member_mappings) > n:
            raise PartitionConfigError(
                "the number of member mappings must be between 1 and the max number of members"
            )
        seen_m: set[str] = set()
        seen_p: set[int] = set()
        for mm in cfg.member_mappings:
            if mm.member in seen_m:
                raise PartitionConfigError("member names must be unique")
            seen_m.add(mm.member)
            for p in mm.partitions or ():
                if p in seen_p:
                    raise PartitionConfigError("partition numbers must be used only once")
                if p < 0 or p >= n:
                    raise PartitionConfigError(
                        "partition numbers must be between 0 and max_members - 1"
                    )
                seen_p.add(p)
        if len(seen_p) != n:
            raise PartitionConfigError(
                "the member mappings must cover every partition exactly once"
            )


# --------------------------------------------------------------- assignment
def assignment(cfg: ElasticConfig) -> dict[int, str | None]:
    """Partition -> member, as orbit.go's ``GeneratePartitionFilters`` assigns them:
    members deduplicated, sorted and capped to ``max_members``; contiguous blocks of
    ``max_members // len(members)``; the remainder round-robin from the first member.
    With member mappings, the mappings decide."""
    n = cfg.max_members
    owner: dict[int, str | None] = dict.fromkeys(range(n))
    if cfg.members:
        members = sorted(dict.fromkeys(cfg.members))[:n]
        k = len(members)
        per = n // k
        for i in range(n):
            if i < k * per:
                owner[i] = members[(i // per) % k]
            else:
                owner[i] = members[(i - k * per) % k]
    elif cfg.member_mappings:
        for mm in cfg.member_mappings:
            for p in mm.partitions or ():
                owner[p] = mm.member
    return owner


def member_partitions(cfg: ElasticConfig, member: str) -> list[int]:
    return [p for p, m in sorted(assignment(cfg).items()) if m == member]


def partition_filters(cfg: ElasticConfig, member: str) -> list[str]:
    """The consumer filter subjects of ``member`` (orbit.go ``ElasticGetPartitionFilters``):
    ``{p}.{filter}`` per partition and filter; ``{p}.>`` with member mappings."""
    if not cfg.members and cfg.member_mappings:
        return [f"{p}.>" for p in member_partitions(cfg, member)]
    filters = [pf.filter for pf in cfg.partitioning_filters or ()] or [">"]
    mine = member_partitions(cfg, member)
    return [f"{p}.{f}" for f in filters for p in mine]


def transform_destination(pf: PartitioningFilter, max_members: int) -> str:
    """``{{Partition(n,w...)}}.`` + the filter with each ``*`` as ``{{Wildcard(i)}}``."""
    tokens = pf.filter.split(".")
    i = 0
    for j, t in enumerate(tokens):
        if t == "*":
            i += 1
            tokens[j] = f"{{{{Wildcard({i})}}}}"
    dest = ".".join(tokens)
    if not pf.partitioning_wildcards:
        return f"{{{{Partition({max_members})}}}}.{dest}"
    wl = ",".join(str(w) for w in pf.partitioning_wildcards)
    return f"{{{{Partition({max_members},{wl})}}}}.{dest}"


def group_key(stream: str, group: str) -> str:
    return f"{stream}.{group}"


def group_stream(stream: str, group: str) -> str:
    return f"{stream}-{group}"
