"""The elastic consumer group config format, pinned to what orbit.go writes.

The golden bytes are what Go's ``json.Marshal`` produces for orbit.go's
``ElasticConsumerGroupConfig`` (field order, ``omitempty`` on the buffers, members and
mappings, none on the filters; ``<``/``>``/``&`` HTML-escaped; nil slices as ``null``).
"""

from __future__ import annotations

import pytest

from jsworker._pcg_config import (
    ElasticConfig,
    MemberMapping,
    PartitionConfigError,
    PartitioningFilter,
    assignment,
    partition_filters,
    transform_destination,
    validate,
)

GOLDEN = [
    # CreateElastic(..., 4, [{Filter: "foo.*", PartitioningWildcards: [1]}], 0, 0)
    b'{"max_members":4,"partitioning_filters":[{"filter":"foo.*","partitioning_wildcards":[1]}]}',
    # nil wildcards, buffers set, members added
    b'{"max_members":8,"partitioning_filters":[{"filter":"orders.\\u003e",'
    b'"partitioning_wildcards":null}],"max_buffered_msg":1000,"max_buffered_bytes":65536,'
    b'"members":["m2","m1"]}',
    # member mappings instead of members
    b'{"max_members":2,"partitioning_filters":[],"member_mappings":'
    b'[{"member":"a","partitions":[0]},{"member":"b","partitions":[1]}]}',
    # nil filters (Go zero value)
    b'{"max_members":1,"partitioning_filters":null}',
]


@pytest.mark.parametrize("raw", GOLDEN)
def test_round_trip_is_byte_identical(raw: bytes) -> None:
    assert ElasticConfig.from_json(raw).to_json() == raw


def test_null_and_empty_are_kept_apart() -> None:
    a = ElasticConfig.from_json(
        b'{"max_members":2,"partitioning_filters":[{"filter":"x.*","partitioning_wildcards":[]}]}'
    )
    b = ElasticConfig.from_json(
        b'{"max_members":2,"partitioning_filters":[{"filter":"x.*","partitioning_wildcards":null}]}'
    )
    assert a.partitioning_filters and a.partitioning_filters[0].partitioning_wildcards == ()
    assert b.partitioning_filters and b.partitioning_filters[0].partitioning_wildcards is None
    assert b'"partitioning_wildcards":[]' in a.with_member("w").to_json()
    assert b'"partitioning_wildcards":null' in b.with_member("w").to_json()


def test_empty_members_are_omitted_like_go_omitempty() -> None:
    cfg = ElasticConfig(4, (PartitioningFilter("a.*", (1,)),), members=("w1",))
    assert b'"members"' not in cfg.without_members({"w1"}).to_json()


@pytest.mark.parametrize(
    ("members", "n", "expected"),
    [
        (["b", "a"], 4, {0: "a", 1: "a", 2: "b", 3: "b"}),
        (["a", "b", "c"], 8, {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c", 6: "a", 7: "b"}),
        (
            ["a", "b", "c", "d", "e"],
            8,
            {0: "a", 1: "b", 2: "c", 3: "d", 4: "e", 5: "a", 6: "b", 7: "c"},
        ),
        (["x", "y", "z"], 2, {0: "x", 1: "y"}),  # capped to max_members
        (["a", "a", "b"], 3, {0: "a", 1: "b", 2: "a"}),  # deduplicated
    ],
)
def test_assignment_matches_generate_partition_filters(
    members: list[str], n: int, expected: dict[int, str]
) -> None:
    cfg = ElasticConfig(n, (PartitioningFilter("t.*", (1,)),), members=tuple(members))
    assert assignment(cfg) == expected
    for m in set(members):
        assert partition_filters(cfg, m) == [f"{p}.t.*" for p, o in expected.items() if o == m]


def test_mappings_use_the_catch_all_filter() -> None:
    cfg = ElasticConfig(
        3,
        (PartitioningFilter("t.*", (1,)),),
        member_mappings=(MemberMapping("a", (0, 2)), MemberMapping("b", (1,))),
    )
    validate(cfg)
    assert partition_filters(cfg, "a") == ["0.>", "2.>"]
    assert assignment(cfg) == {0: "a", 1: "b", 2: "a"}


def test_transform_destination() -> None:
    assert (
        transform_destination(PartitioningFilter("task.x.*", (1,)), 8)
        == "{{Partition(8,1)}}.task.x.{{Wildcard(1)}}"
    )
    assert transform_destination(PartitioningFilter("a.*.*", ()), 2) == (
        "{{Partition(2)}}.a.{{Wildcard(1)}}.{{Wildcard(2)}}"
    )


@pytest.mark.parametrize(
    "cfg",
    [
        ElasticConfig(0),
        ElasticConfig(2, (PartitioningFilter("a.b", ()),)),
        ElasticConfig(2, (PartitioningFilter("a.*", (2,)),)),
        ElasticConfig(2, (PartitioningFilter("a.*.*", (1, 1)),)),
        ElasticConfig(2, members=("a",), member_mappings=(MemberMapping("a", (0, 1)),)),
        ElasticConfig(2, member_mappings=(MemberMapping("a", (0,)),)),  # partition 1 uncovered
        ElasticConfig(2, member_mappings=(MemberMapping("a", (0, 0)), MemberMapping("b", (1,)))),
        ElasticConfig(2, member_mappings=(MemberMapping("a", (0, 5)),)),
    ],
)
def test_invalid_configs_are_refused(cfg: ElasticConfig) -> None:
    with pytest.raises(PartitionConfigError):
        validate(cfg)


def test_bad_json_is_a_clear_error() -> None:
    with pytest.raises(PartitionConfigError, match="not JSON"):
        ElasticConfig.from_json(b"{nope")
    with pytest.raises(PartitionConfigError, match="bad field"):
        ElasticConfig.from_json(b'{"max_members":2,"member_mappings":[{"member":5}]}')


def test_members_cannot_be_added_to_mapped_groups() -> None:
    cfg = ElasticConfig(1, member_mappings=(MemberMapping("a", (0,)),))
    with pytest.raises(PartitionConfigError):
        cfg.with_member("b")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"max_members":-1}',  # uint
        b'{"max_members":2.0}',
        b'{"max_members":true}',
        b'{"max_members":"2"}',
        b'{"max_members":18446744073709551616}',  # over uint64
        b'{"max_members":2,"members":"a"}',
        b'{"max_members":2,"members":[1]}',
        b'{"max_members":2,"partitioning_filters":{}}',
        b'{"max_members":2,"partitioning_filters":[{"filter":1}]}',
        b'{"max_members":2,"member_mappings":[{"member":"a","partitions":[0.5]}]}',
    ],
)
def test_json_types_go_would_refuse_are_refused(raw: bytes) -> None:
    with pytest.raises(PartitionConfigError, match="bad field"):
        ElasticConfig.from_json(raw)


def test_missing_wildcards_decode_as_nil_and_encode_as_null_like_go() -> None:
    raw = b'{"max_members":2,"partitioning_filters":[{"filter":"x.*"}]}'
    assert ElasticConfig.from_json(raw).to_json() == (
        b'{"max_members":2,"partitioning_filters":[{"filter":"x.*","partitioning_wildcards":null}]}'
    )
