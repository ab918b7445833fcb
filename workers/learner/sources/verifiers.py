"""`[source] type = "verifiers"`: rollouts of a verifiers environment (PyPI `verifiers`, its classic API), scored by
the environment's rubric, with the tokens and sampler log-probs the generation workers returned.

The environment is loaded the library's way, `verifiers.load_environment(name)` (import module `name`, call its
`load_environment()`). Each step takes the next `batch_size` examples of its dataset and runs one group of
`group_size` rollouts per example with `env.run_group`, each group on the least loaded worker's OpenAI endpoint.
verifiers reads token ids and log-probs from the chat responses' vLLM-style fields (`prompt_token_ids`, per choice
`token_ids` and `logprobs.content`), which the workers send; the per-token adapter versions (`policy_versions`, not
kept by verifiers) are taken off the raw responses by an httpx hook, by response id. A multi-turn rollout is one sample
(trained: the model's tokens only); where a turn's prompt does not extend the tokens before it (the chat template
rendered them to other ids), the sample restarts at that turn, counted in the step's `verifiers_restarts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Callable

import httpx

from runner.config import ConfigError
from runner.routing import LeastLoaded
from workers.learner.sources.base import Batch, Retryable, Sample, Stopped, retrying, wait_unless_stopped

log = logging.getLogger(__name__)


def load_environment(name: str):
    """The verifiers environment of module `name` (found in the working directory too, as reward modules are), with
    a dataset; ConfigError otherwise."""
    try:
        import verifiers
    except ImportError:
        raise ConfigError(
            "source.type = 'verifiers' needs the verifiers package: pip install 'runner[verifiers]'"
        ) from None
    if os.getcwd() not in sys.path:  # a console script's sys.path lacks the working directory
        sys.path.append(os.getcwd())
    try:
        env = verifiers.load_environment(name)
        if len(env.get_dataset()) == 0:
            raise ValueError("its dataset is empty")
    except Exception as e:
        cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        raise ConfigError(f"source.environment = {name!r}: {cause}".replace("\n", " ")) from None
    return env


def rollout_sample(output: dict, versions_by_id: dict[str, list[int]]) -> tuple[Sample, int]:
    """One scored verifiers rollout -> one Sample: every turn's new prompt tokens (not trained) then the model's
    tokens with their sampling log-probs and versions; and how many turns restarted the sample (below)."""
    tokens: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    restarts = 0
    for turn in output["trajectory"]:
        t = turn["tokens"]
        if t is None:
            raise ValueError("a verifiers rollout turn has no token ids: the workers' chat response lacked them")
        prompt, completion = list(t["prompt_ids"]), list(t["completion_ids"])
        if prompt[: len(tokens)] != tokens:
            # The chat template rendered the earlier turns to other ids (a template that drops reasoning, or text that
            # re-tokenizes differently): train from this turn on, the earlier turns as its (untrained) prompt.
            tokens, mask, logprobs, versions = [], [], [], []
            restarts += 1
        response = turn["response"]
        response_id = response["id"] if isinstance(response, dict) else response.id
        turn_versions = versions_by_id.pop(response_id, None)
        if turn_versions is None or len(turn_versions) != len(completion):
            raise ValueError(f"the workers' response {response_id} carried no per-token versions")
        new = prompt[len(tokens) :]
        tokens += new + completion
        mask += [0] * len(new) + [1] * len(completion)
        logprobs += [0.0] * len(new) + [float(x) for x in t["completion_logprobs"]]
        versions += [-1] * len(new) + [int(v) for v in turn_versions]
    trained = [v for v, m in zip(versions, mask) if m]
    version = min(trained) if trained else None
    sample = Sample(
        tokens=tokens, mask=mask, reward=float(output["reward"]), logprobs=logprobs, version=version, versions=versions
    )
    return sample, restarts


class VerifiersSource:
    """Batches of a verifiers environment's scored groups; the position is the next example (cycling the dataset)."""

    def __init__(
        self,
        environment: str,
        urls: Callable[[], list[str]],
        group_size: int,
        batch_size: int,
        max_tokens: int,
        temperature: float = 1.0,
        api_token: str = "",
        stop: threading.Event | None = None,
    ):
        self.name = environment
        self.env = load_environment(environment)
        self.dataset = self.env.get_dataset()
        log.info("verifiers environment %s: %d examples", environment, len(self.dataset))
        self.urls, self.group_size, self.batch_size = urls, group_size, batch_size
        self.sampling_args = {"max_tokens": max_tokens, "temperature": temperature, "logprobs": True}
        self.api_token = api_token
        self.stop = stop or threading.Event()
        self.position = 0
        self._versions: dict[str, list[int]] = {}  # response id -> per-token adapter versions, until trained
        self._clients: dict[
            str, tuple
        ] = {}  # worker URL -> (verifiers client over AsyncOpenAI, the model name it serves)
        self._routing = LeastLoaded()
        self._loop = asyncio.new_event_loop()  # rollouts run here; next_batch waits for them unless told to stop
        threading.Thread(target=self._loop.run_forever, name="verifiers", daemon=True).start()

    async def _record_versions(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/chat/completions") and response.status_code == 200:
            data = json.loads(await response.aread())
            self._versions[data["id"]] = data["choices"][0].get("policy_versions") or []

    def _client(self, url: str) -> tuple:
        if url not in self._clients:
            from openai import AsyncOpenAI
            from verifiers.clients import OpenAIChatCompletionsClient

            headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}
            model = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
            http = httpx.AsyncClient(timeout=600, event_hooks={"response": [self._record_versions]})
            client = AsyncOpenAI(base_url=f"{url}/v1", api_key=self.api_token or "none", http_client=http)
            self._clients[url] = (OpenAIChatCompletionsClient(client), model)
        return self._clients[url]

    async def _group(self, index: int) -> list[dict]:
        row = dict(self.dataset[index % len(self.dataset)])
        url = await asyncio.to_thread(self._acquire_url)
        ok = False
        try:
            client, model = await asyncio.to_thread(self._client, url)
            inputs = [dict(row) for _ in range(self.group_size)]
            outputs = await self.env.run_group(
                inputs, client, model, dict(self.sampling_args), state_columns=["trajectory"]
            )
            ok = True
            return outputs
        finally:
            self._routing.release(url, failed=not ok)

    def _acquire_url(self) -> str:
        """The least loaded worker's URL, waiting (up to two minutes, or a stop) while none serves."""

        def acquire() -> str:
            urls = [u.rstrip("/") for u in self.urls()]
            if not urls:
                raise Retryable("no generation worker is available yet")
            return self._routing.acquire(urls)

        return retrying(self.stop, 120, (Retryable,), "finding a generation worker")(acquire)

    async def _batch(self, start: int) -> list[list[dict]]:
        return list(await asyncio.gather(*(self._group(start + i) for i in range(self.batch_size))))

    def next_batch(self, step: int) -> Batch:
        start = self.position
        future = asyncio.run_coroutine_threadsafe(self._batch(start), self._loop)
        try:
            wait_unless_stopped([future], self.stop, f"the verifiers rollouts of step {step}")
        except Stopped:
            future.cancel()
            raise
        # A rollout verifiers ended with an error (e.g. the model answered nothing) is left out of its group, logged and
        # counted; the group keeps its other completions (dropping whole groups would bias toward what never fails).
        kept = [[o for o in outputs if not o.get("error")] for outputs in future.result()]
        errors = [o["error"] for outputs in future.result() for o in outputs if o.get("error")]
        for error in errors:
            log.warning("a verifiers rollout of step %d failed and is left out: %s", step, error)
        samples = [[rollout_sample(o, self._versions) for o in outputs] for outputs in kept]
        groups = [[s for s, _ in g] for g in samples if g]
        self.position = start + self.batch_size
        metrics: dict[str, float] = {
            "prompt_index": start,
            "verifiers_restarts": sum(r for g in samples for _, r in g),
            "verifiers_errors": len(errors),
        }
        outputs = [o for g in kept for o in g]
        for name in sorted({k for o in outputs for k in o.get("metrics", {})}):  # the rubric's functions, averaged
            values = [float(o["metrics"][name]) for o in outputs if name in o.get("metrics", {})]
            metrics[f"verifiers_{name}"] = sum(values) / len(values)
        batch = Batch(groups=groups, info={"source": "verifiers", "environment": self.name, "prompt_index": start})
        batch.info["metrics"] = metrics
        return batch

    def state(self) -> dict:
        return {"type": "verifiers", "environment": self.name, "position": self.position}

    def load_state(self, d: dict) -> None:
        self.position = int(d.get("position", 0))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
