"""LoRA adapter files: inspect (`show`) and convert between three layouts without loading a model.

Formats (all hold the same tensors; conversions move bytes, so they are bitwise lossless for every dtype):

- ``mlx``:  mlx-lm's directory, ``adapters.safetensors`` (``model.layers.0.self_attn.q_proj.lora_a`` [in, rank],
  ``...lora_b`` [rank, out]) + ``adapter_config.json`` (``fine_tune_type``, ``num_layers``, ``lora_parameters``).
- ``npz``:  one ``.npz`` file with the mlx-lm tensor names plus ``__adapter_config__``: the mlx-lm config as UTF-8
  JSON bytes (a uint8 array, not a numpy string, so ``mx.load`` can read the whole file too). bfloat16 is stored as
  2-byte void, which is what ``mx.savez`` writes and ``mx.load`` reads back as bfloat16.
- ``peft``: Hugging Face PEFT's directory, ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``
  [rank, in] = lora_a.T, ``lora_B.weight`` [out, rank] = lora_b.T) + a PEFT ``adapter_config.json``. The original
  mlx-lm config rides along in the safetensors metadata (which PEFT ignores) so mlx -> peft -> mlx is exact; a PEFT
  adapter from elsewhere is mapped from its own config.

No MLX here: safetensors is read and written by the small codec below because numpy has no bfloat16 and the
`safetensors.numpy` API refuses BF16; keeping bfloat16 as raw 2-byte values makes every conversion a byte copy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner.files import replace_path

log = logging.getLogger(__name__)

FORMATS = ("mlx", "npz", "peft")
MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
NPZ_CONFIG_KEY = "__adapter_config__"
PEFT_PREFIX = "base_model.model."
PEFT_META_KEY = "runner.mlx_adapter_config"  # the exact mlx-lm config, for lossless peft -> mlx
BF16 = np.dtype("V2")  # bfloat16 kept as raw 2-byte values: numpy cannot compute with it, and we never need to

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BF16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_LABEL = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_LAYER = re.compile(r"^(?P<prefix>.*?\.layers)\.(?P<index>\d+)\.(?P<module>.+)\.(?P<leaf>lora_a|lora_b)$")


class AdapterError(ValueError):
    """A user-facing problem with an adapter path or its contents (one sentence, printed without a traceback)."""


# ----------------------------------------------------------------------------------------------------------
# safetensors codec (numpy, all dtypes incl. BF16)
# ----------------------------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries {name: {dtype, shape, data_offsets}}, metadata) from the header only, without the data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    return header, meta


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of a safetensors file as numpy arrays (BF16 as 2-byte void) and its metadata."""
    path = Path(path)
    entries, meta = safetensors_header(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    base = 8 + n
    out = {}
    for name, e in entries.items():
        dtype = _ST_DTYPES.get(e.get("dtype"))
        if dtype is None:
            raise AdapterError(
                f"{path}: tensor {name} has dtype {e.get('dtype')!r}; expected one of {sorted(_ST_DTYPES)}"
            )
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > len(data):
            raise AdapterError(f"{path}: tensor {name} is truncated or its size does not match its shape {shape}")
        out[name] = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=base + begin).reshape(shape)
    return out, meta


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a standard safetensors file (readable by safetensors, torch, mx.load); tensors in name order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, blobs = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":  # safetensors is little-endian
            a = a.astype(a.dtype.newbyteorder("<"))
        st = _ST_NAMES.get(a.dtype)
        if st is None:
            raise AdapterError(f"tensor {name} has dtype {a.dtype}; safetensors output supports {sorted(_ST_DTYPES)}")
        blob = a.tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes so the data is aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def dtype_label(a: np.ndarray | str) -> str:
    """'bfloat16', 'float16', 'float32', ... for an array or a safetensors dtype code."""
    if isinstance(a, str):
        return _DTYPE_LABEL.get(a, a.lower())
    return "bfloat16" if a.dtype == BF16 else str(a.dtype)


