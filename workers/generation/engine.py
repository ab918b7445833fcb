"""The generation engine: one model thread driving mlx-lm's `BatchGenerator` (continuous batching over a
`BatchKVCache`), fed by requests from any thread, with live LoRA adapter versions.

Adapter versions and token attribution. `BatchGenerator` pipelines decoding: the tokens a `next()` call returns were
computed by the graph launched during the *previous* call, with the parameters the model held then (MLX arrays are
immutable, so swapping the LoRA arrays never changes a graph already built). The engine installs a new adapter only
between `next()` calls (under the model lock: the model thread holds it while it works, and an installer that finds
it free swaps at once), all tensors at once, and labels every token with the version that was live when its step
was launched. So each decode step is computed by exactly one version, and every token after the switch reports it.

The `n` completions of one prompt share its prefill: the prompt (all but its last token) is run once into a KV cache
that the `n` sequences then start from.

Failures. One request's failure fails that request alone and the batch goes on: its sampler refusing its parameters
(a 400: the HTTP layer checks them first, this is the backstop), or anything else raised while it is prepared,
prefilled or its tokens are booked, detokenized and delivered (a 500). Only a failure of the batched step itself
(`BatchGenerator.next()`), which no single request can be blamed for, ends the engine thread: then every request
fails (503), `failed` turns true and the worker exits to be restarted. `failed` also turns true when the engine has
had work and finished no step for `stall_timeout` seconds (a hung step), so a worker stuck there is restarted too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler
from mlx_lm.tuner.lora import LoRALinear

from runner import wire
from workers.lora import check_lora, lora_layout, lora_owners

log = logging.getLogger(__name__)


# mlx-lm grows KV caches 256 positions at a time, for every sequence of a batch: a 40-token prompt with 32 new tokens
# holds 296 positions, 4x what it uses (SmolLM2 at batch 32: ~440 MB of float32 keys and values instead of ~110).
# Growing by KV_STEP bounds a batch's cache to max_batch x (longest sequence + KV_STEP) positions; the price is one
# copy of the cache every KV_STEP tokens, small next to a decode step.
KV_STEP = 32


class Overloaded(Exception):
    """The admission queue is full; the caller should retry later."""


class EngineStopped(RuntimeError):
    """The model thread is not running (stopped, or died on an MLX failure): nothing will be generated."""


class ParamsRefused(ValueError):
    """A request's sampling parameters were refused while its samplers were made: the caller's mistake (400)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0  # how many alternatives to report per token (0 = only the sampled token's logprob)


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    # log-prob of each sampled token under the distribution it was sampled from (temperature, top_p nucleus)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # adapter version that produced each token
    finish_reason: str | None = None
    text: str = ""  # filled by the HTTP side once finished (completion_text), not on the model thread


@dataclass
class Request:
    """One submitted prompt with its `n` completions. Events for the HTTP side arrive on `events` (an asyncio queue
    fed thread-safely by the engine): ('token', index, token_id) when streaming, ('done', index) for each completion,
    ('error', message, http_status) if the engine fails it."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    loop: asyncio.AbstractEventLoop | None
    events: asyncio.Queue | None = None  # made here when there is a loop
    completions: list[Completion] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    cancelled: bool = False
    released: bool = False  # no longer counted against the admission limit
    created: float = field(default_factory=time.time)
    # Called on the engine thread with each event instead of the asyncio queue (the HTTP front in another process)
    sink: Callable[[Request, tuple], None] | None = None

    def __post_init__(self) -> None:
        if not self.completions:
            self.completions = [Completion(index=i) for i in range(self.n)]
        if self.events is None and self.loop is not None:
            self.events = asyncio.Queue()

    def emit(self, *event) -> None:
        if self.sink is not None:
            self.sink(self, event)
        elif self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop closed since the check (the server shut down): nobody is listening
                pass

    @property
    def policy_version(self) -> int:
        """The oldest adapter version among this request's tokens: the staleness that matters to the learner."""
        versions = [v for c in self.completions for v in c.versions]
        return min(versions) if versions else -1


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_rejected: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    decode_steps_total: int = 0
    decode_seconds_total: float = 0.0
    active_sequences: int = 0
    queued_requests: int = 0
    adapter_version: int = 0
    adapter_switches_total: int = 0


