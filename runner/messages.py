"""Control messages: every type the coordinator and its clients exchange, with its fields, and their codec.

On the coordinator's ROUTER/DEALER control socket each message is one msgpack map of at most ``MAX_BYTES`` with a
str ``"type"`` naming one entry of ``MESSAGES`` and only that entry's fields (routing identity frames and the
control/weights framing are `runner.control`'s business). ``unpack`` refuses anything else with a ``MessageError``
that says why; ``pack`` refuses to send it. The table is the protocol: a new message or field is added here first.

Who sends what (W = a worker or learner, C = the coordinator):

- W→C ``hello`` (reply ``welcome``: runtime facts only, never config; a worker rejoining a restarted coordinator
  says the version it serves, and ``welcome`` says ``supervised`` to the coordinator's own children), ``heartbeat``
  (on a socket of its own), ``ack`` (an adapter version is
  live), ``status`` (reply ``status`` with the worker table), ``get_latest`` (reply the latest weight message, or
  ``latest`` version 0 when there is none yet; its ``name`` subscribes a worker to same-host fan-out), ``get_config``
  (reply ``config``, the job's resolved TOML), ``wait_serving`` (reply ``serving`` once every serving generation
  worker has that version), ``progress`` and ``done`` (the learner).
- W→C ``weights_slot``: a version written into a same-host shared-memory slot (`runner.control`); reply
  ``published`` or ``rejected``, as for a weight message sent as frames. C→W the same notice fans the version out
  to same-host workers.
- C→W ``heartbeat`` (``name`` "coordinator") every heartbeat interval to the socket each worker heartbeats from
  (Paranoid Pirate: liveness both ways); ``rejoin`` when it does not know the sender (it restarted), or the sender
  is not the process that said hello under that name: say hello again (a child of a dead coordinator exits).
  A weight message on the control socket, unasked, when a worker's heartbeat reports a version older than the latest
  (it missed one).
- C→W ``stop``: a remote worker should exit (the job ended).

Every message that names its sender (``hello``, ``heartbeat``, ``ack``, ``get_latest``, ``progress``, ``done``)
carries its ``token``: a secret the sender made up for itself (or, for the coordinator's own children, was given in
its environment), told once at ``hello``; the coordinator accepts the named messages only with that token. Without
CURVE, a worker that the coordinator did not start proves at ``hello`` that it holds the job's API token (when the job
has one): ``proof`` is `runner.control.hello_proof` of the token, its name and its own token.

Field values are checked too (`check_values`): ints are in [0, 2**53), strings and maps are bounded, names use a
safe charset, URLs are http(s), metrics map names to numbers (or short strings): there a float may be NaN or infinite
(a diverged loss is news, and formats as "nan") and an int may be negative, within 2**53.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

MAX_BYTES = 2**20
MAX_INT = 2**53  # ints (versions, pids, sizes) are in [0, MAX_INT): exact as JSON numbers, far from overflow
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # worker names: what a log line or a label can hold
WORKER_STATES = ("starting", "loading", "catching_up", "serving", "training", "stopping", "failed")
_MAX_STR = {"host": 255, "role": 32, "http_url": 2048, "token": 128, "proof": 128, "reason": 4096}
_MAX_ENTRIES = {"capabilities": 32, "metrics": 256}
# Metrics the coordinator formats as numbers (its progress line, eval summary, status, Prometheus).
NUMERIC_METRICS = frozenset(
    {
        "step",
        "version",
        "reward_mean",
        "loss",
        "kl",
        "tokens_per_s",
        "staleness",
        "staleness_mean",
        "sampler_kl",
        "warmup_s",
    }
    | {"wait_s", "train_s", "publish_s", "step_s", "gen_busy", "seconds"}
    | {"eval_reward", "eval_accuracy", "eval_pass_at_k", "eval_s", "eval_examples"}
)

# Field types: a msgpack int is `int` (a bool is not), `dict`/`list` are maps/arrays of any msgpack values, None
# allows nil. Every field is optional unless listed in REQUIRED.
MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {
        "name": (str,),
        "role": (str,),
        "pid": (int,),
        "host": (str,),
        "capabilities": (dict,),
        "version": (int,),
        "state": (str,),
        "http_url": (str,),
        "token": (str,),
        "proof": (str,),
    },
    "welcome": {
        "base_model_id": (str,),
        "latest_version": (int,),
        "weights_endpoint": (str,),
        "weights_slots": (dict, type(None)),
        "supervised": (bool,),
    },
    "heartbeat": {
        "name": (str,),
        "state": (str,),
        "version": (int,),
        "http_url": (str,),
        "pid": (int,),
        "rejoin": (bool,),
        "token": (str,),
        "engine_steps": (int,),  # a generation worker's batch steps so far: its engine's progress
    },
    "ack": {"name": (str,), "version": (int,), "state": (str,), "http_url": (str,), "token": (str,)},
    "status": {"job": (dict,), "workers": (list,)},
    "get_latest": {"name": (str,), "slots": (bool,), "token": (str,)},
    "latest": {"version": (int,)},
    "get_config": {},
    "config": {"toml": (str,)},
    "weights_slot": {"slot": (int,), "version": (int,), "nbytes": (int,)},
    "published": {"version": (int,)},
    "rejected": {"reason": (str,)},
    "wait_serving": {"version": (int,)},
    "serving": {"version": (int,)},
    "progress": {"name": (str,), "metrics": (dict,), "token": (str,)},
    "done": {"name": (str,), "token": (str,)},
    "stop": {},
}
REQUIRED: dict[str, frozenset[str]] = {
    "hello": frozenset({"name"}),
    "welcome": frozenset({"base_model_id", "latest_version", "weights_endpoint", "weights_slots"}),
    "heartbeat": frozenset({"name"}),
    "ack": frozenset({"name", "version"}),
    "latest": frozenset({"version"}),
    "config": frozenset({"toml"}),
    "weights_slot": frozenset({"slot", "version", "nbytes"}),
    "published": frozenset({"version"}),
    "rejected": frozenset({"reason"}),
    "wait_serving": frozenset({"version"}),
    "serving": frozenset({"version"}),
    "progress": frozenset({"name"}),
    "done": frozenset({"name"}),
}

# Tight bounds so a hostile message cannot make msgpack allocate much more than the (bounded) frame; ext types
# have no meaning here.
_UNPACK_LIMITS = dict(
    max_str_len=MAX_BYTES, max_bin_len=MAX_BYTES, max_array_len=2**16, max_map_len=2**16, max_ext_len=0
)


class MessageError(ValueError):
    """A control message is malformed; ``type`` is its type when that much was readable (to answer it)."""

    def __init__(self, reason: str, type: str | None = None):
        super().__init__(reason)
        self.type = type


def _type_name(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def check(msg: Any) -> dict[str, Any]:
    """``msg`` if it is a valid control message: a known type with its required fields, no others, each of its
    type."""
    if not isinstance(msg, dict):
        raise MessageError(f"control message is a {_type_name(msg)}, not a map")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGES:
        raise MessageError(f"control message type {kind!r} is not one of {sorted(MESSAGES)}")
    fields = MESSAGES[kind]
    if unknown := sorted(set(msg) - set(fields) - {"type"}):
        raise MessageError(f"{kind!r} message has unknown field(s) {unknown}", kind)
    if missing := sorted(REQUIRED.get(kind, frozenset()) - set(msg)):
        raise MessageError(f"{kind!r} message is missing field(s) {missing}", kind)
    for name, types in fields.items():
        if name in msg and (not isinstance(msg[name], types) or (isinstance(msg[name], bool) and bool not in types)):
            expected = " or ".join(t.__name__ for t in types)
            raise MessageError(f"{kind!r} field {name!r} must be {expected}, got {_type_name(msg[name])}", kind)
    check_values(kind, msg)
    return msg


def check_values(kind: str, msg: dict[str, Any]) -> None:
    """Raise MessageError unless every field's value is in range (see the module docstring)."""
    for field, value in msg.items():
        if field == "type":
            continue
        where = f"{kind!r} field {field!r}"
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < MAX_INT:
            raise MessageError(f"{where} must be in [0, 2**53)", kind)
        if field == "name" and not NAME.fullmatch(value):
            raise MessageError(
                f"{where} must be 1-128 characters of A-Z a-z 0-9 . _ : @ + - (not starting with one)", kind
            )
        if field == "state" and value not in WORKER_STATES:
            raise MessageError(f"{where} must be one of {list(WORKER_STATES)}", kind)
        if field in _MAX_STR and (len(value) > _MAX_STR[field] or not value.isprintable()):
            raise MessageError(f"{where} must be printable and at most {_MAX_STR[field]} characters", kind)
        if field == "http_url" and value and not re.fullmatch(r"https?://[^/?#\s]+(/\S*)?", value):
            raise MessageError(f"{where} must be an http(s)://HOST[:PORT] URL", kind)
        if field in _MAX_ENTRIES:
            _check_map(where, kind, value, _MAX_ENTRIES[field], numeric=NUMERIC_METRICS if field == "metrics" else ())


