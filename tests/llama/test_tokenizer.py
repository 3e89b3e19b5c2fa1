import io

import pytest

from fastzoo.llama.config import LlamaError
from fastzoo.llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello, my name is Llama and I like to talk.",
        "Once upon a time there was a little girl who loved stories.", "Numbers 123 and 4567 appear here!"] * 20


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_sentencepiece_chosen_by_content_and_roundtrip(sp_file):
    tok = load_tokenizer(sp_file)
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("Hello, my name is Llama", bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert tok.decode(ids[1:-1]) == "Hello, my name is Llama"
    assert tok.stop_ids == (2,)


def test_llama2_chat_template(sp_file):
    tok = load_tokenizer(sp_file)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    ids = tok.encode_chat(msgs)
    first = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello ", bos=True, eos=True)
    assert ids == first + tok.encode("[INST] Again [/INST]", bos=True)
    with pytest.raises(LlamaError):
        tok.encode_chat([{"role": "assistant", "content": "x"}])


def test_tiktoken_chosen_by_content(tiktoken_file):
    tok = load_tokenizer(tiktoken_file)
    assert isinstance(tok, TiktokenTokenizer)
    n = 320
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.eot_id == n + 9
    assert tok.vocab_size == n + 256
    text = "hello world, the quick brown fox! ünïcode"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text
    assert len(ids) - 1 < len(text.encode())  # merges were used
    # special-token text in user input is not a control token
    assert tok.bos_id not in tok.encode("<|begin_of_text|>")
    assert set(tok.stop_ids) == {n + 1, n + 8, n + 9}


def test_llama3_chat_template(tiktoken_file):
    tok = load_tokenizer(tiktoken_file)
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    sp = tok.special
    expect = ([tok.bos_id, sp["<|start_header_id|>"]] + tok.encode("system") + [sp["<|end_header_id|>"]]
              + tok.encode("\n\n") + tok.encode("Be brief.") + [tok.eot_id]
              + [sp["<|start_header_id|>"]] + tok.encode("user") + [sp["<|end_header_id|>"]]
              + tok.encode("\n\n") + tok.encode("hello") + [tok.eot_id]
              + [sp["<|start_header_id|>"]] + tok.encode("assistant") + [sp["<|end_header_id|>"]] + tok.encode("\n\n"))
    assert ids == expect
    text = tok.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_real_llama2_tokenizer(shared_data):
    path = shared_data / "llama2-tokenizer.model"
    if not path.is_file():
        pytest.skip("llama2-tokenizer.model not in shared data")
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello, my name is") == [15043, 29892, 590, 1024, 338]
    assert tok.encode("Hello, my name is", bos=True)[0] == 1 and tok.eos_id == 2
    assert tok.decode([15043, 29892, 590, 1024, 338]) == "Hello, my name is"


def test_missing_or_garbage_tokenizer(tmp_path):
    with pytest.raises(LlamaError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(LlamaError):
        load_tokenizer(bad)
