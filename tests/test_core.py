"""The pure task model: states, retry policy, ids, submissions, errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tq.core.errors import (
    InvalidRequest,
    InvalidTransition,
    NotFound,
    RemoteError,
    TQError,
    error_from_code,
)
from tq.core.ids import is_task_id, uuid7
from tq.core.retry import RetryPolicy
from tq.core.states import TERMINAL, TRANSITIONS, Event, State, is_terminal, next_state, sources
from tq.core.task import Task, TaskSpec, parse_priority


@given(st.sampled_from(list(State)), st.sampled_from(list(Event)))
def test_every_state_event_pair_is_in_the_table_or_refused(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
        assert state in sources(event)
    else:
        with pytest.raises(InvalidTransition, match=f"^a {state.value} task cannot "):
            next_state(state, event)
        assert state not in sources(event)


def test_terminal_states_only_leave_by_operator_retry() -> None:
    for (state, event), _ in TRANSITIONS.items():
        if state in TERMINAL:
            assert event is Event.RETRY
    assert is_terminal("succeeded") and not is_terminal("failed")
    with pytest.raises(InvalidTransition):
        next_state(State.SUCCEEDED, Event.RETRY)


def test_lifecycle_paths() -> None:
    s = next_state(State.PENDING, Event.CLAIM)
    assert s is State.RUNNING
    assert next_state(s, Event.FAIL_RETRY) is State.FAILED
    assert next_state(State.FAILED, Event.DUE) is State.PENDING
    assert next_state(s, Event.FAIL_FINAL) is State.DEAD
    assert next_state(State.DEAD, Event.RETRY) is State.PENDING
    assert next_state(s, Event.RELEASE) is State.PENDING


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.001, max_value=100),
    st.floats(min_value=0.001, max_value=10_000),
    st.integers(),
)
def test_backoff_is_bounded_and_jittered(attempt: int, base: float, cap: float, seed: int) -> None:
    policy = RetryPolicy(base=base, cap=cap)
    ceiling = min(cap, base * 2 ** min(attempt - 1, 64))
    delay = policy.delay(attempt, random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling
    assert delay <= cap


def test_backoff_grows_then_caps() -> None:
    policy = RetryPolicy(base=1, cap=10)
    assert [policy.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    with pytest.raises(ValueError):
        policy.ceiling(0)


def test_uuid7_ids_sort_by_time_and_are_unique() -> None:
    ids = [uuid7(1_700_000_000.0 + i / 10_000) for i in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_task_id(i) for i in ids[:10])
    assert ids[0][14] == "7"  # version nibble
    same_ms = [uuid7(1_800_000_000.0) for _ in range(100)]
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 100
    assert not is_task_id("nope")


def test_priority_names_and_bounds() -> None:
    assert parse_priority("high") == 200
    assert parse_priority("LOW") == 50
    assert parse_priority("7") == 7
    assert parse_priority(255) == 255
    for bad in (-1, 256, "urgent", True, 1.5):
        with pytest.raises(InvalidRequest, match="priority"):
            parse_priority(bad)


def test_task_spec_defaults_and_errors() -> None:
    spec = TaskSpec.from_mapping({"type": "echo", "payload": [1, 2]})
    assert spec.queue == "default" and spec.priority == 100 and spec.max_retries == 3
    with pytest.raises(InvalidRequest, match="a task must be a map"):
        TaskSpec.from_mapping([1])
    with pytest.raises(InvalidRequest, match="unknown task field"):
        TaskSpec.from_mapping({"type": "echo", "paylod": 1})
    with pytest.raises(InvalidRequest, match="type must be a non-empty string"):
        TaskSpec.from_mapping({"payload": 1})
    with pytest.raises(InvalidRequest, match="max_retries"):
        TaskSpec.from_mapping({"type": "echo", "max_retries": -1})
    with pytest.raises(InvalidRequest, match="timeout"):
        TaskSpec.from_mapping({"type": "echo", "timeout": 0})
    with pytest.raises(InvalidRequest, match="spaces or commas"):
        TaskSpec.from_mapping({"type": "echo", "queue": "a,b"})


_NAMES = st.one_of(
    st.none(),
    st.sampled_from(["echo", "default", "a b", "a,b", "", "x" * 201, "x" * 200]),
    st.text(max_size=8),
    st.integers(),
)


@given(
    st.fixed_dictionaries(
        {},
        optional={"type": _NAMES, "queue": _NAMES, "payload": st.integers() | st.text()},
    ),
    st.booleans(),
)
def test_task_spec_fast_path_matches_the_full_rules(spec: dict[str, object], twice: bool) -> None:
    """Plain dicts of type/queue/payload take a shortcut (names it has seen are
    remembered); any other mapping takes every check. Both must agree."""
    from types import MappingProxyType

    def outcome(value: object) -> object:
        try:
            return TaskSpec.from_mapping(value)
        except InvalidRequest as exc:
            return exc.message

    expected = outcome(MappingProxyType(spec))
    for _ in range(2 if twice else 1):  # the second time, from the remembered names
        assert outcome(dict(spec)) == expected


def test_task_round_trips_through_plain_data() -> None:
    task = Task(
        id=uuid7(1.0),
        type="echo",
        queue="q",
        payload={"x": 1},
        priority=1,
        state=State.DEAD,
        attempts=2,
        max_retries=1,
        timeout=1.0,
        retry_base=1.0,
        retry_cap=2.0,
        created_at=1.0,
    )
    data = task.to_dict()
    assert data["state"] == "dead"
    assert Task.from_dict({**data, "from_a_newer_broker": 1}) == task


def test_error_codes_map_back_to_classes() -> None:
    assert isinstance(error_from_code("not_found", "x"), NotFound)
    err = error_from_code("from_a_newer_broker", "slow down", 1.5)
    assert isinstance(err, RemoteError) and err.code == "from_a_newer_broker"
    assert err.retry_after == 1.5
    assert isinstance(err, TQError)


def test_human_bytes_names_binary_units() -> None:
    from tq.core.units import human_bytes

    assert human_bytes(None) == "" and human_bytes(None, missing="-") == "-"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(124 * 2**20) == "124.0 MiB"
    assert human_bytes(3 * 2**50) == "3072.0 TiB"
