"""The client's retries against a real HTTP server of ours that answers 429 and 503 with
``Retry-After`` (or drops the connection) before it succeeds. Waits are recorded by an
injected sleep and the jitter comes from a seeded ``random.Random``: nothing here depends on
wall-clock speed."""

from __future__ import annotations

import random

import pytest

from slotguard.client import (ApiError, AsyncClient, BadRequest, Client, Conflict,
                              RetryExhausted, RetryPolicy, ServerError, parse_retry_after)
from tests.scripted_server import DROP, Answer, ScriptedServer, error

CREATED = Answer(201, {"reservationId": "rsv_1_x", "state": "HELD",
                       "expiresAt": "2030-01-01T09:10:00Z",
                       "vendorConfirmationRequired": True,
                       "estimatedConfirmationTime": "2030-01-01T09:05:00Z"})
BODY = dict(vendor_id="v", slot_start_time="2030-01-01T09:00:00Z",
            slot_end_time="2030-01-01T09:30:00Z", requester_id="r")


def policy(seed: int = 7, **kw) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(seed), **kw)


def expected_backoffs(seed: int, n: int, base: float = 1.0, cap: float = 60.0) -> list[float]:
    rng = random.Random(seed)
    return [min(cap, base * 2 ** i * rng.uniform(0.8, 1.2)) for i in range(n)]


def test_429_then_503_with_retry_after_then_success_reuses_the_key_and_waits():
    waits: list[float] = []
    answers = [error(429, "RATE_LIMITED", "3"), error(503, "SERVICE_UNAVAILABLE", "5"), CREATED]
    with ScriptedServer(answers) as server, \
            Client(server.url, "k", policy=policy(), sleep=waits.append) as client:
        created = client.create_reservation(**BODY)
    assert created.reservation_id == "rsv_1_x" and created.state == "HELD"
    assert len(server.seen) == 3
    keys = {s.headers["idempotency-key"] for s in server.seen}
    assert len(keys) == 1 and keys != {""}
    assert all(s.headers["authorization"] == "Bearer k" for s in server.seen)
    # Retry-After (3 s, then 5 s) is longer than the backoff (about 1 s, then 2 s): honoured.
    backoff = expected_backoffs(7, 2)
    assert backoff[0] < 3 and backoff[1] < 5
    assert waits == [3.0, 5.0]


def test_backoff_wins_when_longer_than_retry_after():
    waits: list[float] = []
    answers = [error(503, "SERVICE_UNAVAILABLE", "1"), error(429, "RATE_LIMITED", "1"), CREATED]
    with ScriptedServer(answers) as server, \
            Client(server.url, policy=policy(3, base_delay_s=4.0), sleep=waits.append) as c:
        c.create_reservation(**BODY)
    assert waits == expected_backoffs(3, 2, base=4.0)
    assert 4 * 0.8 <= waits[0] <= 4 * 1.2 and 8 * 0.8 <= waits[1] <= 8 * 1.2


def test_exhaustion_after_five_attempts_with_bounded_waits_and_context():
    waits: list[float] = []
    with ScriptedServer([], default=error(503, "SERVICE_UNAVAILABLE")) as server, \
            Client(server.url, policy=policy(11, base_delay_s=10.0, max_delay_s=25.0),
                   sleep=waits.append) as client:
        with pytest.raises(RetryExhausted) as caught:
            client.create_reservation(**BODY, idempotency_key="mine-1")
    exc = caught.value
    assert exc.attempts == 5 and len(server.seen) == 5
    assert {s.headers["idempotency-key"] for s in server.seen} == {"mine-1"}
    assert exc.idempotency_key == "mine-1"
    assert isinstance(exc.last_error, ServerError) and exc.last_status == 503
    assert exc.last_error.code == "SERVICE_UNAVAILABLE"
    assert exc.last_error.request_id == "req-503-SERVICE_UNAVAILABLE"
    assert (exc.method, exc.path) == ("POST", "/v1/reservations")
    assert waits == exc.waits == expected_backoffs(11, 4, base=10.0, cap=25.0)
    assert waits[2:] == [25.0, 25.0]  # 40 s and 80 s capped


@pytest.mark.parametrize("status,code,kind", [
    (400, "INVALID_FIELD", BadRequest), (409, "HOLD_CONFLICT", Conflict),
    (422, "IDEMPOTENCY_KEY_REUSED", ApiError), (401, "UNAUTHORIZED", ApiError)])
def test_a_4xx_is_never_retried(status, code, kind):
    waits: list[float] = []
    answer = error(status, code, field="slotStartTime")
    with ScriptedServer([answer, CREATED]) as server, \
            Client(server.url, policy=policy(), sleep=waits.append) as client:
        with pytest.raises(kind) as caught:
            client.create_reservation(**BODY)
    assert len(server.seen) == 1 and waits == []
    exc = caught.value
    assert (exc.status, exc.code, exc.details) == (status, code, {"field": "slotStartTime"})
    assert exc.request_id == f"req-{status}-{code}"