def _check_map(where: str, kind: str, value: dict, max_entries: int, numeric) -> None:
    """A map of at most `max_entries` short str keys to scalars (or lists of at most 1024 scalars); `numeric` keys hold
    numbers or None."""
    if len(value) > max_entries:
        raise MessageError(f"{where} has more than {max_entries} entries", kind)
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 128 or not key.isprintable():
            raise MessageError(f"{where} keys must be printable str of 1-128 characters", kind)
        items = item if isinstance(item, list) and len(item) <= 1024 else [item]
        for x in items:
            if not _scalar(x):
                raise MessageError(f"{where}[{key!r}] must be None, a bool, a number or a str of <= 1024", kind)
            if key in numeric and (isinstance(x, (str, bool)) or isinstance(item, list)):
                raise MessageError(f"{where}[{key!r}] must be a number or None", kind)


def _scalar(x: Any) -> bool:
    if x is None or isinstance(x, bool):
        return True
    if isinstance(x, int):
        return -MAX_INT < x < MAX_INT
    return isinstance(x, float) or (isinstance(x, str) and len(x) <= 1024)


def pack(msg: dict[str, Any]) -> bytes:
    """Serialize a control message; raises MessageError if it is not one ``unpack`` accepts."""
    check(msg)
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"{msg['type']!r} message is not msgpack-serializable ({exc})", msg["type"]) from None
    if len(data) > MAX_BYTES:
        raise MessageError(f"{msg['type']!r} message is {len(data)} bytes, more than the {MAX_BYTES} allowed")
    return data


def unpack(data: Any) -> dict[str, Any]:
    """Parse and validate one control message frame (bytes, memoryview or zmq.Frame)."""
    data = getattr(data, "buffer", data)  # a zmq.Frame
    try:
        view = memoryview(data)
    except TypeError:
        raise MessageError(f"control frame is a {_type_name(data)}, not a bytes-like object") from None
    if view.nbytes > MAX_BYTES:
        raise MessageError(f"control message is {view.nbytes} bytes, more than the {MAX_BYTES} allowed")
    try:
        msg = msgpack.unpackb(view, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise MessageError(f"control message is not valid msgpack ({type(exc).__name__})") from None
    return check(msg)