# ----------------------------------------------------------------------------------------------------------
# the in-memory adapter and the three formats
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """An adapter in mlx-lm terms: its adapter_config.json and its tensors by mlx-lm name and orientation."""

    config: dict
    tensors: dict[str, np.ndarray]
    base_model: str | None = None  # only used to fill PEFT's base_model_name_or_path

    @property
    def lora(self) -> dict:
        return self.config.get("lora_parameters") or {}

    def layers(self) -> list[int]:
        return layer_indices(self.tensors)

    def modules(self) -> list[str]:
        return module_paths(self.tensors)


def layer_indices(names) -> list[int]:
    """Sorted block indices that adapter tensor names touch."""
    return sorted({int(m.group("index")) for m in map(_LAYER.match, names) if m})


def module_paths(names) -> list[str]:
    """Target module paths inside a block, e.g. ['self_attn.q_proj', 'self_attn.v_proj'], in name order."""
    seen: dict[str, None] = {}
    for m in map(_LAYER.match, sorted(names)):
        if m:
            seen.setdefault(m.group("module"))
    return list(seen)


def detect_format(path: Path) -> str:
    """'mlx', 'npz' or 'peft' for an existing adapter path; AdapterError for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if path.is_dir():
        if (path / MLX_WEIGHTS).is_file() and (path / MLX_CONFIG).is_file():
            return "mlx"
        if (path / PEFT_WEIGHTS).is_file() and (path / PEFT_CONFIG).is_file():
            return "peft"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise AdapterError(
        f"{path} is not an adapter; expected a directory with {MLX_WEIGHTS} or {PEFT_WEIGHTS} "
        f"plus {MLX_CONFIG}, or a .npz file"
    )


def _check_lora_config(config: dict, where: Path) -> dict:
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: adapter config is {type(config).__name__}; expected a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"{where}: fine_tune_type is {kind!r}; only 'lora' adapters are supported")
    p = config.get("lora_parameters")
    if not isinstance(p, dict) or "rank" not in p or "scale" not in p or "num_layers" not in config:
        raise AdapterError(f"{where}: adapter config lacks num_layers or lora_parameters.rank/scale")
    return config


def _check_tensors(tensors: dict[str, np.ndarray], where: Path) -> None:
    for name in tensors:
        if not _LAYER.match(name):
            raise AdapterError(
                f"{where}: tensor {name!r} is not a LoRA tensor; expected '<...>.layers.N.<module>.lora_a|lora_b'"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is not readable JSON ({e})") from None


def read_adapter(path: Path) -> Adapter:
    """Read an adapter in any of the three formats."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "mlx":
        config = _check_lora_config(_read_json(path / MLX_CONFIG), path)
        tensors, _ = read_safetensors(path / MLX_WEIGHTS)
        adapter = Adapter(config, tensors, base_model=_base_model_hint(path, config))
    elif fmt == "npz":
        adapter = _read_npz(path)
    else:
        adapter = _read_peft(path)
    _check_tensors(adapter.tensors, path)
    return adapter


def _base_model_hint(path: Path, config: dict) -> str | None:
    """mlx_lm.lora records the base as 'model'; our checkpoints record it in state.json beside the adapter."""
    state = path / "state.json"
    if state.is_file():
        try:
            bid = json.loads(state.read_text()).get("base_model_id")
            if bid:
                return str(bid)
        except (OSError, ValueError):
            pass
    return str(config["model"]) if isinstance(config.get("model"), str) else None


def _read_npz(path: Path) -> Adapter:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a readable .npz file ({e})") from None
    raw = arrays.pop(NPZ_CONFIG_KEY, None)
    if raw is None:
        raise AdapterError(f"{path} has no {NPZ_CONFIG_KEY} entry; expected the adapter config stored as JSON")
    text = raw.tobytes().decode() if raw.dtype == np.uint8 else str(raw)  # a numpy string works too
    config = _check_lora_config(json.loads(text), path)
    tensors = {}
    for k, v in arrays.items():
        if v.dtype.kind == "V" and v.dtype.itemsize != 2:
            raise AdapterError(f"{path}: tensor {k} has raw dtype {v.dtype}; only 2-byte raw (bfloat16) is understood")
        tensors[k] = v.view(BF16) if v.dtype.kind == "V" else v
    return Adapter(config, tensors, base_model=config.get("model") if isinstance(config.get("model"), str) else None)


