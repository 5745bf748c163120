"""An OpenAI-compatible completions server on the Megatron model, under TP/PP.

    nemo-minitron serve --model HF_DIR [--host 127.0.0.1] [--port 8000] [dtype=float32 ...]
        [served_model_name=NAME] [max_batch=32]
    torchrun --nproc-per-node 2 -m nemo_minitron.cli serve --model HF_DIR tp=2

    curl -s 127.0.0.1:8000/v1/models
    curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "The capital of France is",
                                              "max_tokens": 16, "temperature": 0}'
    -> {"id": "cmpl-...", "object": "text_completion", "created": ..., "model": ...,
        "choices": [{"index": 0, "text": ..., "logprobs": null, "finish_reason": "length",
                     "token_ids": [...]}], "usage": {"prompt_tokens": ..., ...}}
    >>> openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x").completions.create(...)

Endpoints: POST /v1/completions, GET /v1/models, GET /health. Request fields (OpenAI's legacy
completions): prompt (text, list of texts, token ids, or list of token-id lists; text is encoded
with BOS), model (must be the served name if given), max_tokens (16), temperature (1.0; 0 is
greedy), top_p (1.0), top_k (ours; 0: off), n (1), stream (server-sent events), stream_options
({"include_usage": bool}), logprobs (null, or 0..5 alternatives per token), stop (string or list),
seed (the server's), user (ignored). Anything else (echo, best_of, suffix, penalties, logit_bias)
is refused with 400: this engine does not implement it, and ignoring it would be silent. Errors
are OpenAI's object ``{"error": {"message", "type", "param", "code"}}``; finish_reason is "stop"
(end of text or a stop string) or "length". Choice ``j`` of prompt ``i`` has index ``i * n + j``.

Only rank 0 listens (127.0.0.1 unless --host says otherwise; standard library only). Its HTTP
threads parse and check each request completely -- JSON, fields, sampling knobs, prompt length --
and answer 4xx before the model sees it. Accepted requests go into a queue.

Batching (per-wave, not continuous): rank 0's main thread takes the first waiting request and
every other request waiting at that moment, up to ``max_batch`` completions, and decodes them as
one batch in one :func:`generate` call (each row with its own sampling parameters and, per
request, its own seeded generator, so a request gets the same tokens it would get alone). Requests
arriving during a wave wait for the next one: Megatron's KV cache keeps one sequence offset for
the whole batch, so rows cannot join a running decode loop. Prompts of a wave keep their true
positions (generate's scheme: no padding, no mask); the longer prompts of a wave are fed one
token per step after the shortest is pre-filled.

Multi-rank: rank 0 broadcasts each wave (prompts, per-row params, groups) to every rank
(``broadcast_object_list``) and all ranks run :func:`generate` together (TP/PP collectives). While
idle, rank 0 sends a heartbeat every ``HEARTBEAT_S`` so the other ranks' blocking broadcast never
reaches the process group timeout (30 min for gloo and NCCL by default). SIGINT/SIGTERM (or
:meth:`stop`) stops it: pending clients get 503, the other ranks get a stop message, every rank
returns. A wave that fails inside generation answers 500 to its requests and the server goes on;
the checks up front exist so that this never happens halfway through a collective.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.inference.generate import (Completion, GenerationError, generate,
                                              validate_request)
from nemo_minitron.inference.openai_format import (TOKENIZER_LOCK, TextStream, completion_body,
                                                   error_body, finish_reason, logprobs_object,
                                                   usage)
from nemo_minitron.inference.sampling import MAX_TOP_LOGPROBS, SamplingParams, is_seed
from nemo_minitron.inference.job import _with_model_source

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 128  # prompts x n of one request: more would not fit one decode wave anyway
HEARTBEAT_S = 60.0
FIELDS = ("prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
          "stream_options", "logprobs", "stop", "seed", "user")


@dataclass
class ServeJobConfig:
    model: str = ""  # HF checkpoint directory
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    host: str = "127.0.0.1"  # loopback by default: nothing outside this machine can connect
    port: int = 8000  # 0: any free port (printed)
    seed: int = 1234  # default sampling seed of a request
    request_timeout_s: float = 600.0  # a client waiting longer (queue + generation) gets 503
    served_model_name: str = ""  # the id in /v1/models and "model" (default: the model's folder)
    max_batch: int = 32  # completions (prompts x n, over requests) decoded together in one wave


class RequestError(MinitronError, ValueError):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class CompletionRequest:
    """A checked /v1/completions body: prompts as ids, and how to answer."""
    prompts: List[List[int]]
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    model: Optional[str] = None


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts(prompt, tokenizer) -> List[List[int]]:
    """OpenAI's four prompt forms: text, list of texts, token ids, list of token-id lists."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not all(texts):
            raise RequestError(400, "\"prompt\" has an empty string")
        if tokenizer is None:
            raise RequestError(400, "this server has no tokenizer: send prompt as token ids")
        with TOKENIZER_LOCK:
            return [tokenizer.encode(t) for t in texts]  # adds <|begin_of_text|> as HF does
    if _is_ids(prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        return [list(p) for p in prompt]
    raise RequestError(400, "\"prompt\" is required: a non-empty string, list of strings, list "
                            "of token ids or list of lists of token ids")


def parse_request(body: bytes, cfg, tokenizer, default_seed: int = 1234):
    """(:class:`CompletionRequest`, SamplingParams) of a /v1/completions body, or
    :class:`RequestError` (status 400, as OpenAI and vLLM answer every malformed request)."""
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown or unsupported field(s) {unknown}; known: "
                                f"{list(FIELDS)}")
    given = {k: v for k, v in req.items() if v is not None}
    prompts = _prompts(req.get("prompt"), tokenizer)
    if "seed" in given and not is_seed(given["seed"]):  # torch would fail on it mid-generation
        raise RequestError(400, f"seed={given['seed']!r} must be an integer in [0, 2**64)")
    if not isinstance(given.get("stop", ""), (str, list)):
        raise RequestError(400, f"stop={given['stop']!r} must be a string or a list of strings")
    logprobs = given.get("logprobs", None)
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise RequestError(400, f"logprobs={logprobs!r} must be an integer in "
                                f"[0, {MAX_TOP_LOGPROBS}] (the alternatives per token) or null")
    n = given.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, f"n={n!r} must be a positive integer")
    if len(prompts) * n > MAX_CHOICES:
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={n} is over {MAX_CHOICES} "
                                "completions per request")
    stream = given.get("stream", False)
    options = given.get("stream_options", {})
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream={stream!r} must be true or false")
    if not (isinstance(options, dict) and set(options) <= {"include_usage"}
            and isinstance(options.get("include_usage", False), bool)):
        raise RequestError(400, f"stream_options={options!r}: only {{\"include_usage\": bool}}")
    if options and not stream:
        raise RequestError(400, "stream_options is only allowed with stream=true")
    model = given.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"model={model!r} must be a string")
    try:
        params = SamplingParams(max_new_tokens=given.get("max_tokens", DEFAULT_MAX_TOKENS),
                                temperature=given.get("temperature", 1.0),
                                top_k=given.get("top_k", 0), top_p=given.get("top_p", 1.0),
                                seed=given.get("seed", default_seed), stop=given.get("stop", ()),
                                logprobs=logprobs is not None, top_logprobs=logprobs or 0)
        if isinstance(params.temperature, bool) or isinstance(params.top_p, bool):
            raise ConfigError("temperature and top_p must be numbers")
        validate_request(cfg, prompts, params, tokenizer)  # ids in range, prompt + max_tokens fit
    except (ConfigError, GenerationError, TypeError) as e:
        raise RequestError(400, str(e).replace("max_new_tokens", "max_tokens")) from None
    return CompletionRequest(prompts, n, stream, bool(options.get("include_usage")),
                             model), params