class Engine:
    """Owns the model; every MLX call on it happens on the engine's own thread."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        prefill_batch: int = 8,
        max_queue: int = 256,
        context_length: int = 2048,
        adapter_version: int = 0,
        admit_wait_steps: int = 4,
        stall_timeout: float = 0.0,
    ):
        self.model = model
        self.model_dir: Path | None = None  # the model's directory, when loaded from one (load_engine)
        _fuse_lora(model)
        KVCache.step = BatchKVCache.step = KV_STEP  # process-wide: this engine owns the worker's KV caches
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch
        self.admit_wait_steps = admit_wait_steps
        self.max_queue = max_queue
        self.context_length = context_length
        self.stall_timeout = stall_timeout  # seconds with work and no finished step before `failed`; 0 = never
        self.stats = EngineStats(adapter_version=adapter_version)
        self.lora_layout = lora_layout(model)  # what an installed adapter must match (empty without LoRA)
        self._lora_owners = lora_owners(model)
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.vocab_size = _vocab_size(model, tokenizer)
        self._generator = BatchGenerator(
            model,
            completion_batch_size=max_batch,
            prefill_batch_size=prefill_batch,
            stop_tokens=[[t] for t in self.eos_ids],
        )
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._pending_adapter: tuple[int, dict, threading.Event] | None = None
        self._adapter_lock = threading.RLock()
        # Held by the model thread while it uses the model; whoever holds it may swap the adapter. An installer that
        # finds it free (an idle engine) swaps at once instead of waking the model thread.
        self._model_lock = threading.Lock()
        self._by_uid: dict[int, tuple[Request, int]] = {}
        self._waiting: deque[tuple[Request, int]] = deque()  # (request, step it arrived at), not yet admitted
        self._steps = 0  # next() calls so far, the clock of admission waits and the progress heartbeats report
        self._progress_at = time.perf_counter()  # when the last step ended, or work arrived at an idle engine
        self._step_began: float | None = None  # perf_counter at the start of the step running now
        self._detok: dict[int, object] = {}
        self._samplers: dict[tuple, Callable] = {}
        self._launched_version = adapter_version  # version live when the in-flight step was launched
        self._outstanding = 0  # requests accepted and not yet finished (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Called after a switch, under the model lock (so never by two threads at once): on the model thread, or on
        # the installing thread when the engine was idle.
        self.on_version: Callable[[int], None] | None = None
        self.on_step: Callable[[float, int], None] | None = None
        # Called on the model thread after each turn of its loop (a step, admissions, an idle wake-up): where events
        # gathered by request sinks are sent on, one message per turn.
        self.on_iteration: Callable[[], None] | None = None

    # ----- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the model thread (safe to call twice, or on an engine that was never started)."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def version(self) -> int:
        return self.stats.adapter_version

    @property
    def steps(self) -> int:
        """Batch steps finished so far: the engine's progress."""
        return self._steps

    def stalled_seconds(self) -> float:
        """How long the engine has had work without finishing a step (0 while it has none)."""
        return time.perf_counter() - self._progress_at if self._outstanding else 0.0

    @property
    def failure(self) -> str | None:
        """Why this engine will generate nothing more (None while it works): its model thread died (an exception,
        not a stop), or it has had work and finished no step for `stall_timeout` seconds. The worker then reports
        itself failed, to be restarted."""
        if self._thread.ident is None or self._stop.is_set():
            return None
        if not self._thread.is_alive():
            return "the engine thread died"
        stalled = self.stalled_seconds()
        if self.stall_timeout and stalled > self.stall_timeout:
            return f"the engine has made no progress for {stalled:.0f}s with requests waiting"
        return None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def warm_up(self, max_tokens: int = 4) -> float:
        """Generate a few tokens for a batch of made-up prompts before serving, and return the seconds it took: a
        GPU compiles each kernel at its first use (tens of seconds on CUDA), which would otherwise land on the first
        requests with nothing to say why. The engine's counters are left as they were."""
        stats = dataclasses.replace(self.stats)
        prompt = [int(self.eos_ids[0]) if self.eos_ids else 0] * 16
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
        n = max(1, min(self.prefill_batch, self.max_batch))

        async def generate() -> None:
            req = self.submit(prompt, params, n=n, loop=asyncio.get_running_loop())
            for _ in range(n):
                event = await req.events.get()
                if event[0] == "error":
                    raise EngineStopped(f"the engine failed while warming up: {event[1]}")

        tic = time.perf_counter()
        asyncio.run(generate())
        self.stats = dataclasses.replace(stats, adapter_version=self.stats.adapter_version)
        seconds = time.perf_counter() - tic
        log.info("warmed up the engine in %.1fs (kernels compile at their first use)", seconds)
        return seconds

    # ----- submission (any thread) -----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        stream: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        sink: Callable[[Request, tuple], None] | None = None,
    ) -> Request:
        """Queue a prompt for `n` completions; raises Overloaded past the admission limit, ValueError for a prompt
        the model cannot take."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; expected at least one token")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} exceeds the model's context "
                f"length {self.context_length}"
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if self._stop.is_set() or (self._thread.ident is not None and not self._thread.is_alive()):
            raise EngineStopped("the generation engine is not running")
        with self._count_lock:
            if self._outstanding >= self.max_queue:
                self.stats.requests_rejected += 1
                raise Overloaded(f"the server is at its limit of {self.max_queue} outstanding requests")
            if not self._outstanding:  # work for an idle engine: the stall clock starts now
                self._progress_at = time.perf_counter()
            self._outstanding += 1
        req = Request(prompt_ids=list(prompt_ids), params=params, n=n, stream=stream, loop=loop, sink=sink)
        self.stats.requests_total += 1
        self._inbox.put(("submit", req))
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Free the slots of a request whose client went away."""
        if not req.cancelled:
            req.cancelled = True
            self._inbox.put(("cancel", req))
            self._wake.set()

    @property
    def newest_version(self) -> int:
        """The newest adapter version installed: live, or pending until the next decode step."""
        with self._adapter_lock:
            return self._pending_adapter[0] if self._pending_adapter else self.stats.adapter_version

    def install_adapter(self, version: int, tensors: dict[str, mx.array]) -> threading.Event:
        """Validate a complete adapter and schedule it as `version`, applied between decode steps. Returns an event
        set once it is live. Raises ValueError (changing nothing) for a stale version or a mismatched tensor set."""
        with self._adapter_lock:
            newest = self.newest_version
            if version <= newest:
                raise ValueError(f"adapter version {version} is not newer than {newest}")
            check_lora(self.lora_layout, tensors)
            mx.eval(list(tensors.values()))  # materialise here, so the model thread only swaps references
            applied = threading.Event()
            if self._pending_adapter:  # superseded before it went live: release its waiter too
                self._pending_adapter[2].set()
            self._pending_adapter = (version, tensors, applied)
        if self._model_lock.acquire(blocking=False):  # idle (or between two steps): swap here, no hand-off
            try:
                self._apply_pending_adapter()
            finally:
                self._model_lock.release()
        else:
            self._wake.set()
        return applied

    def install_message(self, message: wire.WeightMessage) -> threading.Event:
        """`install_adapter` for a decoded weight message: its tensors are copied into MLX and the checksum is checked
        on that copy, so what goes live is exactly what was verified even if the source (a shared-memory slot) is
        rewritten meanwhile. Raises WireError or ValueError, changing nothing."""
        return self.install_adapter(message.version, verified_copy(message))

    # ----- the model thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        # Test hook: the first engine to find this file (and delete it) makes an invalid MLX call on its model thread,
        # a real MLX failure, to show what a dead engine thread leads to; a file saying "hang" makes it hang instead
        # in its next step with requests in the batch, holding the model as a hung step would (until stopped).
        fault = os.environ.get("RUNNER_TEST_ENGINE_FAULT")
        try:
            while not self._stop.is_set():
                if fault and (mode := _injected_fault(fault, busy=bool(self._by_uid))):
                    if mode == "hang":
                        with self._model_lock:
                            self._stop.wait()
                        continue
                    mx.eval(mx.zeros((2, 3)) @ mx.zeros((2, 3)))  # raises: the shapes do not multiply
                with self._model_lock:
                    self._apply_pending_adapter()
                    self._drain_inbox()
                    self._admit()
                    idle = not self._by_uid
                    if not idle:
                        self._step()
                if self.on_iteration is not None:
                    self.on_iteration()
                if idle:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except Exception as e:  # a bug or an MLX failure: fail every request loudly rather than hang them
            log.exception("engine thread failed")
            self._fail_all(f"generation failed: {e}")
            if self.on_iteration is not None:
                self.on_iteration()
            raise
        finally:
            # MLX keeps streams and the mx.compile cache per thread; their thread-exit destructors touch Python
            # objects, which aborts the process if they run while the interpreter finalizes (a stop() right before
            # exit). Releasing them here, while this thread still holds a Python thread state, avoids that.
            mx.clear_streams()

    def _fail_all(self, message: str) -> None:
        """Tell every running and queued request that it will not be answered."""
        failed = {id(req): req for req, _ in [*self._by_uid.values(), *self._waiting]}
        while True:
            try:
                kind, req = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                failed[id(req)] = req
        for req in failed.values():
            req.emit("error", message, 503)

    def _apply_pending_adapter(self) -> None:
        with self._adapter_lock:  # held through the swap, so `newest_version` never goes back
            pending, self._pending_adapter = self._pending_adapter, None
            if not pending:
                return
            version, tensors, applied = pending
            for name, tensor in tensors.items():  # validated in install_adapter
                module, attribute = self._lora_owners[name]
                module[attribute] = tensor
            self.stats.adapter_version = version
            self.stats.adapter_switches_total += 1
        if self.on_version:
            self.on_version(version)
        applied.set()
        log.info("adapter version %d is live", version)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit" and req.cancelled:
                self._release(req)
            elif kind == "submit":
                self._waiting.append((req, self._steps))
            elif kind == "cancel":
                try:
                    self._remove(req)
                except Exception as e:
                    self._fail(req, e)

    def _admit(self) -> None:
        """Move waiting requests into the batch, coalescing arrivals. Every admission costs BatchGenerator about
        two forward passes that stall the whole running batch (prefill, with a synchronous eval, then the first
        token, plus a KV-cache concatenation), nearly independent of how many prompts it carries, and closed-loop
        clients arrive one at a time. So while the batch is busy a request waits until a full prefill batch can be
        admitted, or at most `admit_wait_steps` decode steps (and for a free slot); an idle engine admits at once."""
        if not self._waiting:
            return
        free = self.max_batch - len(self._by_uid)
        if self._by_uid:
            ready = min(sum(req.n for req, _ in self._waiting), free)
            waited = self._steps - self._waiting[0][1]
            if free <= 0 or (ready < min(self.prefill_batch, self.max_batch) and waited < self.admit_wait_steps):
                return
        while self._waiting and (free > 0 or not self._by_uid):
            req, _ = self._waiting.popleft()
            try:
                self._insert(req)
            except Exception as e:
                self._fail(req, e)
                continue
            free -= req.n

    def _sampler(self, params: SamplingParams, index: int) -> Callable:
        if params.seed is not None:
            return _seeded_sampler(params.temperature, params.top_p, params.seed + index)
        key = (params.temperature, params.top_p)
        if key not in self._samplers:  # shared objects let BatchGenerator sample the whole batch in one call
            self._samplers[key] = make_sampler(temp=params.temperature, top_p=params.top_p)
        return self._samplers[key]

    def _insert(self, req: Request) -> None:
        prompt, n = req.prompt_ids, req.n
        try:
            samplers = [self._sampler(req.params, i) for i in range(n)]
        except (TypeError, ValueError, OverflowError) as e:  # e.g. mx.random.key refusing a seed
            raise ParamsRefused(f"the sampling parameters were refused: {e}") from e
        stops = [StopSequences([[t] for t in self.eos_ids])] * n
        if n > 1 and len(prompt) > 1:
            # Shared prefill: run the prompt once, then start n sequences from copies of its cache.
            cache = make_prompt_cache(self.model)
            with mx.stream(self._generator.stream):
                self.model(mx.array(prompt[:-1])[None], cache=cache)
                mx.eval([c.state for c in cache])
            caches = [[_copy_cache(c) for c in cache] for _ in range(n)]
            uids = self._generator.insert(
                [prompt[-1:]] * n,
                max_tokens=[req.params.max_tokens] * n,
                caches=caches,
                all_tokens=[list(prompt[:-1]) for _ in range(n)],
                samplers=samplers,
                stop_sequences=stops,
            )
        else:
            uids = self._generator.insert(
                [prompt] * n, max_tokens=[req.params.max_tokens] * n, samplers=samplers, stop_sequences=stops
            )
        req.uids = uids  # first, so that a failure from here on takes them out of the batch (`_fail`)
        self.stats.prompt_tokens_total += len(prompt)
        for i, uid in enumerate(uids):
            self._by_uid[uid] = (req, i)
            if req.params.stop:
                self._detok[uid] = self.tokenizer.detokenizer
        self._refresh_gauges()

    def _remove(self, req: Request) -> None:
        if any(r is req for r, _ in self._waiting):  # never admitted: nothing to take out of the batch
            self._waiting = deque(w for w in self._waiting if w[0] is not req)
            self._release(req)
            self._refresh_gauges()
            return
        live = [u for u in req.uids if u in self._by_uid]
        if live:
            self._generator.remove(live)
            for u in live:
                self._finish(u, "cancelled", notify=False)
        self._refresh_gauges()

    def busy_seconds(self) -> float:
        """Seconds spent in steps so far, the step running now included: a reader sampling it twice sees the busy
        time between its samples, not whole steps counted at their end (a prefill can outlast the interval)."""
        began = self._step_began
        return self.stats.decode_seconds_total + (time.perf_counter() - began if began is not None else 0.0)

    def _step(self) -> None:
        version = self._launched_version
        self._step_began = tic = time.perf_counter()
        # One BatchGenerator.next() per call (not next_generated(), which loops internally): the version rule
        # "tokens returned now were launched by the previous call" holds per next() call, idle gaps included.
        try:
            _, responses = self._generator.next()
            self._steps += 1
            self._launched_version = self.stats.adapter_version
            chosen, rows = _sampled_logprobs(responses, self._by_uid) if responses else (None, None)
        finally:
            self._progress_at = time.perf_counter()
            elapsed = self._progress_at - tic
            self.stats.decode_seconds_total += elapsed
            self._step_began = None
        if not responses:
            return
        self.stats.decode_steps_total += 1
        self.stats.generation_tokens_total += len(responses)
        if self.on_step:
            self.on_step(elapsed, len(responses))
        for i, r in enumerate(responses):
            entry = self._by_uid.get(r.uid)
            if entry is None:
                continue
            req, index = entry
            try:  # free when nothing raises; what one request raises fails it alone
                c = req.completions[index]
                c.token_ids.append(r.token)
                c.logprobs.append(chosen[i])
                c.versions.append(version)
                if req.params.top_logprobs:
                    c.top_logprobs.append(_top_logprobs(_host_row(rows[i]), req.params.top_logprobs))
                finish = r.finish_reason
                detok = self._detok.get(r.uid)
                if detok is not None and finish is None:  # stop strings are matched on text, not tokens
                    detok.add_token(r.token)
                    if _hits_stop(detok.text, req.params.stop):
                        finish = "stop"
                        self._generator.remove([r.uid])
                if req.stream:
                    req.emit("token", index, r.token)
                if finish is not None:
                    self._finish(r.uid, finish)
            except Exception as e:
                self._fail(req, e)
        self._refresh_gauges()

    def _finish(self, uid: int, reason: str, notify: bool = True) -> None:
        req, index = self._by_uid.pop(uid)
        c = req.completions[index]
        c.finish_reason = reason
        self._detok.pop(uid, None)
        if notify:  # a cancelled completion is read by nobody (its text is made by the HTTP side, off this thread)
            req.emit("done", index)
        if all(x.finish_reason is not None for x in req.completions):
            self._release(req)

    def _fail(self, req: Request, error: Exception) -> None:
        """End one request with an error, its sequences taken out of the batch; the rest of the batch goes on."""
        status = 400 if isinstance(error, ParamsRefused) else 500
        if status == 500:
            log.error("request failed; the rest of the batch goes on", exc_info=error)
        self._generator.remove(req.uids)  # uids no longer in the batch are skipped
        for uid in req.uids:
            self._by_uid.pop(uid, None)
            self._detok.pop(uid, None)
        for c in req.completions:
            c.finish_reason = c.finish_reason or "error"
        message = (
            str(error) if status == 400 else f"generation failed for this request ({type(error).__name__}: {error})"
        )
        req.emit("error", message, status)
        self._release(req)
        self._refresh_gauges()

    def _release(self, req: Request) -> None:
        if req.released:
            return
        req.released = True
        with self._count_lock:
            self._outstanding -= 1

    def _refresh_gauges(self) -> None:
        self.stats.active_sequences = len(self._by_uid)
        self.stats.queued_requests = self._inbox.qsize() + len(self._waiting)


class FusedLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear with its adapter branch in two ops instead of five: y + scale * ((x @ A) @ B) as one
    `addmm`. Same parameters (names, shapes), same function up to float rounding. The model is tiny on the test
    machines and a decode step is dominated by per-op overhead, so the unfused branch cost ~9% of throughput at
    batch 8 with q/v adapters; fused, ~0."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.training:  # dropout on the adapter input only exists in training: mlx-lm's path as is
            return super().__call__(x)
        y = self.linear(x)
        xa = x @ self.lora_a
        if xa.dtype != y.dtype:  # e.g. float32 adapter on a bfloat16 model: cast like mlx-lm does
            return y + (self.scale * (xa @ self.lora_b)).astype(y.dtype)
        return mx.addmm(y, xa, self.lora_b, alpha=self.scale)


def _fuse_lora(model: nn.Module) -> None:
    """Switch every plain mlx-lm LoRALinear of the model to the fused forward (the generation model only)."""
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = FusedLoRALinear


def _vocab_size(model: nn.Module, tokenizer) -> int:
    """Rows of the output layer: the ids the model can take and emit. The tokenizer's `vocab_size` is not it (Hugging
    Face leaves added special tokens out of it, so chat-template ids would be refused)."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else len(tokenizer)


def _copy_cache(cache):
    """A new cache object over the same arrays: MLX arrays are values (an in-place update of a shared buffer makes a
    copy), so the n sequences never see each other's updates."""
    return type(cache).from_state(cache.state)


