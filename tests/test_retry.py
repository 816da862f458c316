"""retry.call: which errors are retried, the backoff schedule (fake clock), and the bounds on count and time."""

from __future__ import annotations

import dataclasses

import pytest

from raydist_loader import retry
from raydist_loader.errors import BackendError, ConfigError, ManifestError, NotFoundError, VerificationError
from raydist_loader.retry import RetryPolicy


class FakeClock:
    """time.monotonic/time.sleep that advance only when slept (plus what each call of fn "takes")."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


def flaky(errors: list[BaseException], result: object = "ok", clock: FakeClock | None = None, cost: float = 0.0):
    """A callable that raises the given errors in turn, then returns ``result``; counts its calls."""
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if clock is not None:
            clock.now += cost
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


def run(fn, policy, clock: FakeClock, rand=lambda: 1.0):
    return retry.call(fn, policy, what="reading 3 chunks from redis://u:***@h:1/0", sleep=clock.sleep,
                      clock=clock.clock, rand=rand)


@pytest.mark.parametrize(
    "error",
    [
        BackendError("cannot reach Redis at redis://h:1/0 while reading 'k': reset", transient=True),
        BackendError("Redis at redis://h:1/0 is busy (LOADING)", transient=True),
        BackendError("S3 answered 503 SlowDown", transient=True),
        ConnectionResetError(104, "Connection reset by peer"),
        ConnectionRefusedError(111, "Connection refused"),
        BrokenPipeError(32, "Broken pipe"),
        TimeoutError("timed out"),
    ],
    ids=["backend-reset", "loading", "slowdown", "reset", "refused", "pipe", "timeout"],
)
def test_transient_errors_are_retried_until_success(error):
    clock = FakeClock()
    fn, calls = flaky([error, error], result=42)
    assert run(fn, RetryPolicy(attempts=3), clock) == 42
    assert calls["n"] == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize(
    "error",
    [
        BackendError("authentication failed for user 'u'", transient=False),
        NotFoundError("'m/v1/x' does not exist"),
        ManifestError("manifest is not valid JSON"),
        VerificationError("digest mismatch"),
        ValueError("a bug"),
        KeyError("k"),
        FileNotFoundError("gone"),
    ],
    ids=["auth", "missing", "manifest", "verify", "value", "key", "fnf"],
)
def test_permanent_errors_raise_at_once_unchanged(error):
    clock = FakeClock()
    fn, calls = flaky([error])
    with pytest.raises(type(error)) as info:
        run(fn, RetryPolicy(attempts=5), clock)
    assert info.value is error and calls["n"] == 1 and clock.sleeps == []


def test_backoff_is_exponential_capped_and_fully_jittered():
    policy = RetryPolicy(attempts=8, base_delay_s=0.1, max_delay_s=1.0, deadline_s=100)
    clock = FakeClock()
    fn, _ = flaky([TimeoutError()] * 7)
    run(fn, policy, clock, rand=lambda: 1.0)  # the upper edge of the jitter window
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    clock = FakeClock()
    fn, _ = flaky([TimeoutError()] * 3)
    run(fn, policy, clock, rand=lambda: 0.25)
    assert clock.sleeps == pytest.approx([0.025, 0.05, 0.1])
    # the real random source stays inside [0, cap]
    for n in range(1, 12):
        for _ in range(50):
            assert 0.0 <= policy.delay(n) <= min(1.0, 0.1 * 2 ** (n - 1))


def test_attempts_bound_and_the_final_error_says_how_many_over_how_long():
    clock = FakeClock()
    last = BackendError("cannot reach Redis at redis://u:***@h:1/0 while reading 'm/v/x': refused", transient=True)
    fn, calls = flaky([last] * 10, clock=clock, cost=0.5)
    with pytest.raises(BackendError) as info:
        run(fn, RetryPolicy(attempts=4, base_delay_s=0.1, deadline_s=100), clock)
    assert calls["n"] == 4 and len(clock.sleeps) == 3
    msg = str(info.value)
    assert "reading 3 chunks from redis://u:***@h:1/0 failed after 4 attempts over 2.7s" in msg
    assert "retry limit of 4 attempts" in msg and "refused" in msg
    assert info.value.transient is False, "already retried: an outer layer must not retry again"
    assert info.value.attempts == 4 and info.value.elapsed_s == pytest.approx(2.7)
    assert info.value.__cause__ is last


def test_deadline_bounds_time_even_with_attempts_left():
    clock = FakeClock()
    fn, calls = flaky([TimeoutError("slow")] * 100, clock=clock, cost=1.0)  # every try takes 1 s
    with pytest.raises(BackendError, match=r"failed after 3 attempts over 3\.\ds \(the retry deadline of 4s\)"):
        run(fn, RetryPolicy(attempts=100, base_delay_s=0.2, max_delay_s=0.5, deadline_s=4), clock)
    assert calls["n"] == 3 and clock.now < 4.0, "no wait runs past the deadline"


def test_until_deadline_errors_are_retried_past_the_attempt_limit_until_the_deadline():
    """A Redis Cluster promoting a replica: retried until the deadline whatever ``attempts`` says; success then."""
    from raydist_loader.connectors._cluster import reconfiguring

    clock = FakeClock()
    failover = [reconfiguring("cannot reach Redis Cluster node 127.0.0.1:7001: refused") for _ in range(12)]
    fn, calls = flaky(failover, clock=clock, cost=0.5)
    assert run(fn, RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=1.0, deadline_s=30), clock) == "ok"
    assert calls["n"] == 13 and clock.now < 30
    clock = FakeClock()
    fn, calls = flaky([reconfiguring("hash slot 7 has no master") for _ in range(100)], clock=clock, cost=0.5)
    with pytest.raises(BackendError, match=r"attempts over \d+\.\ds \(the retry deadline of 10s\).*no master"):
        run(fn, RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=1.0, deadline_s=10), clock)
    assert calls["n"] > 3, "past the attempt limit"
    with pytest.raises(BackendError, match="no master") as info:  # attempts=1: no retry at all, as asked
        run(flaky([reconfiguring("hash slot 7 has no master")])[0], RetryPolicy(attempts=1), FakeClock())
    assert info.value.transient


def test_raw_os_errors_name_their_type_in_the_final_error():
    clock = FakeClock()
    fn, _ = flaky([ConnectionResetError(104, "Connection reset by peer")] * 5)
    with pytest.raises(BackendError, match=r"last error: ConnectionResetError: \[Errno 104\] Connection reset"):
        run(fn, RetryPolicy(attempts=2), clock)


def test_one_attempt_means_no_retry_and_the_error_unchanged():
    clock = FakeClock()
    err = BackendError("reset", transient=True)
    fn, calls = flaky([err])
    with pytest.raises(BackendError) as info:
        run(fn, RetryPolicy(attempts=1), clock)
    assert info.value is err and calls["n"] == 1
    fn, calls = flaky([err])
    with pytest.raises(BackendError):
        run(fn, retry.NO_RETRY, clock)


def test_real_clock_defaults_work():
    fn, calls = flaky([TimeoutError(), TimeoutError()], result="x")
    assert retry.call(fn, RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.002), what="t") == "x"
    assert calls["n"] == 3


def test_policy_validation_and_coercion():
    assert retry.coerce_policy(None) == RetryPolicy()
    p = RetryPolicy(attempts=2)
    assert retry.coerce_policy(p) is p
    assert retry.coerce_policy({"attempts": 3, "deadline_s": 5}) == RetryPolicy(attempts=3, deadline_s=5)
    with pytest.raises(ConfigError, match=r"unknown retry option\(s\) \['tries'\]; known: attempts"):
        retry.coerce_policy({"tries": 3})
    with pytest.raises(ConfigError, match="retries.attempts must be an integer >= 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="retries.attempts"):
        RetryPolicy(attempts=True)
    with pytest.raises(ConfigError, match="retries.base_delay_s must be a number >= 0"):
        RetryPolicy(base_delay_s=-1)
    with pytest.raises(ConfigError, match="retries.deadline_s must be > 0"):
        RetryPolicy(deadline_s=0)
    with pytest.raises(ConfigError, match="retry must be a RetryPolicy"):
        retry.coerce_policy(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.attempts = 9  # type: ignore[misc]


def test_config_load_retries_section():
    from raydist_loader.config import load_config

    base = {"model": "m", "store": {"url": "file:///tmp/s"}}
    cfg = load_config({**base, "load": {"tp": 2}})
    assert cfg.load.retries.policy() == RetryPolicy()
    cfg = load_config({**base, "load": {"tp": 2, "retries": {"attempts": 8, "deadline_s": 60}}})
    assert cfg.load.retries.policy() == RetryPolicy(attempts=8, deadline_s=60)
    with pytest.raises(ConfigError, match=r"load\.retries\.attempts: got 0 \(int\); expected a value in \[1, 100\]"):
        load_config({**base, "load": {"tp": 2, "retries": {"attempts": 0}}})
    with pytest.raises(ConfigError, match=r"load\.retries\.tries: unknown key; known keys: attempts, base_delay_s"):
        load_config({**base, "load": {"tp": 2, "retries": {"tries": 3}}})
    with pytest.raises(ConfigError, match=r"load\.retries\.deadline_s: got 0 \(int\); expected a value in \(0, 604800"):
        load_config({**base, "load": {"tp": 2, "retries": {"deadline_s": 0}}})
