"""Several brokers: the failover policy (pure, tq.client.failover) and where it is read
from (--broker / TQ_BROKER / config file, join tokens)."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from tq.client import failover as fo
from tq.config import Settings, load_settings
from tq.core.errors import ConfigError, ConnectionFailed, TLSFailure, Unauthorized, Unavailable
from tq.core.retry import RetryPolicy
from tq.security.keys import new_key
from tq.security.tls import ensure_broker_tls
from tq.security.tokens import PREFIX, decode_join_token, encode_join_token

# -- broker lists -----------------------------------------------------------------------


def test_a_broker_list_is_split_trimmed_and_deduplicated() -> None:
    assert fo.parse_brokers("h1:7470") == ("h1:7470",)
    assert fo.parse_brokers(" h1:7470 , h2:7471,[::1]:7472,h1:7470") == (
        "h1:7470",
        "h2:7471",
        "[::1]:7472",
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no broker address"),
        ("h1:7470,,h2:7470", "entry 2 of 3 is empty"),
        ("h1:7470,", "entry 2 of 2 is empty"),
        ("h1:7470,h2:port", "port must be a number"),
        ("h1:7470;h2:7470", "is not HOST:PORT"),
        ("h1:7470 h2:7470", "contains a space"),
        ("h1:99999", "port must be a number"),
    ],
)
def test_a_malformed_broker_list_names_the_bad_entry(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        fo.parse_brokers(text)
    if text:
        assert "host1:7470,host2:7470" in str(info.value)  # how to write it


def test_settings_check_the_broker_list_wherever_it_comes_from(tmp_path: Path) -> None:
    assert load_settings({"broker": "a:1, b:2"}).broker == "a:1,b:2"
    assert load_settings(env={"TQ_BROKER": "a:1,b:2"}).broker == "a:1,b:2"
    config = tmp_path / "tq.toml"
    config.write_text('broker = "a:1,b:2,c:3"\n')
    assert load_settings(config_file=config).broker == "a:1,b:2,c:3"
    config.write_text('broker = ["a:1", "b:2"]\n')  # a TOML array works too
    assert load_settings(config_file=config).broker == "a:1,b:2"
    with pytest.raises(ConfigError, match=r"TQ_BROKER=a:1,,b:2: .*entry 2 of 3 is empty"):
        load_settings(env={"TQ_BROKER": "a:1,,b:2"})
    with pytest.raises(ConfigError, match=r"--broker a:1,b:x: .*port must be a number"):
        load_settings({"broker": "a:1,b:x"})


# -- rotation and backoff -----------------------------------------------------------------


def test_the_rotation_starts_after_a_failed_broker_and_sticks_to_one_that_accepts() -> None:
    rotation = fo.Rotation(["a", "b", "c"])
    assert rotation.order() == ["a", "b", "c"]
    rotation.failed("a")
    assert rotation.order() == ["b", "c", "a"]
    rotation.failed("c")  # not the first: changes nothing
    assert rotation.order() == ["b", "c", "a"]
    rotation.connected("c")
    assert rotation.order() == ["c", "a", "b"]
    rotation.failed("c")  # the connection to c was lost: try a first
    assert rotation.order() == ["a", "b", "c"]
    single = fo.Rotation(["a"])
    single.failed("a")
    assert single.order() == ["a"]  # one broker: it again (a restart on the same address)


def test_the_backoff_grows_with_jitter_and_never_passes_the_deadline() -> None:
    policy = RetryPolicy(base=0.1, cap=5.0)
    backoff = fo.Backoff(deadline=20.0, policy=policy, rng=random.Random(3))
    now, delays = 0.0, []
    while (delay := backoff.next_delay(now)) is not None:
        delays.append(delay)
        now += delay + 0.01  # each round of attempts takes a little time
    assert now >= 20.0 and sum(delays) <= 20.0
    assert 0.05 <= delays[0] <= 0.1 and max(delays) <= 5.0
    assert all(d >= policy.ceiling(n) / 2 for n, d in enumerate(delays[:-1], 1))  # jitter below
    assert len(set(delays)) == len(delays)
    unbounded = fo.Backoff(deadline=None, policy=policy, rng=random.Random(3))
    assert all(unbounded.next_delay(1e9) is not None for _ in range(1000))
    assert fo.Backoff(deadline=5.0).next_delay(5.0) is None


def test_the_failover_window_defaults_to_on_with_several_brokers_only() -> None:
    assert fo.window(["a"], None) == 0.0
    assert fo.window(["a", "b"], None) == fo.DEFAULT_WINDOW
    assert fo.window(["a"], 7) == 7.0
    with pytest.raises(ConfigError, match="failover"):
        fo.window(["a"], -1)


def test_only_errors_of_an_absent_broker_are_worth_another_attempt() -> None:
    assert fo.retriable(ConnectionFailed("gone"))
    assert fo.retriable(Unavailable("shutting down"))
    assert not fo.retriable(TLSFailure("wrong CA"))
    assert not fo.retriable(Unauthorized("revoked"))


# -- what may be sent again -----------------------------------------------------------------


def test_reads_and_keyed_submits_are_resent_other_writes_never() -> None:
    keyed = {"t": "submit", "tasks": [{"type": "a", "idempotency_key": "k1"}]}
    half = {"t": "submit", "tasks": [{"type": "a", "idempotency_key": "k1"}, {"type": "b"}]}
    assert fo.resend_rule({"t": "query", "q": "get", "task": "x"}) is fo.Resend.READ
    assert fo.resend_rule({"t": "wait", "task": "x", "timeout": 1}) is fo.Resend.READ
    assert fo.resend_rule(keyed) is fo.Resend.KEYED
    for unsafe in (half, {"t": "submit", "tasks": []}, {"t": "cancel", "task": "x"}):
        assert fo.resend_rule(unsafe) is fo.Resend.UNSAFE
    for kind in ("retry", "purge", "retry_many", "set_priority", "claim", "result", "keys"):
        assert not fo.resend_safe({"t": kind})


def test_missing_idempotency_keys_are_attached_and_given_ones_kept() -> None:
    message = {"t": "submit", "tasks": [{"type": "a"}, {"type": "b", "idempotency_key": "mine"}]}
    keyed = fo.with_idempotency_keys(message)
    first, second = keyed["tasks"]
    assert first["idempotency_key"].startswith(fo.AUTO_KEY_PREFIX)
    assert len(first["idempotency_key"]) == len(fo.AUTO_KEY_PREFIX) + 32
    assert second["idempotency_key"] == "mine"
    assert "idempotency_key" not in message["tasks"][0]  # the caller's map is not changed
    assert fo.resend_safe(keyed)
    again = fo.with_idempotency_keys(message)["tasks"][0]["idempotency_key"]
    assert again != first["idempotency_key"]  # a fresh key per request
    assert fo.with_idempotency_keys(keyed) is keyed
    query = {"t": "query", "q": "stats"}
    assert fo.with_idempotency_keys(query) is query


def test_a_resent_submit_reports_the_tasks_under_its_own_keys_as_created() -> None:
    auto = fo.auto_key()
    message = {"t": "submit", "tasks": [{"idempotency_key": auto}, {"idempotency_key": "mine"}]}
    reply = {"tasks": [{"id": "1", "created": False}, {"id": "2", "created": False}]}
    fixed = fo.resent_answer(message, reply)
    assert [i["created"] for i in fixed["tasks"]] == [True, False]
    query = {"t": "query", "q": "get"}
    assert fo.resent_answer(query, reply) is reply


def test_an_unknown_outcome_says_what_to_do() -> None:
    error = fo.outcome_unknown("b1:7470", {"t": "cancel", "task": "T1"})
    assert isinstance(error, ConnectionFailed)
    assert "`cancel` of task T1" in str(error) and "may or may not" in str(error)
    assert "tq status" in str(error)
    submit = fo.outcome_unknown("b1:7470", {"t": "submit", "tasks": [{"type": "a"}]})
    assert "idempotency_key" in str(submit)


# -- join tokens --------------------------------------------------------------------------


def _ca(tmp_path: Path) -> bytes:
    files, _ = ensure_broker_tls(tmp_path / "tls")
    return files.ca_cert.read_bytes()


def test_a_join_token_carries_several_brokers(tmp_path: Path) -> None:
    ca, key = _ca(tmp_path), new_key("w", "worker", now=0.0)[0]
    token = decode_join_token(encode_join_token(["b1:7470", "b2:7470,b3:7470"], ca, key))
    assert token.addresses == ("b1:7470", "b2:7470", "b3:7470")
    assert token.broker == "b1:7470,b2:7470,b3:7470"
    with pytest.raises(ConfigError, match="entry 2 of 2 is empty"):
        encode_join_token(["b1:7470,"], ca, key)


def test_tokens_made_before_still_work_and_a_damaged_address_is_named(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(_ca(tmp_path)).public_bytes(serialization.Encoding.DER)
    key = new_key("w", "worker", now=0.0)[0]

    def token(addresses: list[str]) -> str:
        body = msgpack.packb({"a": addresses, "ca": der, "k": key}, use_bin_type=True)
        return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    # as `tq token create` wrote them: one address per entry, or one entry with commas
    assert decode_join_token(token(["queue.example.com:7470"])).broker == "queue.example.com:7470"
    assert decode_join_token(token(["a:1,b:2"])).addresses == ("a:1", "b:2")
    with pytest.raises(ConfigError, match=r"broker addresses are damaged .*port must be"):
        decode_join_token(token(["a:1", "b:x"]))


# -- the worker on a new session ---------------------------------------------------------


@pytest.mark.trio
async def test_a_new_session_renews_the_leases_it_holds_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Moved to another broker (or the same one back) after an outage that ate most of a
    lease: the first heartbeat goes out at once, not a third of a lease later."""
    from tests.worker_helpers import make_lease
    from tq.worker.handlers import HandlerRegistry
    from tq.worker.runner import Running, Worker

    sent: list[tuple[float, list[Any]]] = []

    class Session:  # records what the heartbeater sends; the broker keeps every lease
        async def request_answer(self, message: dict[str, Any], kind: type[Any]) -> Any:
            sent.append((trio.current_time() - start, message["leases"]))
            return kind(id=1, lost=[])  # a heartbeat ACK keeping every lease

    worker = Worker(Settings(data=tmp_path, lease_ttl=30.0), HandlerRegistry())
    start = trio.current_time()
    with trio.move_on_after(25):
        await worker._heartbeater(Session())  # type: ignore[arg-type]
    assert [t for t, _ in sent] == [10.0, 20.0]  # nothing held: every lease_ttl / 3
    worker.running[("A", 1)] = Running(make_lease("A", 1))
    sent.clear()
    start = trio.current_time()
    with trio.move_on_after(25):
        await worker._heartbeater(Session())  # type: ignore[arg-type]
    assert [t for t, _ in sent] == [0.0, 10.0, 20.0]
    assert sent[0][1] == [["A", 1]]