def _seeded_sampler(temp: float, top_p: float, seed: int) -> Callable:
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if temp == 0:
            return mx.argmax(logprobs, axis=-1)
        key, sub = mx.random.split(key)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temp), key=sub)

    return sample


# numpy can view these MLX dtypes in place; others (bfloat16) go through a float32 copy.
_HOST_DTYPES = (mx.float32, mx.float16)


def _host_row(row: mx.array | np.ndarray) -> np.ndarray:
    """A log-prob row as numpy. BatchGenerator has already evaluated it, so for float32/float16 this reads its
    memory in place, with no MLX op to build, schedule and wait for."""
    if isinstance(row, np.ndarray):  # already on the host (a reshaped row, see _sampled_logprobs)
        return row
    if row.dtype not in _HOST_DTYPES:
        row = row.astype(mx.float32)
    return np.asarray(row)


def _sampled_logprobs(responses, by_uid: dict) -> tuple[list[float], list[mx.array | np.ndarray]]:
    """The log-prob of each response's sampled token under the distribution it was SAMPLED from, and that
    distribution's log-prob row (for top_logprobs).

    BatchGenerator's rows are the model's log_softmax (temperature 1). mlx-lm's sampler (and `_seeded_sampler`)
    draws at temperature T with top_p from: the nucleus of that temperature-1 distribution (`apply_top_p`), then
    softmax(logprobs / T) over it, so top_p renormalises over the kept nucleus. That distribution is what is
    reported: the learner's importance weights (behaviour log-probs) must be those of the policy that sampled.
    Greedy requests (T = 0) report the model's temperature-1 log-probs, as OpenAI does (the point mass would say 0).

    Rows at temperature 1 without top_p are read in place when numpy can view them (4x cheaper than an MLX gather
    at batch 32), else with one batched MLX gather rather than a device read per sequence; reshaped rows cost one
    batched MLX pass per distinct (temperature, top_p) of the step."""
    rows: list[mx.array | np.ndarray] = [r.logprobs for r in responses]
    shaped: dict[tuple[float, float], list[int]] = {}
    for i, r in enumerate(responses):
        entry = by_uid.get(r.uid)
        p = entry[0].params if entry is not None else None
        if p is not None and p.temperature != 0 and (p.temperature != 1 or 0 < p.top_p < 1):
            shaped.setdefault((p.temperature, p.top_p), []).append(i)
    for (temp, top_p), idx in shaped.items():
        x = mx.stack([rows[i] for i in idx]).astype(mx.float32)
        if 0 < top_p < 1:
            x = apply_top_p(x, top_p)  # the very nucleus the sampler kept (-inf outside it)
        x = x * (1.0 / temp)
        x = x - mx.logsumexp(x, axis=-1, keepdims=True)
        mx.eval(x)
        host = np.asarray(x)
        for j, i in enumerate(idx):
            rows[i] = host[j]
    out = [0.0] * len(responses)
    gather = []
    for i, (row, r) in enumerate(zip(rows, responses)):
        if isinstance(row, np.ndarray) or row.dtype in _HOST_DTYPES:
            out[i] = float(np.asarray(row)[r.token])
        else:
            gather.append(i)
    if gather:  # e.g. bfloat16 rows
        stacked = mx.stack([rows[i] for i in gather])
        tokens = mx.array([responses[i].token for i in gather])[:, None]
        values = mx.take_along_axis(stacked, tokens, axis=1)[:, 0].astype(mx.float32).tolist()
        for i, v in zip(gather, values):
            out[i] = v
    return out, rows


