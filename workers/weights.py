"""The MLX ends of the weight plane: adapter tensors to wire frames (learner) and back (generation worker).

The wire format itself lives in `runner.wire` (no MLX). Sending is zero-copy: the frames are views of the MLX
arrays' own host memory (MLX on Apple silicon shares memory with the GPU, so this holds on Metal too); bfloat16
travels as its raw 16-bit patterns.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from runner import wire


def encode_adapter(version: int, step: int, base_model_id: str, adapter_config: dict,
                   tensors: dict[str, mx.array]) -> list:
    """Frames of one weight message; keep `tensors` alive until ZeroMQ has sent them."""
    mx.eval(list(tensors.values()))
    entries = []
    for name, t in tensors.items():
        if t.dtype == mx.bfloat16:
            entries.append((name, "bfloat16", tuple(t.shape), memoryview(np.asarray(t.view(mx.uint16)))))
        else:
            entries.append((name, str(t.dtype).removeprefix("mlx.core."), tuple(t.shape), memoryview(np.asarray(t))))
    return wire.encode(version, step, base_model_id, adapter_config, entries)


def decode_to_mlx(message: wire.WeightMessage) -> dict[str, mx.array]:
    """MLX arrays from a validated message (one copy into MLX-owned memory)."""
    out = {}
    for name, arr in message.tensors.items():
        a = mx.array(arr)
        out[name] = a.view(mx.bfloat16) if message.dtypes[name] == "bfloat16" else a
    return out