class _Work:
    """One accepted request, from an HTTP thread to the generation loop and back. Its choices
    are rows ``prompt_index * n + j`` of the wave it is decoded in (OpenAI's choice order)."""

    def __init__(self, req: CompletionRequest, params: SamplingParams):
        self.req, self.params = req, params
        self.prompts = [p for p in req.prompts for _ in range(req.n)]  # one per choice
        self.done = threading.Event()
        self.result: Optional[List[Completion]] = None
        self.error: Optional[str] = None
        # streaming: lists of StepEvent (row = choice index), then None once done
        self.events: Optional["queue.Queue"] = queue.Queue() if req.stream else None

    def finish(self, result=None, error=None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.events is not None:
            self.events.put(None)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog: socketserver's 5 resets a burst of 32 clients
    daemon_threads = True  # a stuck client never blocks the exit


class CompletionServer:
    """Every rank of the model-parallel group builds one and calls :meth:`serve_forever`; rank 0
    (``listen=True``) binds ``host:port`` at construction (port 0: a free one, see ``address``)."""

    def __init__(self, runner, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                 listen: bool = True, default_seed: int = 1234, request_timeout_s: float = 600.0,
                 log=None, model_name: str = "nemo-minitron", max_batch: int = 32):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch={max_batch!r} must be a positive integer")
        self.runner, self.tokenizer = runner, tokenizer  # runner: may be set after the bind
        self.default_seed, self.request_timeout_s = default_seed, request_timeout_s
        self.model_name, self.max_batch, self.log = model_name, max_batch, log
        self.created = int(time.time())
        # requests per decode wave, the latest ones (rank 0; what tests check batching with)
        self.waves: "collections.deque[int]" = collections.deque(maxlen=1000)
        self._queue: "queue.Queue[_Work]" = queue.Queue()
        self._carry: Optional[_Work] = None  # taken from the queue, did not fit the last wave
        self._stopping = threading.Event()
        self._httpd = None
        if listen:
            self._httpd = _HTTPServer((host, port), _handler_class(self))

    @property
    def multi_rank(self) -> bool:
        """Whether requests go to other ranks (asked late: rank 0 binds before the group exists)."""
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def address(self):
        return self._httpd.server_address[:2]

    def stop(self) -> None:
        """Ask the server to stop (thread-safe; also what SIGINT/SIGTERM do)."""
        self._stopping.set()

    # ---- the HTTP side (rank 0, one thread per connection) -----------------------------------
    def submit(self, req: CompletionRequest, params: SamplingParams) -> _Work:
        work = _Work(req, params)
        if self._stopping.is_set():
            work.finish(error="server is shutting down")
        else:
            self._queue.put(work)
        return work

    # ---- the generation loop (every rank) ----------------------------------------------------
    def _broadcast(self, message):
        if self.multi_rank:
            import torch.distributed as dist

            box = [message]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return message

    def _next_wave(self, first: _Work) -> List[_Work]:
        """``first`` and whatever else waits now, up to ``max_batch`` completions (a request
        bigger than that runs alone; one that does not fit waits for the next wave)."""
        wave, rows = [first], len(first.prompts)
        while rows < self.max_batch:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if rows + len(work.prompts) > self.max_batch:
                self._carry = work
                break
            wave.append(work)
            rows += len(work.prompts)
        return wave

    @staticmethod
    def _rows(wave: List[_Work]):
        """(prompts, per-row params, per-row sampling group) of a wave: one group per request,
        so each request samples as it would alone."""
        prompts, params, groups = [], [], []
        for g, work in enumerate(wave):
            prompts += work.prompts
            params += [work.params] * len(work.prompts)
            groups += [g] * len(work.prompts)
        return prompts, params, groups

    def _run(self, prompts, params, groups, on_step=None):
        return generate(self.runner, prompts, params, tokenizer=self.tokenizer, groups=groups,
                        on_step=on_step)

    def _run_wave(self, wave: List[_Work]) -> None:
        prompts, params, groups = self._rows(wave)
        self.waves.append(len(wave))
        self._broadcast(("generate", prompts, params, groups))
        owner = []  # row -> (work, choice index)
        for work in wave:
            owner += [(work, j) for j in range(len(work.prompts))]

        def on_step(events):
            by_work = {}
            for ev in events:
                work, j = owner[ev.row]
                if work.events is not None:
                    by_work.setdefault(id(work), (work, []))[1].append(ev._replace(row=j))
            for work, evs in by_work.values():
                work.events.put(evs)

        try:
            out = self._run(prompts, params, groups, on_step)
        except Exception as e:  # noqa: BLE001 - one bad wave must not stop the server
            for work in wave:
                work.finish(error=f"generation failed: {type(e).__name__}: {e}")
            return
        start = 0
        for work in wave:
            work.finish(result=out[start:start + len(work.prompts)])
            start += len(work.prompts)

    def serve_forever(self) -> None:
        if self._httpd is None:
            return self._follow()
        http = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                name="http", daemon=True)
        http.start()
        idle = 0.0
        try:
            while not self._stopping.is_set():
                work, self._carry = self._carry, None
                if work is None:
                    try:
                        work = self._queue.get(timeout=0.1)
                    except queue.Empty:
                        idle += 0.1
                        if idle >= HEARTBEAT_S:  # keep the other ranks' broadcast from timing out
                            self._broadcast(("idle",))
                            idle = 0.0
                        continue
                idle = 0.0
                self._run_wave(self._next_wave(work))
        finally:
            self._stopping.set()
            self._broadcast(("stop",))
            self._httpd.shutdown()  # waits for serve_forever's loop (poll_interval)
            self._httpd.server_close()
            pending = [self._carry] if self._carry is not None else []
            while True:  # whoever is still queued: 503
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for work in pending:
                work.finish(error="server is shutting down")

    def _follow(self) -> None:
        """Ranks other than 0: run every wave rank 0 broadcasts, until it says stop."""
        while True:
            message = self._broadcast(None)
            if message[0] == "stop":
                return
            if message[0] == "generate":
                try:
                    self._run(*message[1:])
                except Exception:  # noqa: BLE001 - rank 0 failed the same way and answered 500
                    pass