def _peft_name(mlx_name: str) -> str:
    module, leaf = mlx_name.rsplit(".", 1)
    return f"{PEFT_PREFIX}{module}.{'lora_A' if leaf == 'lora_a' else 'lora_B'}.weight"


def _mlx_name(peft_name: str, where: Path) -> str:
    m = re.match(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$", peft_name)
    if not m:
        raise AdapterError(
            f"{where}: tensor {peft_name!r} is not a PEFT LoRA weight; expected "
            f"'base_model.model.<module>.lora_A.weight' or '.lora_B.weight'"
        )
    return f"{m.group('module')}.lora_{m.group('ab').lower()}"


def to_peft(adapter: Adapter) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(PEFT adapter_config.json, PEFT-named tensors, safetensors metadata) for an adapter."""
    p = adapter.lora
    rank, scale = int(p["rank"]), float(p["scale"])
    modules = adapter.modules()
    leaves = [m.rsplit(".", 1)[-1] for m in modules]
    # Leaf names are what PEFT users write for llama-style models. Over-matching (another module with the same
    # leaf name) would only add LoRA layers with lora_B = 0, i.e. no change; if two targets share a leaf we keep
    # the full paths, which PEFT matches as suffixes.
    targets = sorted(set(leaves)) if len(set(leaves)) == len(leaves) else sorted(modules)
    layers = adapter.layers()
    alpha = scale * rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,  # PEFT scaling = lora_alpha / r
        "lora_dropout": float(p.get("dropout", 0.0)),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    # mlx-lm adapts the last num_layers blocks; only when that is not every block does PEFT need the list. Our
    # tensors cover all blocks exactly when their indices start at 0.
    if layers and layers[0] != 0:
        config["layers_to_transform"] = layers
        config["layers_pattern"] = "layers"
    tensors = {_peft_name(k): np.ascontiguousarray(v.T) for k, v in adapter.tensors.items()}
    meta = {"format": "pt", PEFT_META_KEY: json.dumps(adapter.config, separators=(",", ":"))}
    return config, tensors, meta


def peft_config_to_mlx(config: dict, names: list[str], metadata: dict, where: Path = Path("<peft>")) -> dict:
    """The mlx-lm adapter_config for a PEFT config whose tensors have these mlx-lm `names`: our own metadata when
    the file came from `to_peft` (exact), else mapped from PEFT's fields."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {config.get('peft_type')!r}; only 'LORA' is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(
                f"{where}: per-module {key} is set; mlx-lm adapters need one rank and scale for all modules"
            )
    if config.get("use_dora"):
        raise AdapterError(f"{where}: use_dora is true; only plain LoRA is supported")
    if metadata.get(PEFT_META_KEY):
        return _check_lora_config(json.loads(metadata[PEFT_META_KEY]), where)
    if "r" not in config:
        raise AdapterError(f"{where}: PEFT config has no 'r'; expected the LoRA rank")
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    layers = layer_indices(names)
    if layers and layers != list(range(layers[0], layers[-1] + 1)):
        raise AdapterError(
            f"{where}: LoRA covers layers {layers}; mlx-lm adapters must cover a contiguous last-N range"
        )
    log.debug(
        "%s: PEFT config mapped to mlx-lm (rank %d, scale %g, last %d layers; assumes layer %s is the model's last)",
        where,
        r,
        scale,
        len(layers),
        layers[-1] if layers else None,
    )
    return {
        "fine_tune_type": "lora",
        "num_layers": len(layers),
        "lora_parameters": {
            "rank": r,
            "scale": scale,
            "dropout": float(config.get("lora_dropout", 0.0)),
            "keys": module_paths(names),
        },
    }


