"""Retries that outlast a restart, give up within their bound, and idempotency keys across processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import nalar
from conftest import node_env, wait_for


def test_a_call_made_while_its_node_restarts_is_answered_once_it_is_back(start_node, client):
    node = start_node("sample_actors:Calc", name="calc-node")
    wait_for(lambda: client.runtime.serving("Calc"), 10, "the node's heartbeat")
    node.proc.kill()  # SIGKILL: its subscriptions go with its connection
    node.proc.wait()
    wait_for(lambda: not client.runtime.serving("Calc"), 10, "the node to be taken for dead")
    f = client.stub("Calc").add(1, 2)
    # refused ("no responders") for about 3 s, as by a restarting node: far past the old give-up
    # (3 attempts, about 0.75 s); the sixth retry is scheduled 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s in
    t0 = time.monotonic()
    wait_for(lambda: client.runtime.counters.get("retries", 0) >= 6, 10, "the call to be refused and retried")
    assert time.monotonic() - t0 > 2.5
    assert not f.done()
    start_node("sample_actors:Calc", name="calc-node")
    assert f.result(20) == 3


def test_an_actor_no_node_has_served_fails_within_seconds(client):
    """A typo is not a restart: with no node seen serving it lately, the default looks for ~3 s only."""
    t0 = time.monotonic()
    with pytest.raises(nalar.UnknownActor, match=r"no node serves actor 'NoSuchActor'.*did not run"):
        client.stub("NoSuchActor").anything().result(20)
    assert time.monotonic() - t0 < 6


@pytest.mark.parametrize("policy", [nalar.NO_RETRY, nalar.RetryPolicy(attempts=1)])
def test_no_retry_fails_fast_when_no_node_serves_the_actor(client, policy):
    t0 = time.monotonic()
    with pytest.raises(nalar.UnknownActor, match="did not run"):
        client.stub("Calc").options(retry=policy).add(1, 2).result(10)
    assert time.monotonic() - t0 < 1
    assert client.runtime.counters.get("retries", 0) == 0


def test_an_explicit_attempt_count_still_caps_the_retries(client):
    with pytest.raises(nalar.UnknownActor):
        client.stub("Calc").options(retry=nalar.RetryPolicy(attempts=3)).add(1, 2).result(10)
    assert client.runtime.counters["retries"] == 2


def test_the_default_gives_up_before_the_deadline_with_a_clear_error(client):
    t0 = time.monotonic()
    with pytest.raises(nalar.UnknownActor, match=r"no node serves actor 'Calc'.*looked for .* did not run"):
        client.stub("Calc").options(timeout=1.2).add(1, 2).result(10)
    assert time.monotonic() - t0 < 1.2  # the runtime's answer, not the deadline's
    t0 = time.monotonic()
    with pytest.raises(nalar.UnknownActor):
        client.stub("Calc").options(retry=nalar.RetryPolicy(give_up_after=1.0)).add(1, 2).result(10)
    assert 0.5 < time.monotonic() - t0 < 2.5


def test_a_call_whose_executor_died_fails_as_outcome_unknown_naming_its_key(start_node, client):
    node = start_node("sample_actors:Gate", name="gates")
    gate = client.stub("Gate")
    policy = nalar.RetryPolicy(attempt_timeout=2, give_up_after=3)
    f = gate.options(retry=policy).park("x")
    gate.wait_started(1).result(20)  # it runs on the node...
    node.proc.kill()  # ...which dies without answering
    node.proc.wait()
    with pytest.raises(nalar.Unavailable) as ei:
        f.result(15)
    msg = str(ei.value)
    assert "outcome is unknown" in msg and f"key={f.id!r}" in msg
    assert ei.value.future_id == f.id


_SECOND_CLIENT = textwrap.dedent("""
    import sys
    import nalar
    c = nalar.connect(sys.argv[1], sys.argv[2])
    counter = c.stub("Counter").options(session=sys.argv[3])
    print(counter.options(key=sys.argv[4]).incr(5).result(30), counter.get().result(30))
    c.close()
""")


def test_a_key_makes_a_retry_from_another_process_the_same_call(start_node, client, nats_url, namespace):
    start_node("sample_actors:Counter")
    session, key = "s-" + uuid.uuid4().hex[:8], "k1-" + uuid.uuid4().hex[:8]
    counter = client.stub("Counter").options(session=session)
    f = counter.options(key=key).incr(5)
    assert f.id == key  # the id nodes see, and commit under
    assert f.result(30) == 5
    out = subprocess.run([sys.executable, "-c", _SECOND_CLIENT, nats_url, namespace, session, key],
                         env=node_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "5"]  # the same answer, and the effect applied once
    assert counter.options(key=key).incr(5).result(30) == 5  # again from here, now it has finished
    assert counter.incr(1).result(30) == 6  # without a key: a new call


def test_two_pending_calls_with_one_key_are_refused_and_keyed_calls_cancel(start_node, client):
    start_node("sample_actors:Gate")
    gate = client.stub("Gate")
    f = gate.options(key="same").park("x")
    with pytest.raises(ValueError, match="already pending"):
        gate.options(key="same").park("y")
    unkeyed = gate.park("z")
    with pytest.raises(ValueError, match="already pending"):  # an unkeyed pending call's id is taken too
        gate.options(key=unkeyed.id).park("y")
    gate.wait_started(2).result(20)
    assert f.cancel() and unkeyed.cancel()
    with pytest.raises(nalar.Cancelled):
        f.result(5)
    assert "same" not in client.runtime._keyed and not client.runtime.pending
    wait_for(lambda: gate.stats().result(20)["cancelled"] == 2, 10, "the node to cancel both, by their ids")
    gate.release().result(20)
    assert gate.options(key="same").park("again").result(20) == "again"  # free once it has finished


@pytest.mark.parametrize("key", ["", "a\nb", "x" * 129, " padded", 7, "tab\there"])
def test_bad_keys_are_a_value_error_at_the_call_site(client, key):
    with pytest.raises(ValueError, match="key"):
        client.stub("Calc").options(key=key)
    with pytest.raises(ValueError, match="key"):
        client.runtime.call("Calc", "add", (1, 2), {}, key=key)
    assert not client.runtime.pending


def test_retry_policy_fields_are_validated():
    assert nalar.DEFAULT_RETRY.attempts is None and nalar.DEFAULT_RETRY.give_up_after == 30.0
    assert not nalar.NO_RETRY.retries and nalar.RetryPolicy(attempts=2).retries
    for bad in ({"attempts": 0}, {"attempts": True}, {"attempts": 1.5}, {"give_up_after": -1},
                {"give_up_after": float("inf")}, {"backoff": float("nan")}):
        with pytest.raises(ValueError):
            nalar.RetryPolicy(**bad)
    p = nalar.RetryPolicy()
    assert [p.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert p.delay(10_000) == 2.0
