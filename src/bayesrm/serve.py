"""HTTP scoring server: `POST /v1/score` with dynamic micro-batching over one shared `Scorer`.

Concurrent requests are queued; one worker gathers whole requests until `max_batch_responses` responses or
`max_wait_ms` have passed, runs `Scorer.score` once in a worker thread and hands each request its slice. Scores are
per response (they do not depend on what else is in the batch), so batching changes throughput, not results.

    POST /v1/score  {"prompt": "...", "responses": ["...", ...]}
        → {"spec": "la:var:k=1", "results": [{"reward": r, "std": σ or null, "selection": penalised reward}, ...]}
    GET /health     → {"status": "ok", "spec": ...}   (503 while draining at shutdown)
    GET /metrics    → Prometheus text: requests by status, responses, batches, batch sizes, latency quantiles

Limits: body bytes (413), responses per request (422), untruncated tokens of prompt + response (413, naming the
response). An optional API key (read from an environment variable, never a command-line value) is checked in
constant time against `Authorization: Bearer KEY` or `X-API-Key: KEY`; /health and /metrics stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
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


class ScoreRequest(BaseModel):
    """Body of `POST /v1/score`: one prompt and the responses to score for it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    responses: list[str] = Field(min_length=1)


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
    latencies: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.window)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
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
                "errors": sum(n for s, n in self.requests.items() if s != 200), "responses": self.responses,
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
            ("errors_total", "counter", s["errors"], "Requests answered with a status other than 200."),
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


@dataclass
class _Job:
    prompt: str
    responses: list[str]
    future: asyncio.Future[Rows]


class MicroBatcher:
    """Gathers queued requests into micro-batches and scores each batch with one call of `score_fn`.

    `score_fn(prompts, responses) -> rows` runs in one worker thread. A batch holds whole requests: it closes when
    the next request would push it past `max_responses` (a larger single request forms a batch alone) or
    `max_wait_s` after its first request arrived.
    """

    def __init__(self, score_fn: Callable[[list[str], list[str]], Rows], max_responses: int, max_wait_s: float,
                 metrics: Metrics | None = None) -> None:
        self.score_fn, self.max_responses, self.max_wait_s = score_fn, max(1, max_responses), max(0.0, max_wait_s)
        self.metrics = metrics or Metrics()
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

    async def submit(self, prompt: str, responses: list[str]) -> Rows:
        """Queue one request; return its rows once its batch is scored."""
        if self._closing:
            raise Rejected(503, "server is shutting down")
        job = _Job(prompt, responses, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Stop accepting requests, finish every queued one, stop the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _next_batch(self) -> list[_Job]:
        """Wait for a first job, then gather more until full or `max_wait_s` passed; [] once closed and empty."""
        while not self._jobs:
            if self._closing:
                return []
            self._wake.clear()
            await self._wake.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        batch = [self._jobs.popleft()]
        n = len(batch[0].responses)
        while n < self.max_responses:
            if self._jobs:
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
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := await self._next_batch():
            prompts = [j.prompt for j in batch for _ in j.responses]
            responses = [r for j in batch for r in j.responses]
            try:
                rows = await loop.run_in_executor(self._executor, self.score_fn, prompts, responses)
            except Exception as e:  # any scoring failure fails this batch's requests, never the worker
                log.exception("scoring a batch of %d responses failed", len(responses))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.metrics.observe_batch(len(batch), len(responses))
            start = 0
            for j in batch:
                if not j.future.done():  # a client that went away cancelled its future
                    j.future.set_result(rows[start:start + len(j.responses)])
                start += len(j.responses)


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
        app.state.batcher = MicroBatcher(score_rows, cfg.max_batch_responses, cfg.max_wait_ms / 1000, metrics)
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
            rows = await request.app.state.batcher.submit(req.prompt, req.responses)
        except Rejected as e:
            return e.status, {"detail": e.detail}, e.headers
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
    uvicorn.run(create_app(scorer, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level, ws="none",
                timeout_graceful_shutdown=int(cfg.graceful_timeout_s))
