import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tok():
    from sstoken.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    """A tiny Llama + tokenizer saved as a model folder."""
    from sstoken.testing import tiny_llama

    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tok), layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


WORDS = "the quick brown fox jumps over lazy dog sea is wide blue deep eggs sells rest answer".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_records(n: int, seed: int = 0, multi_turn: bool = False):
    rng = random.Random(seed)
    recs = []
    for k in range(n):
        msgs = [{"role": "user", "content": sentence(rng, rng.randint(2, 8))},
                {"role": "assistant", "content": sentence(rng, rng.randint(1, 10))}]
        if multi_turn and k % 2:
            msgs += [{"role": "user", "content": sentence(rng, 3)},
                     {"role": "assistant", "content": sentence(rng, rng.randint(1, 6))}]
        recs.append({"id": f"ex{k}", "messages": msgs})
    return recs


@pytest.fixture
def records():
    return make_records
