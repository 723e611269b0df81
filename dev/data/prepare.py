"""
Data preparation: text -> llm.c token shards for ./train, with the tokenizer saved beside them.

    python3 dev/data/prepare.py --corpus kjv --out data/kjv                       # UTF-8 bytes
    python3 dev/data/prepare.py --corpus kjv --tokenizer bpe --vocab-size 4096 --out data/kjv-bpe
    python3 dev/data/prepare.py a.txt b.txt --tokenizer hf:/path/to/t5-base --out data/t5
    python3 dev/data/prepare.py c4/c4-train.0000[0-7]-of-01024.json.gz --tokenizer hf:/path/to/t5-base --out data/c4
    python3 dev/data/prepare.py c4/c4-train.0000[0-7]-of-01024.json.gz --tokenizer hf:/path/to/t5-base \
        --rows 256 --out data/c4-rows      # one document per row, as the paper's data: ./train --pad-id
    python3 dev/data/prepare.py decode --data data/kjv val_000000.bin --count 200

Output folder: train_000000.bin, train_000001.bin, ..., val_000000.bin, ... (llm.c shards, written
by dev/reference.py's shard_save: uint16 ids when the vocabulary has at most 65536 entries, else
uint32), tokenizer.json (except for bytes) and meta.json (tokenizer, vocab size, separator id,
token counts, sources, split). Earlier shards, tokenizer.json and meta.json there are replaced.

Documents: each text file is one document, and so is each book of the KJV. A JSON Lines file
(.jsonl or .json, plain or gzip-compressed .gz, as C4's files come) holds one document a record:
one JSON object per line, its text in the field --text-field names ("text" by default); blank
lines and empty texts are skipped, and a line that is not such an object stops the run with its
number. Such a file is read once for its size before anything is written. The document
separator <|endoftext|> goes before every document (as llm.c does with GPT-2's), unless
--no-separator: id 256 for bytes (vocab 257), a special token of the trained BPE (id 0), the
tokenizer's own end-of-text token for hf:/gpt2: (the first of <|endoftext|>, <|end_of_text|>, </s>,
<eos> it has; none -> no separator).

Split: the validation split is the end of the corpus (files in the order given): it starts at the
first line start at or after (1 - val_fraction) of the corpus's UTF-8 bytes, so no line is cut
and train + val is the whole text. Deterministic; for the KJV it is the end of the New Testament.
--val-fraction 1 makes all of it validation: a validation set of its own (C4's validation files),
prepared with the tokenizer the training data was (hf:THAT_FOLDER/tokenizer.json).
The BPE is trained on the train split only. Each split is cut into shards of at most
--shard-tokens tokens; the last two shards are evened out when the last would hold less than
half, so that no shard is a sliver smaller than the B*T+1 tokens one batch of ./train needs.

One document per row (--rows R), as the paper trained (its C4 documents truncated or padded to 256
tokens): each document becomes one row of R tokens, its first R - 1 tokens and the end-of-text
separator (its first R where there is none), then the padding token to the end. The padding
token is the tokenizer's own (<pad>, [PAD], <|pad|> or <|padding|>: t5-base's <pad> is id 0),
or one added after its last id: <|pad|>, saved with the tokenizer (bytes: id 257, or 256 without
a separator). Only a document's start is tokenized. Validation takes whole documents: those that
start at or after (1 - val_fraction) of the corpus's bytes. Shards hold whole rows. meta.json
records "rows" and "pad_id", which ./train checks against its --seq-len and --pad-id (the loader
then trains on no target after a row's end), "rows_count" and "rows_truncated" (documents cut short).

Tokenizers (--tokenizer):
  bytes        UTF-8 bytes, vocab 256 (+1 for the separator).
  bpe          a byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained on the corpus by
               the Hugging Face `tokenizers` library, --vocab-size entries (default 4096).
  hf:PATH      a local Hugging Face tokenizer.json, or a folder holding one; copied beside the
               shards. Encoded without the special tokens its post-processor would add. Its own
               normalizer decides whether decode gives the text back exactly (t5-base does not).
  gpt2:PATH    GPT-2's BPE from local files: a folder with vocab.json + merges.txt (or vocab.json
               itself, merges.txt beside it), or a tiktoken ranks file (.tiktoken: base64 token,
               rank per line; merges derived from the ranks). Byte-level with GPT-2's
               pre-tokenizer regex (exact for gpt2/r50k, approximate for later tiktoken files).
               Saved as tokenizer.json; <|endoftext|> is added after the last rank if missing.
The `tokenizers` library comes from PyPI (nothing is fetched from a hub, ever):
    /usr/bin/python3 -m pip install --break-system-packages --no-deps 'tokenizers>=0.19'
(--no-deps: its one dependency, huggingface_hub, only serves from_pretrained, which is not used.)

KJV (--corpus kjv): the Debian package bible-kjv-text holds the text compressed in the format of
its reader program `bible` (package bible-kjv, /usr/lib/bible.data); both are installed with
apt-get when missing (as root). `bible` prints chapter headings ("Genesis 1") and numbered verses
("  1 In the beginning ..."); headings and verse numbers are dropped and each book becomes a
document: its name, a blank line, then its chapters (one verse a line) separated by blank lines.

Long documents are tokenized in pieces of about 1 MB that end at a line end; byte-level and
word-level tokenizers may split differently at a piece boundary than in one piece, and still
decode back to the same text.
"""

