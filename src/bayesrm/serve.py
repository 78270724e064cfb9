"""HTTP scoring server: `POST /v1/score` with dynamic micro-batching over one shared `Scorer`.

Concurrent requests are queued; one worker gathers whole requests until `max_batch_responses` responses or
`max_wait_ms` have passed, runs `Scorer.score` once in a worker thread and hands each request its slice. Scores are
per response (they do not depend on what else is in the batch), so batching changes throughput, not results.

    POST /v1/score  {"prompt": "...", "responses": ["...", ...]}
        → {"spec": "la:var:k=1", "results": [{"reward": r, "std": σ or null, "selection": penalised reward}, ...]}
    GET /health     → {"status": "ok", "spec": ...}   (503 while draining at shutdown)
    GET /metrics    → Prometheus text: requests by status, responses, batches, batch sizes, latency quantiles

Limits: body bytes (413), responses per request (422), untruncated tokens of prompt + response (413, naming the
response), time queued before scoring starts (503 + Retry-After), time until answered (504 + Retry-After), and time
to send the request headers (the connection is closed). A request whose client disconnects is dropped from the
queue, and a batch stops at its next chunk once all its clients are gone; /metrics counts disconnects apart from
errors. An optional API key (read from an environment variable, never a command-line value) is checked in
constant time against `Authorization: Bearer KEY` or `X-API-Key: KEY`; /health and /metrics stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bayesrm.templates import encode

log = logging.getLogger("bayesrm.serve")
Rows = list[dict[str, Any]]
CLIENT_GONE = 499  # status recorded for a request whose client disconnected (nginx's convention)
SCORE_CHUNK_BATCHES = 4  # a micro-batch is scored this many forward batches per call, so abandoned work stops soon


@dataclass
class ServeConfig:
    """Server settings; the CLI fills them from `bayesrm serve` options."""

    host: str = "127.0.0.1"
    port: int = 8000
    spec: str = "map"  # selection spec, as in `bayesrm score --spec` (transforms needing a ref are not served)
    max_batch_responses: int = 64  # a micro-batch closes at this many responses (whole requests; 1 = no batching)
    max_wait_ms: float = 5.0  # … or this long after its first request arrived
    max_body_bytes: int = 1 << 20  # larger bodies → 413
    max_responses: int = 256  # responses per request; more → 422
    max_tokens: int = 2048  # untruncated tokens of template(prompt, response); more → 413
    api_key_env: str | None = None  # name of the env var holding the API key; None = no key
    batch_size: int = 16  # forward batch size inside one Scorer.score call
    graceful_timeout_s: float = 30.0  # at shutdown, wait this long for in-flight requests
    log_level: str = "info"
    max_queue_s: float = 30.0  # a request whose scoring has not started after this long → 503 + Retry-After
    request_timeout_s: float = 120.0  # a request not answered after this long → 504 + Retry-After
    retry_after_s: int = 5  # the Retry-After header of 503/504
    header_timeout_s: float = 10.0  # a connection that has not sent a request's complete headers by then is closed


class ScoreRequest(BaseModel):
    """Body of `POST /v1/score`: one prompt and the responses to score for it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    responses: list[str] = Field(min_length=1)


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


