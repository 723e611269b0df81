"""
Tokenizers of the token shards written by dev/data/prepare.py, loaded back from the folder the
shards are in, to turn ids back into text (and text into ids):

    from tokenizer import load_tokenizer      # with dev/data on sys.path
    tok = load_tokenizer("data/kjv")          # reads meta.json, and tokenizer.json unless bytes
    ids = tok.encode("In the beginning")      # -> list[int]
    text = tok.decode(ids)                    # -> str

Kinds (meta.json "tokenizer" -> "kind"):
  bytes            UTF-8 bytes: ids 0..255, and 256 for the document separator when there is one,
                   and after it the padding token of one document per row (prepare.py --rows).
                   Needs nothing beyond numpy.
  bpe, hf, gpt2    a Hugging Face tokenizer.json beside the shards, run by the `tokenizers`
                   library (PyPI; see prepare.py for installing it).

The document separator (meta.json "separator_id", null when documents are not separated) decodes
to its token text, "<|endoftext|>" for bytes and bpe, or to nothing with skip_separator=True.
encode() never produces it: prepare.py puts it before each document itself.
"""

import json
import os

import numpy as np

SEPARATOR = "<|endoftext|>"   # the text of the document separator (GPT-2's end-of-text token)
INSTALL_TOKENIZERS = "/usr/bin/python3 -m pip install --break-system-packages --no-deps 'tokenizers>=0.19'"


class DataError(Exception):
    """Bad input to the data tools: prepare.py prints it as `error: ...` and exits with status 1."""


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("this tokenizer needs the Hugging Face 'tokenizers' library, which is not "
                        f"installed; install it with: {INSTALL_TOKENIZERS}") from None
    return tokenizers


class ByteTokenizer:
    """UTF-8 bytes; id 256 is the document separator when `separator` is set; with `padding` the
    next id is the padding token (prepare.py --rows), which decodes to nothing."""

    kind = "bytes"

    def __init__(self, separator=True, padding=False):
        self.separator_id = 256 if separator else None
        self.vocab_size = 257 if separator else 256
        self.pad_id = None
        if padding:
            self.add_padding()

    def add_padding(self):
        self.pad_id = self.vocab_size
        self.vocab_size += 1

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_bytes(self, data):
        """UTF-8 bytes -> np.uint16 ids, the fast path prepare.py uses."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids, skip_separator=False):
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise DataError(f"token id {bad} is outside the byte vocabulary (0..{self.vocab_size - 1})")
        if self.pad_id is not None:
            ids = ids[ids != self.pad_id]
        sep = b"" if skip_separator else SEPARATOR.encode("utf-8")
        out = bytearray()
        start = 0
        for at in np.flatnonzero(ids == 256):
            out += ids[start:at].astype(np.uint8).tobytes() + sep
            start = at + 1
        out += ids[start:].astype(np.uint8).tobytes()
        # a cut through a multi-byte character (the first N tokens of a shard) shows as U+FFFD
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`, without the special tokens its post-processor adds."""

    def __init__(self, tokenizer, kind, separator_id=None):
        self.tokenizer = tokenizer
        self.kind = kind
        self.separator_id = separator_id
        # "<|endoftext|>" written in the text is text, as with tiktoken's encode_ordinary: only
        # prepare.py puts separators between documents (the library matches special tokens in
        # the input otherwise)
        tokenizer.encode_special_tokens = True
        # ids run up to the largest one in use (added tokens included), whatever the count says
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path, kind, separator_id=None):
        tokenizers = import_tokenizers()
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:   # the library raises plain Exception for a malformed file
            raise DataError(f"cannot read the tokenizer '{path}': {e}") from None
        return cls(tokenizer, kind, separator_id)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """-> one list of ids per text (the library runs them on all cores)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_separator=False):
        ids = [int(i) for i in ids]
        if skip_separator and self.separator_id is not None:
            ids = [i for i in ids if i != self.separator_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"no meta.json in '{data_dir}': not a folder written by dev/data/prepare.py")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}': {e}") from None


def load_tokenizer(data_dir):
    """The tokenizer prepare.py saved in data_dir (a ByteTokenizer or an HFTokenizer)."""
    meta = read_meta(data_dir)
    info = meta.get("tokenizer", {})
    kind = info.get("kind")
    separator_id = meta.get("separator_id")
    if kind == "bytes":
        return ByteTokenizer(separator=separator_id is not None, padding=meta.get("pad_id") is not None)
    if kind in ("bpe", "hf", "gpt2"):
        path = os.path.join(data_dir, info.get("file") or "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"meta.json names a {kind} tokenizer, but '{path}' is missing")
        return HFTokenizer.from_file(path, kind, separator_id)
    raise DataError(f"'{data_dir}/meta.json': unknown tokenizer kind {kind!r}")