def from_peft(config: dict, tensors: dict[str, np.ndarray], metadata: dict, where: Path = Path("<peft>")) -> Adapter:
    """The mlx-lm adapter for PEFT config + tensors (transposed back to mlx-lm's orientation)."""
    mlx = {_mlx_name(k, where): np.ascontiguousarray(v.T) for k, v in tensors.items()}
    return Adapter(peft_config_to_mlx(config, list(mlx), metadata, where), mlx, config.get("base_model_name_or_path"))


def _read_peft(path: Path) -> Adapter:
    config = _read_json(path / PEFT_CONFIG)
    tensors, meta = read_safetensors(path / PEFT_WEIGHTS)
    return from_peft(config, tensors, meta, path)


# ----------------------------------------------------------------------------------------------------------
# writing (atomic, never over an existing path unless forced)
# ----------------------------------------------------------------------------------------------------------


def _claim(dst: Path, force: bool) -> None:
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FileExistsError(f"{dst} already exists; pass --force to replace it")
        if dst.is_dir() != (dst.suffix != ".npz"):
            raise AdapterError(
                f"{dst} exists as a {'directory' if dst.is_dir() else 'file'}; "
                "refusing to replace it with the other kind"
            )


def _default_mode(directory: bool) -> int:
    """What a plain open()/mkdir() would give: mkstemp/mkdtemp create private (0600/0700) paths."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_adapter(adapter: Adapter, dst: Path, fmt: str, force: bool = False) -> Path:
    """Write `adapter` to `dst` in `fmt` ('mlx', 'npz', 'peft') atomically (temp beside dst + rename)."""
    if fmt not in FORMATS:
        raise AdapterError(f"unknown adapter format {fmt!r}; expected one of {', '.join(FORMATS)}")
    dst = Path(dst)
    _claim(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".npz", dir=dst.parent)
        tmp = Path(name)
        try:
            arrays = dict(adapter.tensors)
            arrays[NPZ_CONFIG_KEY] = np.frombuffer(json.dumps(adapter.config).encode(), dtype=np.uint8)
            os.fchmod(fd, _default_mode(False))
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            replace_path(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dst
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        tmp.chmod(_default_mode(True))
        if fmt == "mlx":
            write_safetensors(tmp / MLX_WEIGHTS, adapter.tensors, {"format": "mlx"})
            (tmp / MLX_CONFIG).write_text(json.dumps(adapter.config, indent=2) + "\n")
        else:
            config, tensors, meta = to_peft(adapter)
            write_safetensors(tmp / PEFT_WEIGHTS, tensors, meta)
            (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        replace_path(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def target_format(src_fmt: str, dst: Path, to: str | None = None) -> str:
    """The output format: `to` if given, '.npz' suffix -> npz, otherwise the other directory format
    (mlx -> peft, peft -> mlx, npz -> mlx)."""
    if to:
        if to not in FORMATS:
            raise AdapterError(f"unknown target format {to!r}; expected one of {', '.join(FORMATS)}")
        if to == "npz" and Path(dst).suffix != ".npz":
            raise AdapterError(f"{dst} must end in .npz for --to npz")
        if to != "npz" and Path(dst).suffix == ".npz":
            raise AdapterError(f"{dst} ends in .npz but --to is {to}; expected a directory name")
        return to
    if Path(dst).suffix == ".npz":
        return "npz"
    return "peft" if src_fmt == "mlx" else "mlx"


def convert(
    src: Path, dst: Path, to: str | None = None, force: bool = False, base_model: str | None = None
) -> tuple[str, str]:
    """Convert the adapter at `src` into `dst`; returns (source format, target format)."""
    src, dst = Path(src), Path(dst)
    src_fmt = detect_format(src)
    fmt = target_format(src_fmt, dst, to)
    if src.resolve() == dst.resolve():
        raise AdapterError(f"{dst} is the source itself; choose another destination")
    _claim(dst, force)  # fail before reading anything
    adapter = read_adapter(src)
    if base_model:
        adapter.base_model = base_model
    write_adapter(adapter, dst, fmt, force=force)
    log.info("converted %s (%s) -> %s (%s), %d tensors", src, src_fmt, dst, fmt, len(adapter.tensors))
    return src_fmt, fmt


# ----------------------------------------------------------------------------------------------------------
# show
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AdapterInfo:
    path: Path
    format: str
    rank: int
    scale: float
    dropout: float
    keys: list[str]
    num_layers: int
    layers: list[int]
    tensors: int
    tensor_bytes: int
    file_bytes: int
    dtypes: list[str]


@dataclass
class CheckpointInfo:
    path: Path
    step: int | None
    version: int | None
    adapter: AdapterInfo | None
    metrics: dict = field(default_factory=dict)
    latest: bool = False
    problem: str | None = None


def adapter_info(path: Path) -> AdapterInfo:
    """What `show` prints for one adapter; reads only safetensors headers for the directory formats."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "npz":
        a = read_adapter(path)
        shapes = {k: (v.shape, dtype_label(v), v.nbytes) for k, v in a.tensors.items()}
        config, file_bytes = a.config, path.stat().st_size
    else:
        weights = path / (MLX_WEIGHTS if fmt == "mlx" else PEFT_WEIGHTS)
        entries, meta = safetensors_header(weights)
        if fmt == "mlx":
            config = _check_lora_config(_read_json(path / MLX_CONFIG), path)
            names = list(entries)
        else:
            names = [_mlx_name(k, path) for k in entries]
            config = peft_config_to_mlx(_read_json(path / PEFT_CONFIG), names, meta, path)
        shapes = {
            n: (tuple(e["shape"]), dtype_label(e["dtype"]), e["data_offsets"][1] - e["data_offsets"][0])
            for n, e in zip(names, entries.values())
        }
        # only the adapter's own files: a checkpoint dir also holds optimizer state
        file_bytes = weights.stat().st_size + (path / MLX_CONFIG).stat().st_size
    p = config["lora_parameters"]
    return AdapterInfo(
        path=path,
        format=fmt,
        rank=int(p["rank"]),
        scale=float(p["scale"]),
        dropout=float(p.get("dropout", 0.0)),
        keys=list(p.get("keys") or module_paths(shapes)),
        num_layers=int(config["num_layers"]),
        layers=layer_indices(shapes),
        tensors=len(shapes),
        tensor_bytes=sum(s[2] for s in shapes.values()),
        file_bytes=file_bytes,
        dtypes=sorted({s[1] for s in shapes.values()}),
    )


