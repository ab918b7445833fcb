"""Offline model directories: a tiny random llama for tests and quick runs, and (via `workers.gguf`) SmolLM2-135M.

The tiny model is deterministic from its seed: the same seed gives byte-identical weights and the same tokenizer.
Its tokenizer is a real byte-level BPE (trained here on a fixed built-in corpus), saved in the Hugging Face layout
so mlx-lm and transformers both load it, with a ChatML chat template.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from runner.files import replace_path
from runner.hub import resolve_model

log = logging.getLogger(__name__)

TINY_VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_corpus() -> list[str]:
    """A fixed corpus so the BPE merges (and so every token id) are the same on every machine."""
    words = (
        "the a an and or of to in is it you that he she was for on are with as his they be at one have this from "
        "what which their said if do will each about how up out them then many some so these would other into has "
        "more her two like him see time could no make than first been its who now people my made over did down only "
        "way find use may water long little very after words called just where most know get through back much go "
        "good new write our me man too any day same right look think also around another came come work three word "
        "must because does part even place well such here take why things help put years different away again off "
        "answer question number plus minus equals sum total red green blue cat dog sun moon star yes ok hello world"
    ).split()
    lines = []
    for i in range(400):
        w = [words[(i * 7 + j * 13) % len(words)] for j in range(9)]
        a, b = i % 50, (i * 3) % 50
        lines.append(f"{' '.join(w).capitalize()}. What is {a}+{b}? {a} + {b} = {a + b}.")
    return lines


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Train a byte-level BPE with `vocab_size` entries and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_model_config(vocab_size: int = TINY_VOCAB, eos_token_id: int = 2) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_token_id,
    }


def write_model_dir(out_dir: Path, build, force: bool = False) -> Path:
    """Build a model directory in a temp dir beside `out_dir`, then rename it into place (never half-written)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} already exists and is not empty; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        replace_path(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_tiny(out_dir: Path, seed: int = 0, force: bool = False) -> Path:
    """Write a random llama (hidden 64, 2 layers, vocab 512) with a real BPE tokenizer to `out_dir`."""
    from mlx_lm.models import llama

    def build(tmp: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        tokenizer.save_pretrained(tmp)
        config = tiny_model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))
        mx.random.seed(seed)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    log.info("preparing tiny model in %s (seed %d)", out_dir, seed)
    return write_model_dir(out_dir, build, force=force)


def prepare_model(name: str, out_dir: Path, force: bool = False, seed: int = 0) -> Path:
    """Prepare one of the offline models by name ('tiny' or 'smollm2')."""
    if name == "tiny":
        return prepare_tiny(out_dir, seed=seed, force=force)
    if name == "smollm2":
        from workers.gguf import prepare_smollm2

        return prepare_smollm2(out_dir, force=force)
    raise ValueError(f"unknown model {name!r}; expected 'tiny' or 'smollm2'")


def load_model(name: str | Path, dtype: str = "", what: str = "model"):
    """Load a model by local directory or Hugging Face id (`runner.hub.resolve_model`) with mlx-lm, in `dtype`
    (`[model] dtype`). Returns (model, tokenizer, config, the resolved directory)."""
    from mlx_lm import load

    path = resolve_model(name, what)
    model, tokenizer, config = load(str(path), return_config=True)
    cast_model(model, dtype)
    return model, tokenizer, config, path


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A second module tree over the very same parameter arrays, with no copy of them: MLX arrays are values (an
    update makes a new array and rebinds the attribute), so setting the copy's adapter leaves the original's as it
    was. How the learner's process serves from its own base weights (`[generation] colocate`)."""
    shared = {id(a): a for _, a in tree_flatten(model.parameters())}
    return copy.deepcopy(model, shared)


def cast_model(model, dtype: str) -> None:
    """ "" or "auto": keep the weights as stored. A float dtype: dequantize quantized layers (mlx-lm's own
    `dequantize_model`), then cast every floating parameter. The generation workers and the learner both load
    through here, so the LoRA deltas the learner computes apply to the very weights the workers hold."""
    if dtype in ("", "auto"):
        return
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
