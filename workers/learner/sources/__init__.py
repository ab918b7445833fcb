"""Where the learner's scored groups come from, behind one small interface (`base.Source`).

    source.next_batch(step) -> Batch     # blocks until the batch for optimizer step `step` (1-based) is ready
    source.state() -> dict               # JSON-able position, saved in every checkpoint
    source.load_state(d)                 # resume at that position
    source.close()

A `Batch` is a list of groups; a group is the completions of one prompt (GRPO compares within a group). Every
`Sample` carries the whole sequence (`tokens` = prompt + completion) with a per-token `mask` (1 = trained), so
built-in rollouts and Atropos' multi-turn masks look the same to the trainer. `logprobs` are the sampling
log-probs per token, aligned with `tokens` (0 where unknown/untrained); `versions` the adapter version that sampled
each token (a sequence continues under a version installed while it is generated), aligned the same way.

One module per source, around `base` (the data types, the retry and wait helpers, `FreshSource`); none imports
another source, and this package imports none of them (so `runner check` loads the dataset module without MLX):

- `builtin.BuiltinSource`: a task's prompts sent to the generation workers (`POST /v1/completions`, n = group
  size), the completions scored by the task (`workers.learner.tasks`: the built-in tasks; `dataset`: rows of a
  dataset scored by reward functions, `workers.learner.rewards`).
- `atropos.AtroposSource`: registers with an Atropos API server and polls `GET /batch`.
- `verifiers.VerifiersSource`: rollouts of a verifiers environment, scored by its rubric.
- `replay.ReplaySource`: replays batches recorded as JSONL (one batch per line), for exact-resume tests and debugging.
- `factory.make_source`: the source a job config asks for.

Asynchronous rollouts (`[learner] async_depth` d > 0): `BuiltinSource.next_batch` keeps the rollouts of the next d
batches in flight while the learner trains the one it returns. Pacing rule: the batch that will be trained j steps
after the one being handed out (at learner version V + j, V = the learner's version now) starts only once every
serving worker serves a version >= V + j - max_staleness (the `ready(j)` hook; versions on a worker never go back),
so every token it gets is at most max_staleness versions old when trained. `AtroposSource` fetches the next d
batches in the background (one poll after another) while the learner trains.
"""
