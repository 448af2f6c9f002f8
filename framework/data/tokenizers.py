"""Tokenizers: bytes (257 ids: the 256 byte values and an end-of-text id) or a Hugging Face
`tokenizers` JSON file; both mark the end of every document with their EOS id.

Why 257 byte ids: every byte value occurs in real UTF-8 text (NUL included), so no byte can
double as a separator; one extra embedding row is the whole cost. Documents are encoded with
special-token parsing off, so a document that contains the text "<|endoftext|>" cannot forge a
boundary; chat rendering (`encode_special`) parses them, since templates write them on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from framework.errors import DataError

BYTE_EOS = 256
# Special tokens that end a text in well-known tokenizers, tried in order when a tokenizer.json
# has no tokenizer_config.json beside it naming its eos_token.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<eos>")


class Tokenizer(Protocol):
    """What the pipeline, the chat renderer and the samplers need from a tokenizer."""

    vocab_size: int
    eos_id: int | None  # None: a tokenizer file without one (prompts only, no documents)
    name: str  # "byte" or the tokenizer file's path
    fingerprint: str  # identifies the vocabulary (prepare_data records it; the loader checks it)

    def encode(self, text: str) -> list[int]: ...

    def encode_docs(self, docs: Sequence[bytes | str]) -> np.ndarray: ...

    def encode_special(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _text(doc: bytes | str) -> str:
    return doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    """Each UTF-8 byte is a token (ids 0-255), 256 ends a document: no vocabulary file, no
    unknown tokens."""

    vocab_size = 257
    eos_id = BYTE_EOS
    name = "byte"
    fingerprint = "byte-257"

    def encode_docs(self, docs: Sequence[bytes | str]) -> np.ndarray:
        """One uint16 stream: each document's bytes followed by EOS."""
        raw = [d.encode("utf-8") if isinstance(d, str) else d for d in docs]
        ends = np.cumsum([len(d) for d in raw], dtype=np.int64)
        flat = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.uint16)
        return np.insert(flat, ends, np.uint16(BYTE_EOS))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOS)."""
        return list(text.encode("utf-8"))

    encode_special = encode  # bytes have no special tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: EOS and any id above 255 are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; its EOS comes from `eos_token` (a token string),
    else tokenizer_config.json beside the file, else a well-known end-of-text special token."""

    def __init__(self, path: str, eos_token: str | None = None):
        import tokenizers  # imported only when a tokenizer file is used

        if not Path(path).is_file():
            raise DataError(f"tokenizer file {path!r} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
            self._docs = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises its own exception type
            raise DataError(f"tokenizer file {path!r} could not be loaded: {e}") from e
        self._docs.encode_special_tokens = True  # document text never makes special tokens
        self.name = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.fingerprint = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        self.eos_id = self._find_eos(Path(path), eos_token)
        self.config = tokenizer_config(Path(path))

    def _find_eos(self, path: Path, eos_token: str | None) -> int | None:
        if eos_token is not None:
            eos = self._tok.token_to_id(eos_token)
            if eos is None:
                raise DataError(f"data.eos_token {eos_token!r} is not a token of {str(path)!r}")
            return eos
        name = tokenizer_config(path).get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        if isinstance(name, str) and self._tok.token_to_id(name) is not None:
            return self._tok.token_to_id(name)
        for candidate in EOS_NAMES:
            eos = self._tok.token_to_id(candidate)
            if eos is not None:
                return eos
        return None  # fine for prompts; documents need one (encode_docs says so)

    def encode_docs(self, docs: Sequence[bytes | str]) -> np.ndarray:
        """One token stream: each document encoded separately (in parallel, with the
        tokenizer's own BOS if it adds one), followed by EOS."""
        if self.eos_id is None:
            raise DataError(
                f"tokenizer {self.name!r} has no end-of-text token (no eos_token in a "
                f"tokenizer_config.json beside it, none of {', '.join(EOS_NAMES)}): "
                "set data.eos_token"
            )
        if not docs:
            return np.zeros(0, token_dtype(self.vocab_size))
        encoded = self._docs.encode_batch([_text(d) for d in docs])
        lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
        flat = np.fromiter(
            (i for e in encoded for i in e.ids), dtype=np.int64, count=int(lengths.sum())
        )
        stream = np.insert(flat, np.cumsum(lengths), self.eos_id)
        return stream.astype(token_dtype(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (a prompt: with the tokenizer's BOS, if it adds one; no EOS)."""
        return list(self._tok.encode(text).ids)

    def encode_special(self, text: str) -> list[int]:
        """Token ids of rendered chat text: special tokens parsed, no BOS/EOS added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self._tok.decode([int(i) for i in ids])


def tokenizer_config(tokenizer_file: Path) -> dict:
    """tokenizer_config.json beside a tokenizer.json ({} if absent; DataError if unreadable)."""
    side = tokenizer_file.parent / "tokenizer_config.json"
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(side)!r} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """'byte' or a path to a HF tokenizers JSON file -> a tokenizer (DataError if unusable)."""
    if spec == "byte":
        if eos_token is not None:
            raise DataError("data.eos_token applies to tokenizer files; the byte EOS is id 256")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)
