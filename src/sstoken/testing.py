"""A tiny Llama and a byte-level BPE tokenizer built in code (no downloads).

Used by the tests and by the CPU smoke run of the benchmark. The tokenizer is trained in
memory on a few sentences, so it is fast, deterministic and has an offset mapping.
"""

from __future__ import annotations

import functools

import torch

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is 2 + 3? Answer: 2 + 3 = 5. So the answer is 5.",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Janet has 16 eggs. She eats 3 and sells the rest for $2 each.",
    "<|user|>\n<|assistant|>\n<|system|>\n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>|#$%&*+-=/\\_",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fast tokenizer (~300 tokens) with eos ``<|im_end|>``, pad ``<pad>`` and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<pad>", unk_token=None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int = 300, layers: int = 2, hidden: int = 32, heads: int = 4,
               kv_heads: int = 2, seed: int = 0, attn_implementation: str = "sdpa",
               dtype: torch.dtype = torch.float32, tie: bool = False):
    """A random Llama with GQA (``heads`` query heads share ``kv_heads`` key heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model


def free_port() -> int:
    """A TCP port free on this machine now (for a test's torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
