"""A tiny causal LM for the generative student's tests: a randomly initialised Llama-style
model (hidden 64, 2 layers, 4 heads) and a byte-level BPE tokenizer trained here, offline,
in well under a second. Nothing is downloaded::

    model_id = tiny_causal_lm(tmp_path / "tiny")     # "test/tiny-llama", registered
    cfg = TrainConfig(kind="causal_lm", base_model=model_id, ...)

``chat=True`` gives the tokenizer a ChatML chat template, so the student's prompt takes its
``chat`` format; without it the prompt is the plain layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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


def tiny_causal_lm(root: Path, *, chat: bool = False, seed: int = 0) -> str:
    """Build the tiny model and its tokenizer into ``root`` (created), register them as a
    base model and return its logical id (:data:`TINY_LM_ID`, or :data:`TINY_CHAT_LM_ID`
    with ``chat``). Same ``seed``, same weights."""
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
    tokenizer = PreTrainedTokenizerFast(
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

    model_id = TINY_CHAT_LM_ID if chat else TINY_LM_ID
    register_base_model(model_id, lambda: root)
    return model_id
