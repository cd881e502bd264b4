"""A tiny causal LM for the generative student's tests: a randomly initialised Llama-style
model (hidden 64, 2 layers, 4 heads) and a byte-level BPE tokenizer trained here, offline,
in seconds. Nothing is downloaded::

    model_id = tiny_causal_lm(tmp_path / "tiny")     # "test/tiny-llama", registered
    cfg = TrainConfig(kind="causal_lm", base_model=model_id, ...)

``chat=True`` gives the tokenizer a ChatML chat template, so the student's prompt takes its
``chat`` format; without it the prompt is the plain layout. :func:`tiny_gguf_lm` writes the
same model as a single GGUF file, as llama.cpp's converter would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TINY_LM_ID = "test/tiny-llama"
TINY_CHAT_LM_ID = "test/tiny-llama-chat"

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = """
play some jazz by nina simone book a table for two in paris tonight what is the
weather in berlin tomorrow add this song to my road trip playlist rate the book
five stars find the movie schedule near me intent slots artist city date genre
party size playlist rating object name restaurant time range music item
"""


def _corpus() -> Iterator[str]:
    """A few hundred strings: words, JSON punctuation, digits and the prompt layouts."""
    words = _WORDS.split()
    for i, w in enumerate(words):
        v = words[(i * 7) % len(words)]
        yield f"{w} {v} {i}"
        yield json.dumps({"intent": w, "slots": {v: [f"{w} {v}"]}}, separators=(",", ":"))
        yield f"Instructions:\nAnswer in JSON.\n\nInput:\n{w} {v}\n\nOutput:\n"
    for n in range(200):
        yield f'{{"n":{n},"x":["{words[n % len(words)]}"]}} {n * 37 % 1000}'


def tiny_causal_lm(
    root: Path, *, chat: bool = False, seed: int = 0, model_id: str | None = None
) -> str:
    """Build the tiny model and its tokenizer into ``root`` (created), register them as a
    base model and return its logical id (``model_id``; by default :data:`TINY_LM_ID`, or
    :data:`TINY_CHAT_LM_ID` with ``chat``). Same ``seed``, same weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kolm_compile.base_models import register_base_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        pad_token="<pad>",
    )
    if chat:
        tokenizer.chat_template = _CHATML
    tokenizer.save_pretrained(str(root))

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(root), safe_serialization=True)

    model_id = model_id or (TINY_CHAT_LM_ID if chat else TINY_LM_ID)
    register_base_model(model_id, lambda: root)
    return model_id


TINY_GGUF_LM_ID = "test/tiny-llama-gguf"
TINY_GGUF_SOURCE_ID = "test/tiny-llama-gguf-source"


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order (transformers undoes it when it reads a llama GGUF)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_gguf_lm(root: Path, *, seed: int = 0) -> str:
    """The tiny model of :func:`tiny_causal_lm` written as one float32 GGUF file
    ``root/gguf/tiny.gguf`` (llama architecture, byte-level BPE vocabulary in its metadata),
    the way llama.cpp's converter writes it; registered as :data:`TINY_GGUF_LM_ID`, which
    resolves to the file. The Hugging Face folder it was made from, ``root/hf``, is
    registered as :data:`TINY_GGUF_SOURCE_ID`: the two compute the same function."""
    import gguf
    from safetensors.numpy import load_file

    from kolm_compile.base_models import register_base_model

    root = Path(root)
    tiny_causal_lm(root / "hf", seed=seed, model_id=TINY_GGUF_SOURCE_ID)
    cfg = json.loads((root / "hf" / "config.json").read_text())
    tok = json.loads((root / "hf" / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [""] * (len(vocab) + len([s for s in specials if s not in vocab]))
    for t, i in {**vocab, **specials}.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    n_head = cfg["num_attention_heads"]

    path = root / "gguf" / "tiny.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(specials["<s>"])
    w.add_eos_token_id(specials["</s>"])
    w.add_pad_token_id(specials["<pad>"])
    w.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for name, t in load_file(str(root / "hf" / "model.safetensors")).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute(t, n_head)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        w.add_tensor(gguf_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    register_base_model(TINY_GGUF_LM_ID, lambda: path)
    return TINY_GGUF_LM_ID