def _top_logprobs(row: np.ndarray, k: int) -> dict[int, float]:
    k = min(k, row.shape[-1])
    ids = np.argpartition(-row, k - 1)[:k]
    # Tokens outside a top_p nucleus have log-prob -inf (never sampled): left out, and JSON has no -inf.
    return {int(i): float(row[i]) for i in ids if np.isfinite(row[i])}


def _hits_stop(text: str, stops: tuple[str, ...]) -> bool:
    return any(s in text for s in stops)


def completion_text(tokenizer, eos_ids, c: Completion, stops: tuple[str, ...]) -> str:
    """A finished completion's text: its tokens decoded (an EOS that ended it is not text), cut at the first stop
    string."""
    ids = c.token_ids
    if c.finish_reason == "stop" and ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    return _cut_at_stop(text, stops) if stops else text


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time())}-{next(_ids)}"


def verified_copy(message: wire.WeightMessage) -> dict[str, mx.array]:
    """MLX arrays from a message (one copy into MLX-owned memory), then the checksum checked on that copy: what gets
    installed is exactly what was verified, even if the source (a shared-memory slot) is rewritten meanwhile. Raises
    WireError on a mismatch."""
    out = {}

    def copies():
        for name, arr in message.tensors.items():
            a = mx.array(arr)
            out[name] = a.view(mx.bfloat16) if message.dtypes[name] == "bfloat16" else a
            yield np.asarray(a)

    wire.verify(message, copies())  # each tensor hashed right after its copy, while it is still in cache
    mx.eval(list(out.values()))
    return out


def _injected_fault(path: str, busy: bool) -> str | None:
    """The test fault at `path` ("hang", or anything else for an MLX failure) if this call took the file: deleted it,
    so that one process of several takes it. A hang is taken only by a busy engine (one with requests in its batch)."""
    try:
        with open(path) as f:
            mode = f.read().strip() or "crash"
        if mode == "hang" and not busy:
            return None
        os.unlink(path)
        return mode
    except FileNotFoundError:
        return None
