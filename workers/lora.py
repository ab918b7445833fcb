"""LoRA on an mlx-lm model: wrap target linears, read and install the adapter tensors, save/load the adapter in
mlx-lm's directory format (`adapters.safetensors` + `adapter_config.json`, so `mlx_lm.generate --adapter-path` and
`mlx_lm.load(..., adapter_path=)` accept what we write).

Only `lora_a`/`lora_b` are adapter tensors; the base stays frozen (quantized or float).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from runner.files import replace_path

log = logging.getLogger(__name__)

ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    num_layers: int = -1  # -1 = every transformer block

    def adapter_config(self, num_model_layers: int) -> dict:
        """The adapter_config.json mlx-lm expects."""
        return {
            "fine_tune_type": "lora",
            "num_layers": num_model_layers if self.num_layers == -1 else self.num_layers,
            "lora_parameters": {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": list(self.keys),
            },
        }

    @classmethod
    def from_adapter_config(cls, config: dict) -> LoraSpec:
        p = config["lora_parameters"]
        return cls(
            rank=int(p["rank"]),
            scale=float(p["scale"]),
            dropout=float(p.get("dropout", 0.0)),
            keys=list(p.get("keys") or LoraSpec().keys),
            num_layers=int(config["num_layers"]),
        )


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze the model and wrap the target linears of the last `num_layers` blocks with LoRA (lora_b = 0, so the
    adapted model starts equal to the base)."""
    model.freeze()
    config = spec.adapter_config(len(model.layers))
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    if not lora_tensors(model):
        raise ValueError(f"LoRA keys {spec.keys} match no layer of this model")
    return model


def lora_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors by their mlx-lm names, e.g. 'model.layers.0.self_attn.q_proj.lora_a'."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def lora_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of every adapter tensor, what a received adapter must match."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("mlx.core.")) for k, v in lora_tensors(model).items()}


def check_lora(layout: dict[str, tuple[tuple[int, ...], str]], tensors: dict[str, mx.array]) -> None:
    """Raise ValueError unless `tensors` has exactly the names, shapes and dtypes of `layout` (see `lora_layout`)."""
    if set(tensors) != set(layout):
        missing, extra = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
        raise ValueError(f"adapter tensor names do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, (shape, dtype) in layout.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != getattr(mx, dtype):  # not str(t.dtype): slow, on a per-version path
            raise ValueError(f"adapter tensor {name} is {t.dtype}{tuple(t.shape)}; expected {dtype}{shape}")


def lora_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, attribute) of every adapter tensor, so a new adapter can be swapped in by reference without
    `model.update`'s walk of the whole parameter tree (milliseconds for 120 tensors)."""
    modules = dict(model.named_modules())
    return {name: (modules[name.rpartition(".")[0]], name.rpartition(".")[2]) for name in lora_tensors(model)}


def set_lora(model: nn.Module, tensors: dict[str, mx.array]) -> None:
    """Install a complete set of adapter tensors (validated first, so a bad set changes nothing)."""
    check_lora(lora_layout(model), tensors)
    model.update(tree_unflatten(list(tensors.items())))


def save_adapter(
    directory: Path, model: nn.Module, spec: LoraSpec, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write the adapter in mlx-lm's format into `directory` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    mx.save_safetensors(str(tmp / "adapters.safetensors"), lora_tensors(model))
    (tmp / "adapter_config.json").write_text(json.dumps(spec.adapter_config(len(model.layers)), indent=2))
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)
    replace_path(tmp, directory)
    return directory


def read_adapter(directory: Path) -> tuple[LoraSpec, dict[str, mx.array]]:
    """Read an mlx-lm adapter directory, with a clear error for anything missing or malformed."""
    directory = Path(directory)
    cfg_path, weights_path = directory / "adapter_config.json", directory / "adapters.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an adapter directory; expected adapter_config.json and adapters.safetensors"
        )
    try:
        spec = LoraSpec.from_adapter_config(json.loads(cfg_path.read_text()))
        tensors = mx.load(str(weights_path))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{directory}: unreadable adapter ({e})") from None
    return spec, tensors