def _handler_class(server: CompletionServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "nemo-minitron"
        timeout = 30  # seconds a client may take to send its request

        def log_message(self, fmt, *args):
            if server.log:
                server.log(f"{self.address_string()} {fmt % args}")

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, code: Optional[str] = None) -> None:
            self._reply(status, error_body(status, message, code))

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(200, {"status": "ok", "queued": server._queue.qsize()})
            elif self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "created": server.created,
                     "owned_by": "nemo-minitron"}]})
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path != "/v1/completions":
                return self._error(404, f"no such endpoint: POST {self.path}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._error(411, "Content-Length is required")
            if length < 0:
                return self._error(400, "negative Content-Length")
            if length > MAX_BODY_BYTES:
                return self._error(413, f"body over {MAX_BODY_BYTES} bytes")
            try:
                req, params = parse_request(self.rfile.read(length), server.runner.cfg,
                                            server.tokenizer, server.default_seed)
            except RequestError as e:
                return self._error(e.status, str(e), e.code)
            if req.model is not None and req.model != server.model_name:
                return self._error(404, f"model {req.model!r} is not served here; GET /v1/models "
                                        f"lists {server.model_name!r}", "model_not_found")
            work = server.submit(req, params)
            cid = f"cmpl-{uuid.uuid4().hex}"
            if req.stream:
                return self._stream(work, cid)
            if not work.done.wait(server.request_timeout_s):
                return self._error(503, "timed out waiting for the model")
            if work.result is None:
                status = 503 if "shutting down" in (work.error or "") else 500
                return self._error(status, work.error)
            self._reply(200, completion_body(server, work, cid))

        def _stream(self, work: _Work, cid: str) -> None:
            """Server-sent events: one chunk per generated token of a choice, then (with
            include_usage) a chunk with usage and no choices, then ``data: [DONE]``."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes

            def send(payload) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()

            head = {"id": cid, "object": "text_completion", "created": int(time.time()),
                    "model": server.model_name}
            texts = [TextStream(server.tokenizer, work.params.stop) for _ in work.prompts]
            offsets = [0] * len(work.prompts)
            while True:
                try:
                    events = work.events.get(timeout=server.request_timeout_s)
                except queue.Empty:
                    work.error = "timed out waiting for the model"
                    break
                if events is None:
                    break
                for ev in events:
                    text = texts[ev.row].delta(ev.token, ev.finish_reason is not None)
                    lp = None
                    if work.params.logprobs:
                        lp = logprobs_object(server.tokenizer, [ev.token], [ev.logprob],
                                       None if ev.top is None else [ev.top], offsets[ev.row])
                        offsets[ev.row] += len(lp["tokens"][0])
                    send(dict(head, choices=[{"index": ev.row, "text": text, "logprobs": lp,
                                              "finish_reason": finish_reason(ev.finish_reason),
                                              "token_ids": [ev.token]}]))
            if work.error is not None:  # the status line is gone: the error goes in the stream
                send(error_body(500, work.error))
            elif work.req.include_usage:
                send(dict(head, choices=[], usage=usage(work)))
            send("[DONE]")

    return Handler


def _model_name(job: ServeJobConfig) -> str:
    return job.served_model_name or os.path.basename(os.path.normpath(job.model)) or "model"


def _bind(job: ServeJobConfig) -> CompletionServer:
    """Rank 0's server, listening on ``job.host:job.port`` (model and tokenizer come later)."""
    import errno

    try:
        return CompletionServer(None, None, job.host, job.port, listen=True,
                                default_seed=job.seed, request_timeout_s=job.request_timeout_s,
                                log=(lambda m: print(m, file=sys.stderr, flush=True)),
                                model_name=_model_name(job), max_batch=job.max_batch)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {job.port} on {job.host} is in use: stop what holds it, or "
                              "pass --port with another port (0: any free one)") from None
        raise ConfigError(f"cannot listen on {job.host}:{job.port}: {e.strerror or e}") from None