import argparse
import base64
import glob
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer import (SEPARATOR, ByteTokenizer, DataError, HFTokenizer,  # noqa: E402
                       import_tokenizers, load_tokenizer)

DEV_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECE_BYTES = 1 << 20          # documents are read and tokenized in pieces of about this size
BATCH_PIECES = 16              # pieces tokenized together (in parallel by the tokenizers library)
MAX_SHARD_TOKENS = 2**31 - 1   # the shard header holds the count as an int32
HF_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")   # read as JSON Lines, a document a record


def reference():
    """dev/reference.py, for shard_save/shard_load (imported late: it brings in torch)."""
    if DEV_DIR not in sys.path:
        sys.path.insert(0, DEV_DIR)
    import reference as ref
    return ref


def token_dtype_for(vocab_size):
    """Shard token type: ids up to 65535 fit uint16 (llm.c's version 1), beyond that uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"


# -----------------------------------------------------------------------------
# progress on stderr: tqdm when installed, else a line of our own


class Progress:
    def __init__(self, total, desc):
        self.total, self.desc, self.done = max(total, 1), desc, 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.tty and time.time() - self.last > 0.2:
            self.last = time.time()
            sys.stderr.write("\r" + self.line())
            sys.stderr.flush()

    def line(self):
        rate = self.done / max(time.time() - self.start, 1e-9) / 1e6
        return (f"{self.desc}: {100 * self.done / self.total:3.0f}% "
                f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB {rate:.1f} MB/s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write(("\r" if self.tty else "") + self.line() + "\n")


# -----------------------------------------------------------------------------
# sources of documents: a name, a UTF-8 size, how many documents, and pieces of bytes that end at
# line ends (but a document's last), each with whether it starts a document


class Document:
    def __init__(self, name, nbytes, pieces, count=1):
        self.name, self.nbytes, self._pieces, self.count = name, nbytes, pieces, count

    def pieces(self):
        """-> (starts a document, bytes) for every piece in order"""
        return self._pieces()


def line_pieces(data):
    """data in pieces of about PIECE_BYTES that end at a line end (or data's end)"""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start + PIECE_BYTES)
        end = len(data) if end == -1 else end + 1
        yield data[start:end]
        start = end


def text_document(name, text):
    data = text.encode("utf-8")

    def pieces():
        for i, piece in enumerate(line_pieces(data)):
            yield i == 0, piece
    return Document(name, len(data), pieces)


def file_document(path):
    if not os.path.exists(path):
        raise DataError(f"input file not found: '{path}'")
    if os.path.isdir(path):
        raise DataError(f"'{path}' is a directory, not a text file")
    try:
        nbytes = os.path.getsize(path)
        open(path, "rb").close()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from None

    def pieces():
        offset, buf, size = 0, [], 0
        with open(path, "rb") as f:   # bytes as they are: no newline translation
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= PIECE_BYTES:
                    yield offset == 0, check_utf8(b"".join(buf), path, offset)
                    offset, buf, size = offset + size, [], 0
        if buf:
            yield offset == 0, check_utf8(b"".join(buf), path, offset)
    return Document(path, nbytes, pieces)


def is_jsonl(path):
    return path.endswith(JSONL_SUFFIXES)


def jsonl_texts(path, field):
    """Yields the UTF-8 bytes of `field` in each record of a JSON Lines file (gzip-compressed when
    its name ends in .gz): one JSON object per line; blank lines and empty texts are skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"'{path}' line {number}"
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
                    raise DataError(f"{where} is not JSON ({e}); .jsonl and .json inputs are JSON Lines, "
                                    f"one object per line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with a "
                                    f"\"{field}\" field")
                text = record.get(field)
                if not isinstance(text, str):
                    raise DataError(f"{where} has no string field \"{field}\" (--text-field names the field "
                                    f"that holds the text)")
                try:
                    data = text.encode("utf-8")
                except UnicodeEncodeError:   # a lone surrogate escape, \ud800 say
                    raise DataError(f"{where}: its \"{field}\" is not valid Unicode (a lone surrogate)") from None
                if data:
                    yield data
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        after = f" after line {number}" if number else ""
        raise DataError(f"cannot read '{path}'{after}: {e}") from None


def jsonl_document(path, field):
    """Every record of a JSON Lines file, each a document. Read once here for the size (and to
    stop on a bad line before any work), and again when tokenized."""
    if not os.path.exists(path):
        raise DataError(f"input file not found: '{path}'")
    if os.path.isdir(path):
        raise DataError(f"'{path}' is a directory, not a JSON Lines file")
    nbytes = count = 0
    for data in jsonl_texts(path, field):
        nbytes += len(data)
        count += 1

    def pieces():
        for data in jsonl_texts(path, field):
            for i, piece in enumerate(line_pieces(data)):
                yield i == 0, piece
    return Document(path, nbytes, pieces, count)


def check_utf8(data, path, offset):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not UTF-8 text (byte {offset + e.start})") from None
    return data


# -----------------------------------------------------------------------------
# the KJV from Debian's bible-kjv-text, read through its `bible` program

KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")
KJV_DATA = "/usr/lib/bible.data"
KJV_COUNTS = (66, 1189, 31102)   # books, chapters, verses of the KJV


def kjv_available():
    return shutil.which("bible") is not None and os.path.isfile(KJV_DATA)


def install_kjv():
    """apt-get install the KJV packages (apt-get update first if the lists lack them)."""
    if kjv_available():
        return
    how = "apt-get install " + " ".join(KJV_PACKAGES)
    if shutil.which("apt-get") is None:
        raise DataError(f"the KJV needs the Debian packages {' and '.join(KJV_PACKAGES)}, and there is no apt-get here")
    if os.geteuid() != 0:
        raise DataError(f"the KJV needs the Debian packages {' and '.join(KJV_PACKAGES)}; install them as root: {how}")
    print(f"installing the KJV: {how}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *KJV_PACKAGES]
    # apt's own output goes to our stderr: stdout is the summary's
    ok = subprocess.run(install, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL).returncode == 0
    if not ok:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL)
        ok = subprocess.run(install, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL).returncode == 0
    if not ok or not kjv_available():
        raise DataError(f"could not install the KJV ({how} failed, see above); install "
                        f"{' and '.join(KJV_PACKAGES)} by hand or give text files instead")


def kjv_books():
    """-> [(book name, text)] for the 66 books, verse references dropped (see the module text)."""
    try:
        # -l: a line width no verse reaches, so that every verse is one line
        out = subprocess.run(["bible", "-l1000000", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                             capture_output=True, check=True).stdout.decode("utf-8")
    except (OSError, subprocess.CalledProcessError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the KJV with `bible`: {e}") from None
    books = []   # [name, [[verse, ...] per chapter]]
    for line in out.splitlines():
        heading = re.fullmatch(r"(\S.*) (\d+)", line)
        verse = re.fullmatch(r" +\d+ (.*)", line)
        if heading:
            if not books or books[-1][0] != heading.group(1):
                books.append([heading.group(1), []])
            books[-1][1].append([])
        elif verse and books:
            books[-1][1][-1].append(verse.group(1).rstrip())
        elif line.strip():
            raise DataError(f"unexpected line in the output of `bible`: {line[:80]!r}")
    counts = (len(books), sum(len(c) for _, c in books), sum(len(v) for _, c in books for v in c))
    if counts != KJV_COUNTS:
        raise DataError(f"`bible` gave {counts[0]} books, {counts[1]} chapters, {counts[2]} verses; "
                        f"the KJV has {KJV_COUNTS[0]}, {KJV_COUNTS[1]}, {KJV_COUNTS[2]}")
    return [(name, name + "\n\n" + "\n\n".join("\n".join(verses) for verses in chapters) + "\n")
            for name, chapters in books]


def kjv_version():
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "bible-kjv-text"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


# -----------------------------------------------------------------------------
# the split


def split_pieces(docs, boundary):
    """Yields (split, starts_document, bytes): everything from the first line start at or after
    byte `boundary` of the concatenated documents is "val", the rest "train"."""
    pos, in_val = 0, False
    for doc in docs:
        for first, piece in doc.pieces():
            n = len(piece)
            if not in_val and pos >= boundary:
                in_val = True   # a piece starts at a line start
            elif not in_val and pos + n > boundary:
                nl = piece.find(b"\n", boundary - pos - 1)   # "\n" at j: a line starts at j + 1
                if nl != -1 and nl + 1 < n:
                    yield "train", first, piece[:nl + 1]
                    yield "val", False, piece[nl + 1:]
                    in_val, pos = True, pos + n
                    continue
                # else the next line start is the next piece's start, or there is none
            yield ("val" if in_val else "train"), first, piece
            pos += n


# -----------------------------------------------------------------------------
# tokenizers


def parse_tokenizer_spec(spec):
    """-> (kind, path or None); checks that a named path exists."""
    if spec in ("bytes", "bpe"):
        return spec, None
    kind, sep, path = spec.partition(":")
    if kind not in ("hf", "gpt2") or not sep:
        raise DataError(f"unknown tokenizer '{spec}': expected bytes, bpe, hf:PATH or gpt2:PATH")
    if not path:
        raise DataError(f"--tokenizer {kind}: needs a path after the colon")
    if not os.path.exists(path):
        raise DataError(f"--tokenizer {spec}: '{path}' does not exist")
    return kind, path


def train_bpe(docs, boundary, vocab_size, separator):
    """A byte-level BPE trained on the train split."""
    tk = import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     special_tokens=[SEPARATOR] if separator else [],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    progress = Progress(boundary, "train bpe")   # about the train split's size

    def texts():
        for split, _, piece in split_pieces(docs, boundary):
            if split == "train":
                progress.update(len(piece))
                yield piece.decode("utf-8")
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    progress.close()
    tok = HFTokenizer(tokenizer, "bpe", tokenizer.token_to_id(SEPARATOR) if separator else None)
    if tok.vocab_size < vocab_size:
        print(f"note: the corpus gave only {tok.vocab_size} BPE tokens of the {vocab_size} asked for",
              file=sys.stderr)
    return tok


def load_hf(path, separator):
    """-> (tokenizer, the bytes of its tokenizer.json, copied beside the shards as they are)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"--tokenizer hf:{path}: no tokenizer.json in that folder")
    tok = HFTokenizer.from_file(file, "hf")
    with open(file, "rb") as f:
        # read now: the file may be the output folder's own tokenizer.json, which is cleared
        saved_json = f.read()
    if separator:
        for name in HF_SEPARATORS:
            if tok.tokenizer.token_to_id(name) is not None:
                tok.separator_id = tok.tokenizer.token_to_id(name)
                break
        else:
            print(f"note: '{file}' has none of {', '.join(HF_SEPARATORS)}; documents are not separated",
                  file=sys.stderr)
    return tok, saved_json


