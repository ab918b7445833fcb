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
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_BYTES = 2**20

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
    },
    "ack": {"name": (str,), "version": (int,), "state": (str,), "http_url": (str,)},
    "status": {"job": (dict,), "workers": (list,)},
    "get_latest": {"name": (str,), "slots": (bool,)},
    "latest": {"version": (int,)},
    "get_config": {},
    "config": {"toml": (str,)},
    "weights_slot": {"slot": (int,), "version": (int,), "nbytes": (int,)},
    "published": {"version": (int,)},
    "rejected": {"reason": (str,)},
    "wait_serving": {"version": (int,)},
    "serving": {"version": (int,)},
    "progress": {"name": (str,), "metrics": (dict,)},
    "done": {"name": (str,)},
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
    return msg


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
