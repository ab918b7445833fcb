"""SmolLM2-135M-Instruct GGUF -> mlx-lm conversion (workers/gguf.py).

The slow tests load and run the real 135M model (~2-5 tok/s on the CPU backend), so generation is kept short.
"""

from pathlib import Path

import pytest

from workers.gguf import convert_gguf_to_mlx, prepare_smollm2

QUESTION = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="module")
def loaded(smollm2_dir: Path):
    import mlx_lm

    return mlx_lm.load(str(smollm2_dir))


def test_refuses_non_empty_out_dir_without_force(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    # The GGUF path does not exist: the refusal must come before any loading.
    with pytest.raises(FileExistsError, match="force=True"):
        convert_gguf_to_mlx(tmp_path / "missing.gguf", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"


@pytest.mark.slow
def test_loads_with_gguf_quantization_kept(loaded) -> None:
    import mlx.nn as nn

    model, _ = loaded
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear)
    assert (q_proj.bits, q_proj.group_size) == (4, 32)
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding)
    assert (embed.bits, embed.group_size) == (8, 32)


@pytest.mark.slow
def test_greedy_answer(loaded) -> None:
    import mlx_lm

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, verbose=False)
    assert "5" in text, text


@pytest.mark.slow
def test_transformers_tokenizer_matches_mlx_lm(smollm2_dir: Path, loaded) -> None:
    from transformers import AutoTokenizer

    _, mlx_tokenizer = loaded
    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = hf.encode("Hello world", add_special_tokens=False)
    assert ids == mlx_tokenizer.encode("Hello world", add_special_tokens=False)
    assert hf.decode(ids) == "Hello world"
    # SmolLM2's pre-tokenizer splits digits one by one; a plain GPT-2 byte-level setup would merge them.
    assert len(hf.encode("12345", add_special_tokens=False)) == 5
    assert hf.eos_token == "<|im_end|>"
    assert hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == (
        mlx_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    )
