"""A small HTTP completions server on the Megatron model, under TP/PP.

    nemo-minitron serve --model HF_DIR [--host 127.0.0.1] [--port 8000] [dtype=float32 ...]
    torchrun --nproc-per-node 2 -m nemo_minitron.cli serve --model HF_DIR tp=2

    curl -s 127.0.0.1:8000/health
    curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "The capital of France is",
                                              "max_tokens": 16, "temperature": 0}'
    -> {"text": ..., "tokens": [...], "logprobs": null, "finish_reason": "length", ...}

Only rank 0 listens (127.0.0.1 unless --host says otherwise; standard library only). Its HTTP
threads parse and check each request completely -- JSON, fields, sampling knobs, prompt length --
and answer 4xx with ``{"error": message}`` before the model sees it. Accepted requests go into a
queue that rank 0's main thread drains one at a time: it broadcasts each request to every rank
(``broadcast_object_list``), and all ranks run :func:`generate` together (TP/PP collectives), so
concurrent clients are served in turn and each gets its own answer. While idle, rank 0 sends a
heartbeat every ``HEARTBEAT_S`` so the other ranks' blocking broadcast never reaches the process
group timeout (30 min for gloo and NCCL by default). SIGINT/SIGTERM (or :meth:`stop`) stops it:
pending clients get 503, the other ranks get a stop message, every rank returns. A request that
fails inside generation answers 500 and the server goes on; the checks up front exist so that this
never happens halfway through a collective (which would leave the ranks out of step).

Request fields: prompt (text, or a list of token ids; text is encoded with BOS), max_tokens (16),
temperature (1.0; 0 is greedy), top_k (0: off), top_p (1.0), seed (the server's), stop (string or
list), logprobs (false), and OpenAI's "model" (ignored). Unknown fields are an error.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.inference.generate import GenerationError, generate, validate_request
from nemo_minitron.inference.sampling import SamplingParams, is_seed
from nemo_minitron.inference.job import _with_hf_model

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 1 << 20
HEARTBEAT_S = 60.0
FIELDS = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "logprobs",
          "model")


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


class RequestError(MinitronError, ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_ENCODE_LOCK = threading.Lock()  # HF fast tokenizers can raise "Already borrowed" across threads


def parse_request(body: bytes, cfg, tokenizer, default_seed: int = 1234):
    """(prompt ids, SamplingParams) of a /v1/completions body, or :class:`RequestError` with a
    4xx status: 400 for what is not a well-formed request, 422 for values out of range."""
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; known: {list(FIELDS)}")
    prompt = req.get("prompt")
    if isinstance(prompt, str) and prompt:
        if tokenizer is None:
            raise RequestError(422, "this server has no tokenizer: send prompt as token ids")
        with _ENCODE_LOCK:
            ids = tokenizer.encode(prompt)  # adds <|begin_of_text|> as HF does
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise RequestError(400, "\"prompt\" is required: a non-empty string or list of token ids")
    given = {k: v for k, v in req.items() if v is not None}
    if "seed" in given and not is_seed(given["seed"]):  # torch would fail on it mid-generation
        raise RequestError(400, f"seed={given['seed']!r} must be an integer in [0, 2**64)")
    if not isinstance(given.get("stop", ""), (str, list)):
        raise RequestError(422, f"stop={given['stop']!r} must be a string or a list of strings")
    logprobs = given.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise RequestError(422, f"logprobs={logprobs!r} must be true or false")
    try:
        params = SamplingParams(max_new_tokens=given.get("max_tokens", DEFAULT_MAX_TOKENS),
                                temperature=given.get("temperature", 1.0),
                                top_k=given.get("top_k", 0), top_p=given.get("top_p", 1.0),
                                seed=given.get("seed", default_seed), stop=given.get("stop", ()),
                                logprobs=logprobs)
        if isinstance(params.temperature, bool) or isinstance(params.top_p, bool):
            raise ConfigError("temperature and top_p must be numbers")
        validate_request(cfg, [ids], params, tokenizer)  # ids in range, prompt + max_tokens fit
    except (ConfigError, GenerationError, TypeError) as e:
        raise RequestError(422, str(e).replace("max_new_tokens", "max_tokens")) from None
    return ids, params


class _Work:
    """One accepted request, from an HTTP thread to the generation loop and back."""

    def __init__(self, ids: List[int], params: SamplingParams):
        self.ids, self.params = ids, params
        self.done = threading.Event()
        self.result: Optional[dict] = None
        self.error: Optional[str] = None


class CompletionServer:
    """Every rank of the model-parallel group builds one and calls :meth:`serve_forever`; rank 0
    (``listen=True``) binds ``host:port`` at construction (port 0: a free one, see ``address``)."""

    def __init__(self, runner, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                 listen: bool = True, default_seed: int = 1234, request_timeout_s: float = 600.0,
                 log=None):
        self.runner, self.tokenizer = runner, tokenizer  # runner: may be set after the bind
        self.default_seed, self.request_timeout_s = default_seed, request_timeout_s
        self.log = log
        self._queue: "queue.Queue[_Work]" = queue.Queue()
        self._stopping = threading.Event()
        self._httpd = None
        if listen:
            self._httpd = ThreadingHTTPServer((host, port), _handler_class(self))
            self._httpd.daemon_threads = True  # a stuck client never blocks the exit

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
    def submit(self, ids: List[int], params: SamplingParams) -> _Work:
        work = _Work(ids, params)
        if self._stopping.is_set():
            work.error = "server is shutting down"
            work.done.set()
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

    def _run(self, ids, params) -> dict:
        c = generate(self.runner, [ids], params, tokenizer=self.tokenizer)[0]
        return {"text": c.text, "tokens": c.tokens, "logprobs": c.logprobs,
                "finish_reason": c.finish_reason, "prompt_tokens": len(ids)}

    def serve_forever(self) -> None:
        if self._httpd is None:
            return self._follow()
        http = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                name="http", daemon=True)
        http.start()
        idle = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    work = self._queue.get(timeout=0.1)
                except queue.Empty:
                    idle += 0.1
                    if idle >= HEARTBEAT_S:  # keep the other ranks' broadcast from timing out
                        self._broadcast(("idle",))
                        idle = 0.0
                    continue
                idle = 0.0
                self._broadcast(("generate", work.ids, work.params))
                try:
                    work.result = self._run(work.ids, work.params)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                    work.error = f"generation failed: {type(e).__name__}: {e}"
                work.done.set()
        finally:
            self._stopping.set()
            self._broadcast(("stop",))
            self._httpd.shutdown()  # waits for serve_forever's loop (poll_interval)
            self._httpd.server_close()
            while True:  # whoever is still queued: 503
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                work.error = "server is shutting down"
                work.done.set()

    def _follow(self) -> None:
        """Ranks other than 0: run every request rank 0 broadcasts, until it says stop."""
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

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(200, {"status": "ok", "queued": server._queue.qsize()})
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path != "/v1/completions":
                return self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._reply(411, {"error": "Content-Length is required"})
            if length < 0:
                return self._reply(400, {"error": "negative Content-Length"})
            if length > MAX_BODY_BYTES:
                return self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            try:
                ids, params = parse_request(self.rfile.read(length), server.runner.cfg,
                                            server.tokenizer, server.default_seed)
            except RequestError as e:
                return self._reply(e.status, {"error": str(e)})
            work = server.submit(ids, params)
            if not work.done.wait(server.request_timeout_s):
                return self._reply(503, {"error": "timed out waiting for the model"})
            if work.result is None:
                status = 503 if "shutting down" in (work.error or "") else 500
                return self._reply(status, {"error": work.error})
            self._reply(200, work.result)

    return Handler


def _bind(job: ServeJobConfig) -> CompletionServer:
    """Rank 0's server, listening on ``job.host:job.port`` (model and tokenizer come later)."""
    import errno

    try:
        return CompletionServer(None, None, job.host, job.port, listen=True,
                                default_seed=job.seed, request_timeout_s=job.request_timeout_s,
                                log=(lambda m: print(m, file=sys.stderr, flush=True)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {job.port} on {job.host} is in use: stop what holds it, or "
                              "pass --port with another port (0: any free one)") from None
        raise ConfigError(f"cannot listen on {job.host}:{job.port}: {e.strerror or e}") from None


def run_serve(job: ServeJobConfig) -> None:
    """The serve job: checks, rank 0 binds its port, setup on every rank (a .nemo model is
    converted first), serve until SIGINT/SIGTERM, cleanup."""
    from nemo_minitron.dist import is_rank0

    if isinstance(job.port, bool) or not 0 <= job.port < 65536:
        raise ConfigError(f"port={job.port} must be in [0, 65535]")
    if not is_seed(job.seed):
        raise ConfigError(f"seed={job.seed!r} must be an integer in [0, 2**64)")
    # rank 0 binds before any model is read: a port in use fails in a second, as one line
    server = _bind(job) if is_rank0() else None
    try:
        _serve(job, server)
    finally:
        if server is not None:
            server._httpd.server_close()  # already closed after serving; a no-op then


@_with_hf_model
def _serve(job: ServeJobConfig, server: Optional[CompletionServer]) -> None:
    import signal

    from nemo_minitron.inference.job import _dtype, _model_config, cleanup, setup
    from nemo_minitron.tokenizer import load_tokenizer

    _model_config(job.model, job.tp, job.pp)
    _dtype(job.dtype)
    tokenizer = load_tokenizer(job.model)
    runner = setup(job.model, job.tp, job.pp, job.dtype, job.seed)
    try:
        rank0 = server is not None
        if rank0:
            server.runner, server.tokenizer = runner, tokenizer
        else:
            server = CompletionServer(runner, tokenizer, listen=False, default_seed=job.seed,
                                      request_timeout_s=job.request_timeout_s)
        if rank0:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: server.stop())
            host, port = server.address
            print(f"serving on http://{host}:{port} (POST /v1/completions, GET /health)",
                  flush=True)
        server.serve_forever()
    finally:
        cleanup()