def bytes_to_unicode():
    """GPT-2's byte -> printable character map: byte-level BPE vocabularies spell bytes this way.
    Printable Latin-1 bytes stand for themselves; the other 68 take the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tiktoken(path):
    """A tiktoken ranks file (base64 token, rank per line) -> (vocab, merges) of an HF BPE."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"'{path}' line {number}: not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"'{path}': ranks must be 0..{len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise DataError(f"'{path}': every single byte must be a token of a byte-level BPE")
    spell = bytes_to_unicode()
    vocab = {"".join(spell[b] for b in token): rank for token, rank in ranks.items()}
    # a token of rank r is made by merging any two tokens that spell it; tiktoken merges the
    # adjacent pair whose result has the lowest rank, so merges are ordered by the result's rank
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    merges = [("".join(spell[b] for b in left), "".join(spell[b] for b in right))
              for _, _, _, left, right in merges]
    return vocab, merges


def load_gpt2(path, separator):
    """-> (byte-level BPE tokenizer, the files it was made from)."""
    tk = import_tokenizers()
    if os.path.isdir(path):
        tiktoken_files = sorted(glob.glob(os.path.join(path, "*.tiktoken")))
        if os.path.isfile(os.path.join(path, "vocab.json")):
            vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        elif len(tiktoken_files) == 1:
            vocab_file, merges_file = tiktoken_files[0], None
        else:
            raise DataError(f"--tokenizer gpt2:{path}: expected vocab.json + merges.txt or one .tiktoken file there")
    elif path.endswith(".json"):
        vocab_file, merges_file = path, os.path.join(os.path.dirname(path), "merges.txt")
    else:
        vocab_file, merges_file = path, None
    try:
        if merges_file is None:
            vocab, merges = read_tiktoken(vocab_file)
            model = tk.models.BPE(vocab=vocab, merges=merges)
        else:
            if not os.path.isfile(merges_file):
                raise DataError(f"--tokenizer gpt2:{path}: '{merges_file}' is missing (vocab.json needs merges.txt)")
            model = tk.models.BPE.from_file(vocab_file, merges_file)
    except DataError:
        raise
    except Exception as e:   # the library raises plain Exception for malformed files
        raise DataError(f"--tokenizer gpt2:{path}: cannot read the BPE files: {e}") from None
    tokenizer = tk.Tokenizer(model)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    separator_id = None
    if separator:
        # GPT-2's vocab.json has <|endoftext|> (50256) and it keeps its id; tiktoken files leave it out
        tokenizer.add_special_tokens([SEPARATOR])
        separator_id = tokenizer.token_to_id(SEPARATOR)
    return HFTokenizer(tokenizer, "gpt2", separator_id), [vocab_file] + ([merges_file] if merges_file else [])


