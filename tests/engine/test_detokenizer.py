"""Incremental detokenization: the direct decoder equals transformers' decode, and text built
token by token equals the whole decode."""

import random

import pytest

from specserve.engine.detokenizer import IncrementalDetokenizer, decoder


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm.tokenizer


def test_the_direct_decoder_equals_transformers_decode(tokenizer):
    fast = decoder(tokenizer)
    assert fast.func == tokenizer._tokenizer.decode  # the default model's tokenizer takes the direct path
    rng = random.Random(0)
    text_ids = tokenizer.encode("Paris, c'est la capitale. Ça va? 東京 ü  x\n\tdef f():\n    return 1 <|im_end|>")
    cases = [text_ids[i:j] for i in range(len(text_ids)) for j in range(i, len(text_ids) + 1)]
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 8))] for _ in range(3000)]
    for ids in cases:
        assert fast(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_a_tokenizer_that_cleans_up_spaces_or_decodes_its_own_way_keeps_its_decode():
    class CleaningUp:
        clean_up_tokenization_spaces = True
        _tokenizer = object()

        def decode(self, ids, skip_special_tokens):
            return f"decoded {ids} {skip_special_tokens}"

    assert decoder(CleaningUp())([1, 2]) == "decoded [1, 2] True"

    class Rust:
        def decode(self, ids, skip_special_tokens):
            return "rust"

    class OwnDecode:  # a tokenizer class with its own decode (post-processing the Rust text)
        clean_up_tokenization_spaces = False
        _tokenizer = Rust()

        def decode(self, ids, skip_special_tokens):
            return "own"

    assert decoder(OwnDecode())([1]) == "own"


def test_text_built_token_by_token_is_the_whole_decode_and_stops_at_a_stop_string(tokenizer):
    ids = tokenizer.encode(" The answer: 東京 is big. Stop here, then more text.")
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    for token in ids:
        detok.append([token])
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=("Stop",))
    for token in ids:
        detok.append([token])
    assert detok.stop_hit == "Stop" and detok.text == " The answer: 東京 is big. "