def human_size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _size(n: int) -> str:
    return f"{n} B ({human_size(n)})" if n >= 1000 else f"{n} B"


def _num(v, fmt: str = "{:.4g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def format_adapter(info: AdapterInfo) -> str:
    rows = [
        ("path", str(info.path)),
        ("format", info.format),
        ("rank", str(info.rank)),
        ("scale", f"{info.scale:g}"),
        ("dropout", f"{info.dropout:g}"),
        ("targets", ", ".join(info.keys)),
        ("num_layers", f"{info.num_layers} (tensors in layers {_ranges(info.layers)})"),
        ("tensors", str(info.tensors)),
        ("tensor bytes", _size(info.tensor_bytes)),
        ("size on disk", _size(info.file_bytes)),
        ("dtype", ", ".join(info.dtypes)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}-{xs[-1]}" if len(xs) > 1 else str(xs[0])
    return ",".join(map(str, xs))


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def read_metrics_by_step(run: Path) -> dict[int, dict]:
    """{step: record} from RUN/metrics.jsonl, skipping malformed lines (the report lists those)."""
    out = {}
    path = Path(run) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "eval_reward" not in rec:  # not evals
                out[rec["step"]] = rec
    return out


def run_checkpoints(run: Path) -> list[CheckpointInfo]:
    """Every step_* checkpoint of a run, oldest first, with its adapter, state and metrics; broken ones carry a
    `problem` instead of failing the listing."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    try:
        latest = (root / "latest").read_text().strip()
    except OSError:
        latest = None
    by_step = read_metrics_by_step(run)
    found = []
    for p in root.iterdir():
        m = re.match(r"^step_(\d+)$", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    out = []
    for dir_step, p in sorted(found):
        ck = CheckpointInfo(path=p, step=dir_step, version=None, adapter=None, latest=(p.name == latest))
        try:
            ck.adapter = adapter_info(p)
        except (AdapterError, FileNotFoundError, KeyError, TypeError, ValueError) as e:
            ck.problem = str(e)
        state_path = p / "state.json"
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
                ck.step = int(state.get("step", dir_step))
                ck.version = state.get("version")
                ck.metrics = dict(state.get("metrics") or {})
            except (OSError, ValueError, TypeError) as e:
                ck.problem = ck.problem or f"unreadable state.json ({e})"
        else:
            ck.problem = ck.problem or "missing state.json"
        # The learner stores the step's metrics in state.json; metrics.jsonl fills in anything missing there.
        for k, v in by_step.get(ck.step, {}).items():
            ck.metrics.setdefault(k, v)
        if ck.version is None:
            ck.version = ck.metrics.get("version")
        out.append(ck)
    return out


def format_run(run: Path, checkpoints: list[CheckpointInfo]) -> str:
    root = Path(run) / "checkpoints"
    try:
        latest = (root / "latest").read_text().strip()
    except OSError:
        latest = None
    head = ["step", "version", "rank", "targets", "size", "reward_mean", "loss", "kl", "latest"]
    rows = []
    for ck in checkpoints:
        a = ck.adapter
        rows.append(
            [
                str(ck.step),
                str(ck.version) if ck.version is not None else "-",
                str(a.rank) if a else "-",
                ",".join(k.rsplit(".", 1)[-1] for k in a.keys) if a else "-",
                human_size(a.file_bytes) if a else "-",
                _num(ck.metrics.get("reward_mean")),
                _num(ck.metrics.get("loss")),
                _num(ck.metrics.get("kl")),
                "*" if ck.latest else ("BROKEN: " + ck.problem if ck.problem else ""),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [f"run {run}: {len(checkpoints)} checkpoint(s)"]
    if rows:
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if latest is None:
        lines.append("latest: (no checkpoints/latest file)")
    elif not any(ck.latest for ck in checkpoints):
        lines.append(f"latest: {latest} (named in checkpoints/latest but not present)")
    else:
        lines.append(f"latest: {latest}")
    return "\n".join(lines)


def show(path: Path) -> str:
    """A readable table for an adapter (any format), a checkpoint dir, or a run dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        fmt = detect_format(path)
    except AdapterError:
        fmt = None
    if fmt:
        text = format_adapter(adapter_info(path))
        state = path / "state.json"
        if state.is_file():  # a checkpoint dir: add its step and metrics
            try:
                s = json.loads(state.read_text())
                m = s.get("metrics") or {}
                text += (
                    f"\ncheckpoint    step {s.get('step')}, version {s.get('version')}, reward_mean "
                    f"{_num(m.get('reward_mean'))}, loss {_num(m.get('loss'))}, kl {_num(m.get('kl'))}"
                )
            except (OSError, ValueError):
                pass
        return text
    if is_run_dir(path):
        return format_run(path, run_checkpoints(path))
    raise AdapterError(
        f"{path} is neither an adapter (adapters.safetensors or adapter_model.safetensors with "
        f"adapter_config.json, or a .npz) nor a run directory (with checkpoints/ or metrics.jsonl)"
    )


# ----------------------------------------------------------------------------------------------------------
# CLI handlers (wired in runner.cli)
# ----------------------------------------------------------------------------------------------------------


def report_error(e: Exception) -> int:
    print(f"runner: error: {e}", file=sys.stderr)
    return 2


def cmd_show(args: argparse.Namespace) -> int:
    try:
        print(show(Path(args.path)))
    except (AdapterError, FileNotFoundError) as e:
        return report_error(e)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        src_fmt, fmt = convert(Path(args.src), Path(args.dst), to=args.to, force=args.force, base_model=args.base_model)
    except (AdapterError, FileNotFoundError, FileExistsError) as e:
        return report_error(e)
    print(f"converted {args.src} ({src_fmt}) -> {args.dst} ({fmt})")
    return 0
