"""The scoring server on a real localhost socket: results, limits, API key, micro-batching, metrics, shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from bayesrm.cli import app as cli_app
from bayesrm.scoring import Scorer
from bayesrm.serve import (
    MicroBatcher,
    Rejected,
    ServeConfig,
    create_app,
    parse_prometheus,
    quantile,
    uvicorn_config,
)

PROMPT = "question 1 about cats"
RESPONSES = ["good great", "bad awful rude", "kind clear correct helpful"]


@pytest.fixture(scope="module")
def scorer(laplace_ensemble: Path) -> Scorer:
    return Scorer.load(laplace_ensemble / "member_0", "la:var:k=1")


@contextmanager
def running(app: Any) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve `app` with uvicorn in a background thread on a free localhost port; yield (base URL, server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _metrics(url: str) -> dict[str, float]:
    res = httpx.get(f"{url}/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    return parse_prometheus(res.text)


def _post_many(url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return list(await asyncio.gather(*(client.post("/v1/score", json=b, headers=headers) for b in bodies)))
    return asyncio.run(go())


def test_score_matches_scorer_and_health(scorer: Scorer) -> None:
    with running(create_app(scorer)) as (url, _):
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "spec": "la:var:k=1"}
        res = httpx.post(f"{url}/v1/score", json={"prompt": PROMPT, "responses": RESPONSES})
        assert res.status_code == 200, res.text
        body = res.json()
        m = _metrics(url)
    want = scorer.score([PROMPT] * 3, RESPONSES).rows()
    assert body["spec"] == "la:var:k=1" and len(body["results"]) == 3
    for got, exp in zip(body["results"], want, strict=True):
        assert got["std"] > 0
        for key in ("reward", "std", "selection"):
            assert got[key] == pytest.approx(exp[key], rel=1e-5, abs=1e-6)
        assert got["selection"] == pytest.approx(got["reward"] - got["std"] ** 2, rel=1e-5, abs=1e-6)
    assert m['bayesrm_requests_total{status="200"}'] == 1 and m["bayesrm_responses_total"] == 3
    assert m['bayesrm_request_latency_seconds{quantile="0.5"}'] > 0


def test_bad_requests_get_clear_4xx(scorer: Scorer) -> None:
    cfg = ServeConfig(max_body_bytes=4096, max_responses=4, max_tokens=40)
    long = "word " * 100
    with running(create_app(scorer, cfg)) as (url, _):
        def post(content: str | bytes) -> tuple[int, str]:
            res = httpx.post(f"{url}/v1/score", content=content, headers={"content-type": "application/json"})
            return res.status_code, res.json()["detail"]

        cases = [
            ("{not json", 422, "Invalid JSON"),
            ("[1, 2]", 422, "object"),
            (json.dumps({"prompt": "p"}), 422, "responses: Field required"),
            (json.dumps({"prompt": "p", "responses": ["a", 3]}), 422, "responses[1]: Input should be a valid string"),
            (json.dumps({"prompt": 5, "responses": ["a"]}), 422, "prompt: Input should be a valid string"),
            (json.dumps({"prompt": "p", "responses": []}), 422, "responses: List should have at least 1 item"),
            (json.dumps({"prompt": "p", "responses": ["a"], "extra": 1}), 422, "extra: Extra inputs"),
            (json.dumps({"prompt": "p", "responses": ["a"] * 5}), 422, "5 responses, at most 4"),
            (json.dumps({"prompt": "p", "responses": ["ok", long, "fine"]}), 413, "responses[1]: prompt + response"),
            (json.dumps({"prompt": "p", "responses": ["x" * 5000]}), 413, "larger than 4096 bytes"),
        ]
        for content, status, msg in cases:
            got_status, detail = post(content)
            assert (got_status, msg in detail) == (status, True), (content[:40], got_status, detail)
        m = _metrics(url)
        assert httpx.post(f"{url}/v1/score", json={"prompt": "p", "responses": ["ok"]}).status_code == 200
    assert m["bayesrm_errors_total"] == len(cases) and m["bayesrm_batches_total"] == 0


def test_api_key_from_env_constant_time(scorer: Scorer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="BAYESRM_TEST_KEY is not set"):
        create_app(scorer, ServeConfig(api_key_env="BAYESRM_TEST_KEY"))
    monkeypatch.setenv("BAYESRM_TEST_KEY", "s3cret")
    body = {"prompt": PROMPT, "responses": ["good"]}
    with running(create_app(scorer, ServeConfig(api_key_env="BAYESRM_TEST_KEY"))) as (url, _):
        missing = httpx.post(f"{url}/v1/score", json=body)
        wrong = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": "Bearer nope"})
        bearer = httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": "Bearer s3cret"})
        header = httpx.post(f"{url}/v1/score", json=body, headers={"X-API-Key": "s3cret"})
        health = httpx.get(f"{url}/health")
    assert missing.status_code == wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert bearer.status_code == header.status_code == health.status_code == 200


def test_concurrent_requests_are_micro_batched(scorer: Scorer) -> None:
    cfg = ServeConfig(max_batch_responses=64, max_wait_ms=300)
    bodies = [{"prompt": f"question {i}", "responses": RESPONSES[: 1 + i % 3]} for i in range(8)]
    with running(create_app(scorer, cfg)) as (url, _):
        results = _post_many(url, bodies)
        m = _metrics(url)
    assert [r.status_code for r in results] == [200] * 8
    for b, r in zip(bodies, results, strict=True):  # each request gets its own slice back, in order
        exp = scorer.score([b["prompt"]] * len(b["responses"]), b["responses"]).reward.tolist()
        assert [x["reward"] for x in r.json()["results"]] == pytest.approx(exp, rel=1e-5, abs=1e-6)
    n_resp = sum(len(b["responses"]) for b in bodies)
    assert m["bayesrm_responses_total"] == n_resp
    assert m["bayesrm_batches_total"] < 8 and m["bayesrm_batch_requests_max"] >= 2
    assert m["bayesrm_batch_responses_mean"] == pytest.approx(n_resp / m["bayesrm_batches_total"])


def test_graceful_shutdown_drains_in_flight(scorer: Scorer) -> None:
    cfg = ServeConfig(max_wait_ms=400)
    bodies = [{"prompt": f"q {i}", "responses": ["good", "bad"]} for i in range(4)]
    results: list[httpx.Response] = []
    with running(create_app(scorer, cfg)) as (url, server):
        sender = threading.Thread(target=lambda: results.extend(_post_many(url, bodies)))
        sender.start()
        deadline = time.monotonic() + 10
        while _metrics(url)["bayesrm_requests_in_flight"] < 4:  # all four wait in the 400 ms batch window
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.should_exit = True
        sender.join(15)
    assert [r.status_code for r in results] == [200] * 4


def test_scoring_failure_is_500_and_server_keeps_serving(scorer: Scorer) -> None:
    class Flaky:
        spec, model, calls = scorer.spec, scorer.model, 0

        def score(self, prompts: list[str], responses: list[str]) -> Any:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return scorer.score(prompts, responses)

    body = {"prompt": PROMPT, "responses": ["good"]}
    with running(create_app(Flaky())) as (url, _):
        first = httpx.post(f"{url}/v1/score", json=body)
        second = httpx.post(f"{url}/v1/score", json=body)
        m = _metrics(url)
    assert first.status_code == 500 and "RuntimeError" in first.json()["detail"]
    assert second.status_code == 200 and m['bayesrm_requests_total{status="500"}'] == 1


def test_micro_batcher_keeps_requests_whole_and_drains_on_close() -> None:
    calls: list[int] = []

    def fake(prompts: list[str], responses: list[str]) -> list[dict[str, Any]]:
        calls.append(len(responses))
        return [{"reward": float(len(r))} for r in responses]

    async def go() -> list[list[dict[str, Any]]]:
        b = MicroBatcher(fake, max_responses=4, max_wait_s=0.05)
        b.start()
        tasks = [asyncio.create_task(b.submit("p", ["x" * (i + 1)] * n)) for i, n in enumerate([3, 2, 6, 1, 1])]
        await asyncio.sleep(0)
        await b.close()
        return [await t for t in tasks]

    out = asyncio.run(go())
    assert calls == [3, 2, 6, 2]  # 3+2 > 4 splits; 6 > 4 goes alone; the last two share a batch
    assert [[r["reward"] for r in rows] for rows in out] == [[1.0] * 3, [2.0] * 2, [3.0] * 6, [4.0], [5.0]]


def test_quantile_and_spec_checks(scorer: Scorer) -> None:
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and quantile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    ref = Scorer(scorer.model, "la:var:k=1+logsig", scorer.posteriors)
    with pytest.raises(ValueError, match="reference reward"):
        create_app(ref)


def test_cli_serve_refuses_unset_key_before_loading(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "nope"), "--api-key-env", "BAYESRM_UNSET_KEY_X"])
    assert res.exit_code == 2 and "BAYESRM_UNSET_KEY_X is not set" in res.output


# --------------------------------------------------------------------------- abandoned work and time limits


def test_abandoned_large_request_is_dropped_and_the_next_does_not_wait(scorer: Scorer) -> None:
    """A client that sends 200 responses and disconnects must not make a 1-response request wait for them."""

    class Slow:  # 30 ms per response on top of real scoring: the 200 take ≥ 6 s if scored in full
        spec, model, scored = scorer.spec, scorer.model, 0

        def score(self, prompts: list[str], responses: list[str]) -> Any:
            Slow.scored += len(responses)
            time.sleep(0.03 * len(responses))
            return scorer.score(prompts, responses)

    cfg = ServeConfig(batch_size=4, max_batch_responses=256, max_wait_ms=1)  # scored 16 responses per call
    body = json.dumps({"prompt": PROMPT, "responses": [f"answer number {i}" for i in range(200)]}).encode()
    with running(create_app(Slow(), cfg)) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 20
            while Slow.scored == 0:  # its scoring has started
                assert time.monotonic() < deadline
                time.sleep(0.01)
        t0 = time.perf_counter()
        small = httpx.post(f"{url}/v1/score", json={"prompt": PROMPT, "responses": ["good"]}, timeout=60)
        waited = time.perf_counter() - t0
        while _metrics(url).get("bayesrm_client_disconnects_total", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        m = _metrics(url)
    assert small.status_code == 200
    assert waited < 3.0, f"the 1-response request waited {waited:.1f} s behind an abandoned request"
    assert Slow.scored <= 1 + 3 * 16  # at most the chunks under way when the client left, then the small one
    assert m["bayesrm_client_disconnects_total"] == 1 and m['bayesrm_requests_total{status="499"}'] == 1
    assert m["bayesrm_errors_total"] == 0 and 'bayesrm_requests_total{status="500"}' not in m
    assert m["bayesrm_dropped_responses_total"] >= 200 - 3 * 16


def test_queue_and_run_time_limits_give_503_and_504_with_retry_after() -> None:
    def slow(prompts: list[str], responses: list[str]) -> list[dict[str, Any]]:
        time.sleep(0.6)
        return [{"reward": 0.0} for _ in responses]

    async def go() -> list[Any]:
        b = MicroBatcher(slow, max_responses=1, max_wait_s=0.0, max_queue_s=0.2, timeout_s=0.3, retry_after_s=7)
        b.start()
        first = asyncio.create_task(b.submit("p", ["a"]))  # runs at once, for 0.6 s > 0.3 s
        await asyncio.sleep(0.05)
        second = asyncio.create_task(b.submit("p", ["b"]))  # queued behind it for > 0.2 s
        out = await asyncio.gather(first, second, return_exceptions=True)
        await b.close()
        return list(out)

    first, second = asyncio.run(go())
    assert isinstance(first, Rejected) and first.status == 504 and first.headers == {"Retry-After": "7"}
    assert isinstance(second, Rejected) and second.status == 503 and second.headers == {"Retry-After": "7"}


def test_connection_that_never_finishes_its_headers_is_closed(scorer: Scorer) -> None:
    cfg = ServeConfig(header_timeout_s=0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(scorer, cfg), cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(5)
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the server, not by our 5 s timeout
            assert time.monotonic() - t0 < 3
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"prompt": PROMPT, "responses": ["good"]})
        assert ok.status_code == 200  # complete requests are unaffected
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