def run_serve(job: ServeJobConfig) -> None:
    """The serve job: checks, rank 0 binds its port, setup on every rank (a .nemo model is
    read natively), serve until SIGINT/SIGTERM, cleanup."""
    from nemo_minitron.dist import is_rank0

    if isinstance(job.port, bool) or not 0 <= job.port < 65536:
        raise ConfigError(f"port={job.port} must be in [0, 65535]")
    if not is_seed(job.seed):
        raise ConfigError(f"seed={job.seed!r} must be an integer in [0, 2**64)")
    if isinstance(job.max_batch, bool) or not isinstance(job.max_batch, int) or job.max_batch < 1:
        raise ConfigError(f"max_batch={job.max_batch!r} must be a positive integer")
    # rank 0 binds before any model is read: a port in use fails in a second, as one line
    server = _bind(job) if is_rank0() else None
    try:
        _serve(job, server)
    finally:
        if server is not None:
            server._httpd.server_close()  # already closed after serving; a no-op then


@_with_model_source
def _serve(job: ServeJobConfig, server: Optional[CompletionServer], *, source) -> None:
    import signal

    from nemo_minitron.inference.job import _dtype, _model_config, cleanup, setup
    from nemo_minitron.tokenizer import load_tokenizer

    _model_config(source, job.tp, job.pp)
    _dtype(job.dtype)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    runner = setup(source, job.tp, job.pp, job.dtype, job.seed)
    try:
        rank0 = server is not None
        if rank0:
            server.runner, server.tokenizer = runner, tokenizer
        else:
            server = CompletionServer(runner, tokenizer, listen=False, default_seed=job.seed,
                                      request_timeout_s=job.request_timeout_s,
                                      model_name=_model_name(job), max_batch=job.max_batch)
        if rank0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: server.stop())
            host, port = server.address
            print(f"serving on http://{host}:{port} (POST /v1/completions, GET /v1/models, "
                  f"GET /health) as model {server.model_name!r}", flush=True)
        server.serve_forever()
    finally:
        cleanup()