def test_409_in_progress_is_retried_with_the_same_key():
    waits: list[float] = []
    answers = [error(409, "IDEMPOTENCY_KEY_IN_PROGRESS", "2"), CREATED]
    with ScriptedServer(answers) as server, \
            Client(server.url, policy=policy(), sleep=waits.append) as client:
        assert client.create_reservation(**BODY).reservation_id == "rsv_1_x"
    assert len(server.seen) == 2 and waits == [2.0]
    assert server.seen[0].headers["idempotency-key"] == server.seen[1].headers["idempotency-key"]


def test_a_dropped_connection_is_retried_and_each_logical_call_has_its_own_key():
    waits: list[float] = []
    with ScriptedServer([DROP, CREATED, CREATED]) as server, \
            Client(server.url, policy=policy(5), sleep=waits.append) as client:
        client.create_reservation(**BODY)
        client.create_reservation(**BODY)
    first, retried, second = (s.headers["idempotency-key"] for s in server.seen)
    assert first == retried != second
    assert waits == expected_backoffs(5, 1)


def test_retry_after_http_date_and_bad_values():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_formula_bounds():
    p = RetryPolicy(rng=random.Random(1))
    for retry in range(8):
        for _ in range(200):
            wait = p.backoff(retry)
            assert min(60.0, 0.8 * 2 ** retry) <= wait <= min(60.0, 1.2 * 2 ** retry)
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


async def test_async_client_retries_429_then_503_with_the_same_key():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    answers = [error(429, "RATE_LIMITED", "2"), error(503, "NOT_READY", "4"), CREATED]
    with ScriptedServer(answers) as server:
        async with AsyncClient(server.url, "k", policy=policy(), sleep=sleep) as client:
            created = await client.create_reservation(**BODY)
    assert created.reservation_id == "rsv_1_x"
    assert waits == [2.0, 4.0]
    assert len({s.headers["idempotency-key"] for s in server.seen}) == 1
    assert len(server.seen) == 3


async def test_async_client_exhaustion_on_connection_refused():
    from tests.live_server import free_port

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = AsyncClient(f"http://127.0.0.1:{free_port()}", policy=policy(attempts=3),
                         sleep=sleep)
    async with client:
        with pytest.raises(RetryExhausted) as caught:
            await client.get_reservation("rsv_0_x")
    assert caught.value.attempts == 3 and len(waits) == 2
    assert caught.value.last_status is None and caught.value.idempotency_key is None


def test_on_attempt_sees_every_try_and_with_options_shares_the_pool():
    seen = []
    answers = [DROP, error(503, "SERVICE_UNAVAILABLE", "1"), CREATED]
    with ScriptedServer(answers) as server, \
            Client(server.url, "k1", policy=policy(), sleep=lambda s: None) as client:
        observed = client.with_options(key="k2", on_attempt=seen.append)
        observed.create_reservation(**BODY)
        assert observed.http is client.http and client.on_attempt is None
    assert [a.number for a in seen] == [1, 2, 3]
    assert seen[0].response is None and seen[0].error is not None
    assert [a.response.status_code for a in seen[1:]] == [503, 201]
    assert all(a.t0 <= a.t1 for a in seen)
    assert {s.headers["authorization"] for s in server.seen} == {"Bearer k2"}
    with pytest.raises(TypeError):
        client.with_options(colour="blue")


def test_pages_follow_next_cursor_and_request_reaches_any_route():
    pages = [Answer(200, {"data": [{"n": 1}, {"n": 2}], "nextCursor": "c1"}),
             error(503, "SERVICE_UNAVAILABLE", "1"),  # a page retried on its own
             Answer(200, {"data": [{"n": 3}], "nextCursor": None})]
    waits: list[float] = []
    with ScriptedServer(pages) as server, \
            Client(server.url, "k", policy=policy(), sleep=waits.append) as client:
        rows = list(client.pages("/v1/reservations", {"state": "HELD", "limit": 2,
                                                      "vendorId": None}))
    assert [r["n"] for r in rows] == [1, 2, 3]
    assert [s.path for s in server.seen] == [
        "/v1/reservations?state=HELD&limit=2",
        "/v1/reservations?state=HELD&limit=2&startingAfter=c1",
        "/v1/reservations?state=HELD&limit=2&startingAfter=c1"]
    assert waits == [1.0]
    with ScriptedServer([error(400, "INVALID_CURSOR")]) as server, \
            Client(server.url, sleep=waits.append) as client:
        with pytest.raises(BadRequest) as bad:
            client.request("get", "/v1/bookings", params={"startingAfter": "x"})
    assert bad.value.code == "INVALID_CURSOR" and server.seen[0].method == "GET"


async def test_async_pages():
    pages = [Answer(200, {"data": [{"n": 1}], "nextCursor": "c1"}),
             Answer(200, {"data": [], "nextCursor": None})]

    async def sleep(seconds: float) -> None:
        raise AssertionError("no retry expected")

    with ScriptedServer(pages) as server:
        async with AsyncClient(server.url, sleep=sleep) as client:
            rows = [row async for row in client.pages("/v1/bookings")]
    assert rows == [{"n": 1}] and len(server.seen) == 2