class Rejected(Exception):
    """A request refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


# --------------------------------------------------------------------------- metrics


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile of ascending values (nan when empty)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))]


@dataclass
class Metrics:
    """Counters of one server; updated on the event loop only (no locking needed)."""

    window: int = 10_000  # latency quantiles over the last `window` successful requests
    requests: Counter[int] = field(default_factory=Counter)  # by HTTP status
    responses: int = 0  # responses scored
    batches: int = 0  # Scorer.score calls
    batch_responses_sum: int = 0
    batch_responses_max: int = 0
    batch_requests_max: int = 0
    latency_sum: float = 0.0
    in_flight: int = 0  # POST /v1/score requests being handled now
    disconnects: int = 0  # requests whose client went away before the answer (status 499, not an error)
    dropped_responses: int = 0  # responses of abandoned or timed-out requests that were never scored
    latencies: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.window)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.disconnects += status == CLIENT_GONE
        if status == 200:
            self.latencies.append(seconds)
            self.latency_sum += seconds

    def observe_batch(self, requests: int, responses: int) -> None:
        self.batches += 1
        self.responses += responses
        self.batch_responses_sum += responses
        self.batch_responses_max = max(self.batch_responses_max, responses)
        self.batch_requests_max = max(self.batch_requests_max, requests)

    def snapshot(self) -> dict[str, float]:
        """Flat dict of the current values (the same numbers /metrics shows)."""
        lat = sorted(self.latencies)
        ok = self.requests[200]
        return {"requests": sum(self.requests.values()), "requests_ok": ok,
                "errors": sum(n for s, n in self.requests.items() if s not in (200, CLIENT_GONE)),
                "client_disconnects": self.disconnects, "dropped_responses": self.dropped_responses,
                "responses": self.responses,
                "batches": self.batches, "batch_responses_mean": self.batch_responses_sum / max(self.batches, 1),
                "batch_responses_max": self.batch_responses_max, "batch_requests_max": self.batch_requests_max,
                "batch_requests_mean": ok / max(self.batches, 1), "in_flight": self.in_flight,
                "latency_p50": quantile(lat, 0.5), "latency_p90": quantile(lat, 0.9),
                "latency_p99": quantile(lat, 0.99)}

    def prometheus(self) -> str:
        """Prometheus text exposition format (0.0.4)."""
        s = self.snapshot()
        out = ["# HELP bayesrm_requests_total POST /v1/score requests by HTTP status.",
               "# TYPE bayesrm_requests_total counter"]
        out += [f'bayesrm_requests_total{{status="{c}"}} {n}' for c, n in sorted(self.requests.items())]
        for name, kind, value, doc in (
            ("errors_total", "counter", s["errors"], "Requests answered with a status other than 200 (not 499)."),
            ("client_disconnects_total", "counter", s["client_disconnects"],
             "Requests whose client disconnected before the answer (status 499; not errors)."),
            ("dropped_responses_total", "counter", s["dropped_responses"],
             "Responses never scored because their request was abandoned or timed out."),
            ("responses_total", "counter", s["responses"], "Responses scored."),
            ("batches_total", "counter", s["batches"], "Micro-batches (Scorer.score calls)."),
            ("batch_responses_mean", "gauge", s["batch_responses_mean"], "Mean responses per micro-batch."),
            ("batch_responses_max", "gauge", s["batch_responses_max"], "Most responses in one micro-batch."),
            ("batch_requests_mean", "gauge", s["batch_requests_mean"], "Mean requests per micro-batch."),
            ("batch_requests_max", "gauge", s["batch_requests_max"], "Most requests in one micro-batch."),
            ("requests_in_flight", "gauge", s["in_flight"], "Requests being handled now."),
        ):
            out += [f"# HELP bayesrm_{name} {doc}", f"# TYPE bayesrm_{name} {kind}", f"bayesrm_{name} {value:g}"]
        out += ["# HELP bayesrm_request_latency_seconds Latency of successful requests (quantiles over the last "
                f"{self.window}).", "# TYPE bayesrm_request_latency_seconds summary"]
        out += [f'bayesrm_request_latency_seconds{{quantile="{q}"}} {s[k]:g}'
                for q, k in (("0.5", "latency_p50"), ("0.9", "latency_p90"), ("0.99", "latency_p99"))]
        out += [f"bayesrm_request_latency_seconds_sum {self.latency_sum:g}",
                f"bayesrm_request_latency_seconds_count {self.requests[200]}"]
        return "\n".join(out) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name (with labels) → value, from Prometheus text (for clients, tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- micro-batching


@dataclass(eq=False)
class _Job:
    prompt: str
    responses: list[str]
    future: asyncio.Future[Rows]
    started: bool = False  # taken into a batch (no longer queued)


class MicroBatcher:
    """Gathers queued requests into micro-batches and scores each batch with one call of `score_fn`.

    `score_fn(prompts, responses) -> rows` runs in one worker thread. A batch holds whole requests: it closes when
    the next request would push it past `max_responses` (a larger single request forms a batch alone) or
    `max_wait_s` after its first request arrived. With `chunk`, a batch is scored `chunk` responses per call
    (similar lengths together) and the responses of requests abandoned meanwhile are skipped. `submit` bounds
    the time queued (`max_queue_s`, 503) and until answered (`timeout_s`, 504), and drops the request when
    `disconnected()` turns true.
    """

    def __init__(self, score_fn: Callable[[list[str], list[str]], Rows], max_responses: int, max_wait_s: float,
                 metrics: Metrics | None = None, chunk: int | None = None, max_queue_s: float = math.inf,
                 timeout_s: float = math.inf, retry_after_s: int = 5) -> None:
        self.score_fn, self.max_responses, self.max_wait_s = score_fn, max(1, max_responses), max(0.0, max_wait_s)
        self.metrics = metrics or Metrics()
        self.chunk, self.max_queue_s, self.timeout_s = chunk, max_queue_s, timeout_s
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bayesrm-score")
        self._task: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, prompt: str, responses: list[str],
                     disconnected: Callable[[], Awaitable[None]] | None = None) -> Rows:
        """Queue one request; return its rows once scored (Rejected 503/504 past the limits, ClientGone).

        `disconnected()` is awaited alongside: its return means the client has gone.
        """
        if self._closing:
            raise Rejected(503, "server is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(prompt, responses, loop.create_future())
        self._jobs.append(job)
        self._wake.set()
        t0 = loop.time()
        watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            while True:
                limit = self.timeout_s if job.started else min(self.max_queue_s, self.timeout_s)
                left = t0 + limit - loop.time()
                done, _ = await asyncio.wait({job.future} | ({watch} if watch else set()),
                                             timeout=max(left, 0.0) if math.isfinite(left) else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if job.future in done:
                    return job.future.result()
                if watch is not None and watch in done:
                    raise ClientGone
                if loop.time() - t0 >= self.timeout_s:
                    raise Rejected(504, f"not scored within {self.timeout_s:g} s; retry later", self.retry_after)
                if not job.started and loop.time() - t0 >= self.max_queue_s:
                    raise Rejected(503, f"server busy: scoring did not start within {self.max_queue_s:g} s; retry "
                                        "later", self.retry_after)
        finally:
            if watch is not None:
                watch.cancel()
            if not job.future.done():  # abandoned: never scored if still queued, skipped by later chunks otherwise
                job.future.cancel()

    async def close(self) -> None:
        """Stop accepting requests, finish every queued one, stop the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _next_batch(self) -> list[_Job]:
        """Wait for a first job, then gather more until full or `max_wait_s` passed; [] once closed and empty."""
        while not self._drop_abandoned():
            if self._closing:
                return []
            self._wake.clear()
            await self._wake.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        batch = [self._jobs.popleft()]
        n = len(batch[0].responses)
        while n < self.max_responses:
            if self._drop_abandoned():
                if n + len(self._jobs[0].responses) > self.max_responses:
                    break
                job = self._jobs.popleft()
                batch.append(job)
                n += len(job.responses)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        for j in batch:
            j.started = True
        return batch

    def _drop_abandoned(self) -> bool:
        """Discard queued jobs whose client has gone (future cancelled); True if a live job is waiting."""
        while self._jobs and self._jobs[0].future.done():
            self.metrics.dropped_responses += len(self._jobs.popleft().responses)
        return bool(self._jobs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := await self._next_batch():
            items = [(j, k) for j in batch for k in range(len(j.responses))]
            if self.chunk is not None:  # similar lengths share a call; order is restored below
                items.sort(key=lambda it: len(it[0].prompt) + len(it[0].responses[it[1]]))
            size = self.chunk or len(items)
            rows: dict[int, Rows] = {id(j): [{}] * len(j.responses) for j in batch}
            scored = 0
            try:
                for s in range(0, len(items), size):
                    live = [(j, k) for j, k in items[s:s + size] if not j.future.done()]
                    self.metrics.dropped_responses += min(size, len(items) - s) - len(live)
                    if not live:
                        continue
                    out = await loop.run_in_executor(self._executor, self.score_fn, [j.prompt for j, _ in live],
                                                     [j.responses[k] for j, k in live])
                    for (j, k), row in zip(live, out, strict=True):
                        rows[id(j)][k] = row
                    scored += len(live)
            except Exception as e:  # any scoring failure fails this batch's requests, never the worker
                log.exception("scoring a batch of %d responses failed", len(items))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.metrics.observe_batch(len(batch), scored)
            for j in batch:
                if not j.future.done():  # a client that went away cancelled its future
                    j.future.set_result(rows[id(j)])


# --------------------------------------------------------------------------- app


def _validation_message(err: ValidationError) -> str:
    """One line per problem: 'responses[2]: Input should be a valid string'."""
    parts = []
    for e in err.errors(include_url=False):
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = Rejected(413, f"request body larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _disconnect(request: Request) -> None:
    """Return once the client has gone: after the body, the ASGI server's next message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _api_key(env: str | None) -> bytes | None:
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise ValueError(f"API key variable {env} is not set (or empty); export it or drop --api-key-env")
    return key.encode()


def _check_key(request: Request, key: bytes | None) -> None:
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key):
        raise Rejected(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                       {"WWW-Authenticate": "Bearer"})


def token_counts(model: Any, prompt: str, responses: Sequence[str]) -> list[int]:
    """Untruncated token count of each templated (prompt, response) with `model`'s tokenizer and template."""
    ids = encode(model.tokenizer, [prompt] * len(responses), responses, template=model.config.template,
                 max_length=1 << 40)
    return [len(x) for x in ids]


def create_app(scorer: Any, cfg: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `scorer` (a loaded `bayesrm.scoring.Scorer`) with the limits of `cfg`."""
    cfg = cfg or ServeConfig()
    if scorer.spec.transform is not None:
        raise ValueError(f"spec '{scorer.spec}' needs a per-prompt reference reward; the server serves specs "
                         "without a transform suffix")
    key = _api_key(cfg.api_key_env)
    metrics = Metrics()
    spec = str(scorer.spec)

    def score_rows(prompts: list[str], responses: list[str]) -> Rows:
        return scorer.score(prompts, responses).rows()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = MicroBatcher(score_rows, cfg.max_batch_responses, cfg.max_wait_ms / 1000, metrics,
                                         chunk=SCORE_CHUNK_BATCHES * cfg.batch_size, max_queue_s=cfg.max_queue_s,
                                         timeout_s=cfg.request_timeout_s, retry_after_s=cfg.retry_after_s)
        app.state.batcher.start()
        yield
        await app.state.batcher.close()  # drain: queued requests are scored before the worker stops

    app = FastAPI(title="bayesrm scoring server", lifespan=lifespan)
    app.state.metrics, app.state.config = metrics, cfg

    async def _checked(request: Request) -> ScoreRequest:
        _check_key(request, key)
        body = await _read_body(request, cfg.max_body_bytes)
        try:
            req = ScoreRequest.model_validate_json(body)
        except ValidationError as e:
            raise Rejected(422, _validation_message(e)) from None
        if len(req.responses) > cfg.max_responses:
            raise Rejected(422, f"responses: {len(req.responses)} responses, at most {cfg.max_responses} per request")
        counts = await asyncio.to_thread(token_counts, scorer.model, req.prompt, req.responses)
        over = [(i, c) for i, c in enumerate(counts) if c > cfg.max_tokens]
        if over:
            i, c = over[0]
            more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
            raise Rejected(413, f"responses[{i}]: prompt + response is {c} tokens, at most {cfg.max_tokens}{more}")
        return req

    schema = {"requestBody": {"required": True,
                              "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}}}}

    async def _answer(request: Request) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        try:
            req = await _checked(request)
            rows = await request.app.state.batcher.submit(req.prompt, req.responses, lambda: _disconnect(request))
        except Rejected as e:
            return e.status, {"detail": e.detail}, e.headers
        except ClientGone:
            return CLIENT_GONE, {"detail": "client disconnected"}, None
        except Exception as e:  # scoring failed (logged by the batcher): report it, keep serving
            return 500, {"detail": f"scoring failed: {type(e).__name__}"}, None
        return 200, {"spec": spec, "results": rows}, None

    @app.post("/v1/score", openapi_extra=schema)
    async def score(request: Request) -> JSONResponse:
        """Reward, std and the spec's selection (penalised) reward of each response."""
        t0 = time.perf_counter()
        metrics.in_flight += 1
        try:
            status, content, headers = await _answer(request)
        finally:
            metrics.in_flight -= 1
        metrics.observe_request(status, time.perf_counter() - t0)
        return JSONResponse(content, status_code=status, headers=headers)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while serving, 503 while draining at shutdown."""
        batcher = getattr(request.app.state, "batcher", None)
        if batcher is None or batcher.closing:
            return JSONResponse({"status": "draining", "spec": spec}, status_code=503)
        return JSONResponse({"status": "ok", "spec": spec})

    @app.get("/metrics")
    async def prom() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def serve(model_path: str | Path, cfg: ServeConfig, device: str | None = None) -> None:
    """Load the Scorer for `cfg.spec` from `model_path` and serve it with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from bayesrm.scoring import Scorer

    _api_key(cfg.api_key_env)  # fail before the (slow) model load
    scorer = Scorer.load(model_path, cfg.spec, device=device, batch_size=cfg.batch_size)
    uvicorn.Server(uvicorn_config(create_app(scorer, cfg), cfg)).run()


def uvicorn_config(app: FastAPI, cfg: ServeConfig) -> Any:
    """The uvicorn settings `serve` runs `app` with (h11 with a header-read deadline; no websockets)."""
    import uvicorn

    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, ws="none",
                          http=header_timeout_protocol(cfg.header_timeout_s), lifespan="on",
                          timeout_graceful_shutdown=int(cfg.graceful_timeout_s))


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol closing a connection that has not sent a request's complete headers within `seconds`.

    uvicorn itself times out only idle keep-alive connections, so a client that sends half a header holds its
    connection forever. The deadline runs from connection start and from the end of each response.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            waiting, transport = self.cycle, self.transport

            def expire() -> None:
                if self.cycle is waiting and not transport.is_closing():  # no new request's headers since
                    log.info("closing a connection that sent no complete request headers in %g s", seconds)
                    transport.close()

            self._header_timer = self.loop.call_later(seconds, expire)

    return HeaderTimeoutH11