# -----------------------------------------------------------------------------
# shards


class ShardWriter:
    """Writes {split}_000000.bin, ... of at most shard_tokens tokens each, a whole number of rows of
    `row` tokens (--rows: no row is cut between two shards)."""

    def __init__(self, out_dir, split, shard_tokens, uint32, row=1):
        self.out_dir, self.split, self.uint32, self.row = out_dir, split, uint32, row
        self.shard_tokens = shard_tokens // row * row
        self.pending, self.pending_count = [], 0
        self.names, self.counts = [], []

    def add(self, ids):
        ids = np.asarray(ids, dtype=np.uint32 if self.uint32 else np.uint16)
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.pending_count)
            self.pending.append(ids[:take])
            self.pending_count += take
            ids = ids[take:]
            if self.pending_count == self.shard_tokens:
                self._write(np.concatenate(self.pending))

    def _write(self, tokens, index=None):
        index = len(self.names) if index is None else index
        name = f"{self.split}_{index:06d}.bin"
        reference().shard_save(os.path.join(self.out_dir, name), tokens, uint32=self.uint32)
        if index == len(self.names):
            self.names.append(name)
            self.counts.append(int(tokens.size))
        else:
            self.counts[index] = int(tokens.size)
        self.pending, self.pending_count = [], 0

    def close(self):
        if not self.pending_count:
            return
        tail = np.concatenate(self.pending)
        if self.names and 2 * tail.size < self.shard_tokens:
            # even out the last two shards: both then hold at least shard_tokens / 2
            both = np.concatenate([reference().shard_load(os.path.join(self.out_dir, self.names[-1])), tail])
            half = (both.size // self.row + 1) // 2 * self.row
            self._write(both[:half], index=len(self.names) - 1)
            tail = both[half:]
        self._write(tail)

    @property
    def total(self):
        return sum(self.counts) + self.pending_count


OUR_FILES = re.compile(r"(train|val)_\d{6}\.bin|meta\.json|tokenizer\.json")


def prepare_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out '{out_dir}' is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out '{out_dir}': {e.strerror}") from None


def clear_out_dir(out_dir):
    """Removes what an earlier run left: a stale train_000009.bin would join the glob."""
    old = [n for n in os.listdir(out_dir) if OUR_FILES.fullmatch(n)]
    for name in old:
        os.remove(os.path.join(out_dir, name))
    if old:
        print(f"removed {len(old)} files of an earlier run from '{out_dir}'", file=sys.stderr)


def encode_corpus(tok, docs, boundary, writers, total_bytes):
    """Tokenizes every piece into its split's writer, the separator before each document.
    Returns the bytes of text in each split."""
    progress = Progress(total_bytes, "tokenize")
    split_bytes = {"train": 0, "val": 0}
    batch, batch_bytes = [], 0

    def flush():
        texts = [piece.decode("utf-8") for _, _, piece in batch]
        for (split, starts, piece), ids in zip(batch, tok.encode_batch(texts)):
            if starts and tok.separator_id is not None:
                writers[split].add([tok.separator_id])
            writers[split].add(ids)
        progress.update(batch_bytes)

    for split, starts, piece in split_pieces(docs, boundary):
        split_bytes[split] += len(piece)
        if isinstance(tok, ByteTokenizer):
            if starts and tok.separator_id is not None:
                writers[split].add([tok.separator_id])
            writers[split].add(tok.encode_bytes(piece))
            progress.update(len(piece))
            continue
        batch.append((split, starts, piece))
        batch_bytes += len(piece)
        if len(batch) >= BATCH_PIECES:
            flush()
            batch, batch_bytes = [], 0
    if batch:
        flush()
    progress.close()
    return split_bytes


PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")   # a tokenizer's own padding token, if it has one
PAD = "<|pad|>"   # the padding token --rows adds to a tokenizer that has none


def add_padding(tok):
    """--rows: the padding token's id, the tokenizer's own (T5's <pad>, say) or one added after its
    last id (bytes: 256 or 257; the others: <|pad|>, saved with the tokenizer). -> (id, text)"""
    if isinstance(tok, ByteTokenizer):
        tok.add_padding()
        return tok.pad_id, PAD
    for name in PAD_NAMES:
        if tok.tokenizer.token_to_id(name) is not None:
            return tok.tokenizer.token_to_id(name), name
    tok.tokenizer.add_special_tokens([PAD])
    tok.vocab_size = max(tok.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    return tok.tokenizer.token_to_id(PAD), PAD


def encode_rows(tok, docs, boundary, writers, total_bytes, rows, pad_id):
    """--rows: one row of `rows` tokens per document, as the paper's data was made: the document's
    first rows - 1 tokens and the end-of-text token (its first `rows` tokens where there is none),
    then pad_id to the end. A document belongs to val when it starts at or after byte `boundary`.
    Only the start of a long document is tokenized: 64 bytes per token kept, far more than any
    tokenizer's longest token needs. Returns the bytes of text in each split and the documents cut
    short in each."""
    progress = Progress(total_bytes, "tokenize")
    split_bytes, truncated = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    keep = rows - 1 if tok.separator_id is not None else rows
    budget = 64 * rows
    pending = []   # (split, text of the document's start, whether the document goes on past it)

    def flush():
        texts = [text for _, text, _ in pending]
        encoded = tok.encode_batch(texts) if not isinstance(tok, ByteTokenizer) else [
            tok.encode_bytes(t.encode("utf-8")) for t in texts]
        for (split, _, more), ids in zip(pending, encoded):
            ids = list(ids)
            if more and len(ids) < keep:
                raise DataError(f"a document's first {budget} bytes gave only {len(ids)} tokens, fewer than "
                                f"the {keep} a row keeps")
            if len(ids) > keep or more:
                truncated[split] += 1
            row = ids[:keep] + ([tok.separator_id] if tok.separator_id is not None else [])
            writers[split].add(row + [pad_id] * (rows - len(row)))
        pending.clear()

    def finish(split, start, taken, doc_bytes):
        # the document's start: cut at the budget, maybe through a character (dropped: it lies
        # far past the tokens a row keeps)
        pending.append((split, b"".join(start).decode("utf-8", errors="ignore"), doc_bytes > taken))
        if len(pending) >= BATCH_PIECES * 64:
            flush()

    pos, split, start, taken, doc_bytes = 0, None, [], 0, 0
    for doc in docs:
        for starts, piece in doc.pieces():
            if starts:
                if split is not None:
                    finish(split, start, taken, doc_bytes)
                split, start, taken, doc_bytes = ("val" if pos >= boundary else "train"), [], 0, 0
            if taken < budget:
                start.append(piece[:budget - taken])
                taken += len(start[-1])
            doc_bytes += len(piece)
            split_bytes[split] += len(piece)
            pos += len(piece)
            progress.update(len(piece))
    if split is not None:
        finish(split, start, taken, doc_bytes)
    flush()
    progress.close()
    return split_bytes, truncated


# -----------------------------------------------------------------------------
# CLI


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as `error: ...`, exit status 1, like every other error."""

    def error(self, message):
        raise DataError(f"{message} (see {self.prog} --help)")


def parse_prepare_args(argv):
    p = ArgumentParser(prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="UTF-8 text files, one document each, or JSON Lines files "
                   "(.jsonl, .json, either .gz), one document a record")
    p.add_argument("--text-field", default="text",
                   help="JSON Lines: the field of each record that holds its text (default text)")
    p.add_argument("--corpus", choices=["kjv"], help="kjv: the King James Bible (Debian bible-kjv-text)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="bytes", help="bytes | bpe | hf:PATH | gpt2:PATH (default bytes)")
    p.add_argument("--vocab-size", type=int, help="bpe: vocabulary size (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="the end of the corpus kept for validation (default 0.05; 1: all of it, a validation "
                        "set of its own, such as C4's validation files, with the training data's tokenizer)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard at most (default 1e8)")
    p.add_argument("--no-separator", action="store_true", help="no <|endoftext|> between documents")
    p.add_argument("--rows", type=int, default=None,
                   help="one document per row of ROWS tokens, cut or padded to it, as the paper's data (train "
                        "with --seq-len ROWS --pad-id <meta.json's pad_id>); default: a stream of documents")
    return p.parse_args(argv)


def prepare(argv):
    args = parse_prepare_args(argv)
    kind, spec_path = parse_tokenizer_spec(args.tokenizer)
    separator = not args.no_separator
    if args.vocab_size is not None and kind != "bpe":
        raise DataError("--vocab-size is for --tokenizer bpe; the other tokenizers bring their own vocabulary")
    vocab_size = 4096 if args.vocab_size is None else args.vocab_size
    if kind == "bpe" and vocab_size < 256 + separator:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{256 + separator} (the 256 bytes{' and <|endoftext|>' if separator else ''})")
    if not 0 <= args.val_fraction <= 1:
        raise DataError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")
    if args.val_fraction == 1 and kind == "bpe":
        raise DataError("--val-fraction 1 leaves nothing to train the BPE on: give the tokenizer the training "
                        "data was prepared with (--tokenizer hf:THAT_FOLDER/tokenizer.json)")
    if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}], got {args.shard_tokens}")
    if not args.files and not args.corpus:
        raise DataError("no input: give text files or --corpus kjv")
    if args.rows is not None and not 2 <= args.rows <= args.shard_tokens:
        raise DataError(f"--rows must be in [2, --shard-tokens {args.shard_tokens}], got {args.rows}")
    prepare_out_dir(args.out)

    docs, sources = [], []
    if args.corpus == "kjv":
        install_kjv()
        books = kjv_books()
        docs += [text_document(f"kjv:{name}", text) for name, text in books]
        sources.append({"corpus": "kjv", "package": "bible-kjv-text", "version": kjv_version(),
                        "documents": len(books), "bytes": sum(d.nbytes for d in docs)})
    for path in args.files:
        if is_jsonl(path):
            docs.append(jsonl_document(path, args.text_field))
            sources.append({"path": os.path.abspath(path), "format": "jsonl", "field": args.text_field,
                            "documents": docs[-1].count, "bytes": docs[-1].nbytes})
        else:
            docs.append(file_document(path))
            sources.append({"path": os.path.abspath(path), "bytes": docs[-1].nbytes})
    total_bytes = sum(d.nbytes for d in docs)
    if total_bytes == 0:
        raise DataError(f"the corpus is empty (no text in {', '.join(d.name for d in docs)})")
    boundary = math.floor(total_bytes * (1 - args.val_fraction))
    if boundary == 0 and args.val_fraction < 1:
        raise DataError(f"the train split is empty: --val-fraction {args.val_fraction} of {total_bytes} bytes")

    tokenizer_sources, saved_json = [spec_path] if spec_path else [], None
    if kind == "bytes":
        tok = ByteTokenizer(separator)
    elif kind == "bpe":
        tok = train_bpe(docs, boundary, vocab_size, separator)
    elif kind == "hf":
        tok, saved_json = load_hf(spec_path, separator)
    else:
        tok, tokenizer_sources = load_gpt2(spec_path, separator)
    pad_id = pad = None
    if args.rows is not None:
        pad_id, pad = add_padding(tok)
        if kind == "hf" and pad == PAD:
            saved_json = None   # the tokenizer gained <|pad|>: saved as it now is
    dtype = token_dtype_for(tok.vocab_size)

    clear_out_dir(args.out)
    writers = {s: ShardWriter(args.out, s, args.shard_tokens, dtype == "uint32", args.rows or 1) for s in ("train", "val")}
    truncated = None
    if args.rows is None:
        split_bytes = encode_corpus(tok, docs, boundary, writers, total_bytes)
    else:
        split_bytes, truncated = encode_rows(tok, docs, boundary, writers, total_bytes, args.rows, pad_id)
    if args.val_fraction > 0 and split_bytes["val"] == 0:
        clear_out_dir(args.out)
        if args.rows is not None:
            raise DataError("the validation split is empty: with --rows it takes whole documents, and the last "
                            f"one starts before the last {args.val_fraction} of the corpus; use --val-fraction 0 "
                            "or more documents")
        raise DataError("the validation split is empty: the last line of the corpus starts before "
                        f"the last {args.val_fraction} of it; use --val-fraction 0 or more lines")
    for w in writers.values():
        w.close()

    tokenizer_file = None
    if kind == "hf" and saved_json is not None:
        tokenizer_file = "tokenizer.json"
        with open(os.path.join(args.out, tokenizer_file), "wb") as f:
            f.write(saved_json)
    elif kind in ("bpe", "gpt2", "hf"):
        tokenizer_file = "tokenizer.json"
        tok.tokenizer.save(os.path.join(args.out, tokenizer_file))
    meta = {
        "format": "llm.c token shards: 256 int32 header (magic, version, token count), then the tokens",
        "tokenizer": {"kind": kind, "spec": args.tokenizer, "file": tokenizer_file,
                      "source": [os.path.abspath(s) for s in tokenizer_sources]},
        "vocab_size": tok.vocab_size,
        "token_dtype": dtype,
        "separator_id": tok.separator_id,
        "separator": None if tok.separator_id is None else (
            SEPARATOR if kind == "bytes" else tok.tokenizer.id_to_token(tok.separator_id)),
        "val_fraction": args.val_fraction,
        "split": "val is the end of the corpus: from the first line start at or after "
                 "(1 - val_fraction) of its UTF-8 bytes" if args.rows is None else
                 "val is the end of the corpus: the documents that start at or after (1 - val_fraction) "
                 "of its UTF-8 bytes",
        "sources": sources,
        "documents": sum(d.count for d in docs),
        "bytes": split_bytes,
        "tokens": {s: w.total for s, w in writers.items()},
        "shards": {s: w.names for s, w in writers.items()},
        "shard_tokens": args.shard_tokens,
    }
    if args.rows is not None:
        # one document per row: what ./train --pad-id checks its flags against
        meta.update({"rows": args.rows, "pad_id": pad_id, "pad": pad,
                     "layout": "one document per row of `rows` tokens: its first rows - 1 tokens and the "
                               "separator (its first `rows` where there is none), then pad_id to the end",
                     "rows_count": {s: w.total // args.rows for s, w in writers.items()},
                     "rows_truncated": truncated})
    tmp = os.path.join(args.out, "meta.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(args.out, "meta.json"))

    for s, w in writers.items():
        print(f"{s}: {w.total:,} tokens in {len(w.names)} shard{'s' * (len(w.names) != 1)} "
              f"({split_bytes[s]:,} bytes of text)")
    print(f"vocab {tok.vocab_size} ({kind}, {dtype} ids) -> {args.out}")
    val = f" --val-data '{args.out}/val_*.bin'" if writers["val"].names else ""
    rows = ""
    if args.rows is not None:
        for s, w in writers.items():
            print(f"{s}: {w.total // args.rows:,} documents in rows of {args.rows}, {truncated[s]:,} of them cut short")
        rows = f" --seq-len {args.rows} --pad-id {pad_id}"
    if writers["train"].names:
        print(f"train with: ./train --vocab {tok.vocab_size} --train-data '{args.out}/train_*.bin'{val}{rows}")
    else:
        print(f"validate with: ./train ...{val}{rows}")


def decode(argv):
    p = ArgumentParser(prog="prepare.py decode", description="Print the text of a shard's first tokens.")
    p.add_argument("--data", help="the folder prepare.py wrote (default: the shard's folder)")
    p.add_argument("shard", help="a shard file, or its name inside --data")
    p.add_argument("--count", type=int, default=256, help="tokens to decode (default 256; 0 = all)")
    args = p.parse_args(argv)
    path = args.shard
    if args.data and not os.path.isfile(path):
        path = os.path.join(args.data, args.shard)
    if not os.path.isfile(path):
        raise DataError(f"shard not found: '{args.shard}'")
    tok = load_tokenizer(args.data or os.path.dirname(os.path.abspath(path)))
    if args.count < 0:
        raise DataError(f"--count must be 0 (all) or more, got {args.count}")
    try:
        ids = reference().shard_load(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    sys.stdout.write(tok.decode(ids if args.count == 0 else ids[:args.count]) + "\n")


def main(argv):
    try:
        if argv[:1] == ["decode"]:
            decode(argv[1:])
        else:
            prepare(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
