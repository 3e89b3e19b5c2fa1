"""SentencePiece (Llama 2, Mistral, CodeLlama) and tiktoken (Llama 3) tokenizers behind one interface.

:func:`load_tokenizer` picks the implementation from the file's *content*: a tiktoken BPE
file is text, one ``<base64 token> <rank>`` per line; anything else is handed to
SentencePiece.
"""
from __future__ import annotations

import base64
from pathlib import Path

from .config import LlamaError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class Tokenizer:
    """Common interface.  ``stop_ids`` are the ids that end a generated sequence."""

    kind: str = "?"
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError


# ---------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """Llama 2 / Mistral / CodeLlama; chat template of Llama-2-chat."""

    kind = "sentencepiece"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # noqa: BLE001
            raise LlamaError(f"{path} is neither a tiktoken BPE file nor a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.eos_id, 0)
        self.stop_ids = (self.eos_id,) if self.eos_id >= 0 else ()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text, bos=False, eos=False):
        ids = list(self.sp.EncodeAsIds(text))
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        return self.sp.DecodeIds([int(i) for i in ids])

    def encode_chat(self, messages, add_generation_prompt=True):
        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise LlamaError("a system message must be followed by a user message")
            msgs = [{"role": "user",
                     "content": self.B_SYS + msgs[0]["content"] + self.E_SYS + msgs[1]["content"]}] + msgs[2:]
        ids: list[int] = []
        i = 0
        while i < len(msgs):
            if msgs[i]["role"] != "user":
                raise LlamaError("Llama-2 chat expects alternating user / assistant messages")
            user = msgs[i]["content"].strip()
            if i + 1 < len(msgs):
                if msgs[i + 1]["role"] != "assistant":
                    raise LlamaError("Llama-2 chat expects alternating user / assistant messages")
                answer = msgs[i + 1]["content"].strip()
                ids += self.encode(f"{self.B_INST} {user} {self.E_INST} {answer} ", bos=True, eos=True)
                i += 2
            else:
                ids += self.encode(f"{self.B_INST} {user} {self.E_INST}", bos=True)
                i += 1
        return ids


# ---------------------------------------------------------------------------- tiktoken
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL = 256


def llama3_special_tokens() -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL - len(named))]


def read_tiktoken_ranks(path) -> dict[bytes, int] | None:
    """Parse a tiktoken BPE file; None if the content is not one."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError, base64.binascii.Error):
        return None
    return ranks or None


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.1; chat template of Llama-3-instruct."""

    kind = "tiktoken"

    def __init__(self, path, ranks: dict[bytes, int] | None = None):
        import tiktoken
        ranks = ranks if ranks is not None else read_tiktoken_ranks(path)
        if ranks is None:
            raise LlamaError(f"{path} is not a tiktoken BPE file")
        n = len(ranks)
        self.special = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.stop_ids = (self.eos_id, self.eot_id, self.special["<|eom_id|>"])

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text, bos=False, eos=False):
        # special-token strings in user text are encoded as plain text, never as control tokens
        ids = self.enc.encode(text, allowed_special=set(), disallowed_special=())
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def _header(self, role):
        return [self.special["<|start_header_id|>"]] + self.encode(role) + [self.special["<|end_header_id|>"]] \
            + self.encode("\n\n")

    def encode_chat(self, messages, add_generation_prompt=True):
        ids = [self.bos_id]
        for m in messages:
            ids += self._header(m["role"]) + self.encode(m["content"].strip()) + [self.eot_id]
        if add_generation_prompt:
            ids += self._header("assistant")
        return ids


def load_tokenizer(path) -> Tokenizer:
    """Load ``path`` as tiktoken BPE or SentencePiece, decided by the file's content."""
    path = Path(path)
    if not path.is_file():
        raise LlamaError(f"tokenizer file not found: {path}")
    ranks = read_tiktoken_ranks(path)
    if ranks is not None:
        return TiktokenTokenizer(path, ranks)
    return SentencePieceTokenizer(path)
