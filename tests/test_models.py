"""The tiny offline model: deterministic, loadable by mlx-lm and transformers, with a working chat template."""

import mlx.core as mx
import mlx_lm
from transformers import AutoTokenizer

from workers.models import prepare_tiny


def test_tiny_is_deterministic_and_loads(tmp_path):
    a = prepare_tiny(tmp_path / "a", seed=0)
    b = prepare_tiny(tmp_path / "b", seed=0)
    c = prepare_tiny(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    model, tok = mlx_lm.load(str(a))
    assert len(model.layers) == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    logits = model(mx.array(ids)[None])
    assert logits.shape == (1, len(ids), 512)
    assert mlx_lm.generate(model, tok, ids, max_tokens=4) is not None

    hf = AutoTokenizer.from_pretrained(str(a))
    for text in ["Hello world", "What is 12+30? 12 + 30 = 42."]:
        assert hf.encode(text) == tok.encode(text)
        assert hf.decode(hf.encode(text)) == text
    assert tok.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
