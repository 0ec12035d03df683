"""Tokenizers: every built-in is an HF `tokenizers.Tokenizer` behind one small protocol.

bpe, char and byte are all expressed as HF tokenizers, so each is saved as a standard
`tokenizer.json` (which `transformers` can load at export) and tokenizes in Rust. A
`meta.json` next to it names the special tokens and carries the file's sha256; it is
written last, so it marks a complete tokenizer directory. An imported HF tokenizer keeps its
other files beside it as they are (`HF_FILES`: `tokenizer_config.json`, `generation_config.json`,
...), with their sha256 in `meta.json` too: transformers reads them after an export, and
`generation_config.json`'s `eos_token_id` says where llmforge's generations stop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from llmforge.atomic import atomic_open, atomic_write_bytes, write_json
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import tokenizers

    from llmforge.spec import components as c

META_VERSION = 1
# An HF tokenizer's files besides tokenizer.json that travel with it, byte for byte.
HF_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None  # None only for a char tokenizer without add_eos (nanoGPT's recipe)
    bos_id: int | None
    pad_id: int | None  # the eos token when the vocabulary has no pad token
    stop_ids: tuple[int, ...]  # the ids that end a generation (see `HFTokenizer.stop_ids`)
    add_bos: bool  # whether a sequence starts with BOS (see `HFTokenizer.add_bos`)
    hash: str  # sha256 of the saved tokenizer.json

    def encode(self, text: str) -> list[int]: ...
    def start(self) -> list[int]: ...
    def encode_sequence(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def save(self, path: Path) -> None: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus which of its tokens end, start and pad a document.

    Args:
        text: the tokenizer.json text it was read from (kept byte for byte); default `hf.to_str()`.
        files: an imported tokenizer's other HF files (`HF_FILES`), name → text.
    """

    def __init__(self, hf: tokenizers.Tokenizer, *, kind: str, eos: str | None, bos: str | None, pad: str | None,
                 built_from: str | None = None, text: str | None = None, files: dict[str, str] | None = None) -> None:
        self.hf, self.kind, self.built_from = hf, kind, built_from
        self.files = dict(files or {})
        self.specials = {"eos": eos, "bos": bos, "pad": pad or eos}
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, token in self.specials.items():
            ids[role] = None if token is None else hf.token_to_id(token)
            if token is not None and ids[role] is None:
                raise UserError(f"the tokenizer has no token {token!r} for {role}", "add it as a special token, or name one the vocabulary has")
        self.eos_id, self.bos_id, self.pad_id = ids["eos"], ids["bos"], ids["pad"]
        self.add_bos = self._adds_bos()
        self.stop_ids = self._stops()
        self._added: frozenset[int] | None = None
        self._char_table: tuple[np.ndarray, tuple[str, ...]] | None = None
        self.json = hf.to_str() if text is None else text
        self.hash = hashlib.sha256(self.json.encode()).hexdigest()

    def file_json(self, name: str) -> dict:
        """One of `files` as JSON ({} when absent): generation_config.json's stop ids, tokenizer_config.json's chat template."""
        if name not in self.files:
            return {}
        try:
            data = json.loads(self.files[name])
        except json.JSONDecodeError as e:
            raise UserError(f"the tokenizer's {name} is not valid JSON: {e}", "fix or remove the file") from None
        return data if isinstance(data, dict) else {}

    def _stops(self) -> tuple[int, ...]:
        """The ids that end a generation: `generation_config.json`'s `eos_token_id` (an id or a list:
        Llama 3 Instruct lists several), as transformers' `generate` stops; else the eos token."""
        listed = self.file_json("generation_config.json").get("eos_token_id")
        if listed is None:
            return () if self.eos_id is None else (self.eos_id,)
        ids = listed if isinstance(listed, list) else [listed]
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise UserError(f"generation_config.json: eos_token_id {listed} names ids outside the tokenizer's {self.vocab_size} tokens",
                            "the generation config and the tokenizer come from different models")
        return tuple(dict.fromkeys(ids))

    def _adds_bos(self) -> bool:
        """The one BOS rule of every sequence llmforge builds (prepare, evaluators, previews, generate).

        llmforge's own tokenizers start a sequence with BOS when they have a bos token. An
        imported tokenizer does what its own encoding does, as transformers does by default:
        Llama's post-processor adds `<|begin_of_text|>`, Qwen's adds nothing even though a bos
        token may be named in its config. (transformers 5 follows tokenizer.json's post-processor
        even where tokenizer_config.json says `add_bos_token`.)
        """
        if self.bos_id is None:
            return False
        if self.kind != "pretrained":
            return True
        with_specials = self.hf.encode("a", add_special_tokens=True).ids
        return bool(with_specials) and with_specials[0] == self.bos_id and self.hf.encode("a", add_special_tokens=False).ids[:1] != [self.bos_id]

    def _unknown(self, texts: list[str], e: Exception) -> UserError:
        seen = {ch for t in texts for ch in set(t)}
        missing = sorted(ch for ch in seen if self.hf.token_to_id(ch) is None)
        if self.kind == "char" and missing:
            return UserError(f"the char tokenizer never saw the characters {''.join(missing)!r}", "the char vocabulary is the characters of the training data")
        return UserError(f"the tokenizer cannot encode this text: {e}")

    def encode(self, text: str) -> list[int]:
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # HF raises a bare Exception for unknown characters
            raise self._unknown([text], e) from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character offsets in it (what a chat template's mask maps through)."""
        try:
            encoding = self.hf.encode(text, add_special_tokens=False)
        except Exception as e:
            raise self._unknown([text], e) from None
        return encoding.ids, encoding.offsets

    def added_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's added tokens (special tokens such as `<|eot_id|>`, `<|im_end|>`, `</s>`)."""
        if self._added is None:
            self._added = frozenset(self.hf.get_added_tokens_decoder())
        return self._added

    def _char_ids(self, text: str) -> np.ndarray | None:
        """A char tokenizer's ids of `text` by table lookup, or None where HF must decide.

        HF encodes a 1 MB file as one sequence in ~0.9 s; the lookup takes ~6 ms (issue 31:
        it was most of `prepare` in nanoGPT's shakespeare-char recipe). A text holding an
        added token's string, or a character outside the vocabulary, goes to HF, which
        matches the former and raises on the latter.
        """
        if self._char_table is None:
            singles = {ch: i for ch, i in self.hf.get_vocab(with_added_tokens=False).items() if len(ch) == 1}
            table = np.full(max(map(ord, singles), default=-1) + 1, -1, dtype=np.int64)
            for ch, i in singles.items():
                table[ord(ch)] = i
            added = tuple(t.content for t in self.hf.get_added_tokens_decoder().values())
            self._char_table = table, added
        table, added = self._char_table
        if any(token in text for token in added):
            return None
        try:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # a lone surrogate: HF says what it makes of it
            return None
        if codes.size and int(codes.max()) >= table.size:
            return None
        ids = table[codes]
        return None if (ids < 0).any() else ids.astype(np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as uint32 arrays (the fast path `prepare` uses)."""
        if self.kind == "char" and self.hf.normalizer is None:
            fast = [self._char_ids(t) for t in texts]
            if all(ids is not None for ids in fast):
                return fast
        try:
            # The _fast variant skips offset tracking, which we never use.
            encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        except Exception as e:
            raise self._unknown(texts, e) from None
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]

    def start(self) -> list[int]:
        """The ids every sequence starts with: [bos] when the tokenizer adds one, else []."""
        return [self.bos_id] if self.add_bos else []

    def encode_sequence(self, text: str) -> list[int]:
        """`text` as the start of a sequence (a document, a raw prompt): BOS when the tokenizer adds one."""
        return self.start() + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def save(self, path: Path) -> None:
        """Write `path/tokenizer.json` and the HF files, then `path/meta.json` (the completion marker)."""
        path.mkdir(parents=True, exist_ok=True)
        with atomic_open(path / "tokenizer.json", "w") as f:
            f.write(self.json)
        for name, text in self.files.items():
            atomic_write_bytes(path / name, text.encode("utf-8"))
        meta = {"version": META_VERSION, "kind": self.kind, "special_tokens": self.specials, "vocab_size": self.vocab_size,
                "sha256": self.hash, "built_from": self.built_from}
        if self.files:
            meta["files"] = {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in self.files.items()}
        write_json(path / "meta.json", meta)


def load_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer saved in `path` (run_dir/'tokenizer'), checked against its meta.json."""
    from tokenizers import Tokenizer as HF

    meta_path, json_path = path / "meta.json", path / "tokenizer.json"
    if not meta_path.is_file() or not json_path.is_file():
        raise UserError(f"{path} holds no complete tokenizer (tokenizer.json + meta.json)", "run the prepare stage first")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != META_VERSION:
        raise UserError(f"{meta_path}: unknown tokenizer meta version {meta.get('version')!r}", f"this llmforge reads version {META_VERSION}")
    text = read_text(json_path)
    if hashlib.sha256(text.encode()).hexdigest() != meta["sha256"]:
        raise UserError(f"{json_path} does not match the sha256 in {meta_path.name}", "the tokenizer was changed or damaged; run prepare again")
    files = {}
    for name, digest in (meta.get("files") or {}).items():
        if not (path / name).is_file():
            raise UserError(f"{path / name} is missing, but {meta_path.name} lists it", "the tokenizer directory is incomplete; copy it again")
        files[name] = read_text(path / name)
        if hashlib.sha256(files[name].encode()).hexdigest() != digest:
            raise UserError(f"{path / name} was changed: its sha256 differs from the one {meta_path.name} records",
                            "the tokenizer was changed or damaged; import it again (or run prepare again)")
    sp = meta["special_tokens"]
    return HFTokenizer(HF.from_str(text), kind=meta["kind"], eos=sp["eos"], bos=sp["bos"], pad=sp["pad"], built_from=meta.get("built_from"),
                       text=text, files=files)


def read_text(path: Path) -> str:
    """A UTF-8 file's text exactly as it lies (no newline translation), so that its sha256 and a copy stay the same."""
    return path.read_bytes().decode("utf-8")


# --- builders: the registry factories, `(options, *, run_dir, texts) -> Tokenizer` -----------


def special_token_list(sp: c.SpecialTokens) -> list[str]:
    """bos, eos, pad, chat roles, extra: in this order, each once."""
    tokens = [t for t in (sp.bos, sp.eos, sp.pad, *sp.chat_roles, *sp.extra) if t is not None]
    return list(dict.fromkeys(tokens))


def byte_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (what HF's ByteLevel pre-tokenizer produces)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _limited(texts: Iterable[str], max_bytes: float) -> Iterable[str]:
    """`texts` up to the one that reaches `max_bytes` of UTF-8 (what MiB of a source means)."""
    seen = 0
    for t in texts:
        yield t
        seen += len(t.encode("utf-8"))
        if seen >= max_bytes:
            return


def build_bpe(options: c.BPETokenizer, *, run_dir: Path, texts: Iterable[str]) -> HFTokenizer:
    """Byte-level BPE trained on `texts` (the first train_max_mb of them)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    del run_dir  # training needs no scratch space
    hf = HF(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Digits first: one token per digit, so arithmetic sees every digit the same way.
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if options.split_digits else byte_level
    hf.decoder = decoders.ByteLevel()
    specials = special_token_list(options.special_tokens)
    trainer = trainers.BpeTrainer(vocab_size=options.vocab_size, min_frequency=options.min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        raise UserError("the bpe tokenizer found no text to train on",
                        "give data.sources some text (webdataset shards hold only tokens), or use tokenizer: {name: pretrained, path: ...}")
    hf.train_from_iterator(_limited(itertools.chain([first], texts), options.train_max_mb * 2**20), trainer)
    sp = options.special_tokens
    return HFTokenizer(hf, kind="bpe", eos=sp.eos, bos=sp.bos, pad=sp.pad)


def build_char(options: c.CharTokenizer, *, run_dir: Path, texts: Iterable[str]) -> HFTokenizer:
    """One token per character of `texts`, ids in sorted character order (as nanoGPT numbers them)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    del run_dir
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise UserError("the char tokenizer found no text to build its vocabulary from", "check data.sources")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    eos = None
    if options.add_eos:
        eos = "<|eos|>"
        vocab[eos] = len(vocab)
    hf = HF(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m): `.` matches newlines too
    hf.decoder = decoders.Fuse()
    if eos:
        hf.add_special_tokens([eos])
    return HFTokenizer(hf, kind="char", eos=eos, bos=None, pad=None)


def build_byte(options: c.ByteTokenizer, *, run_dir: Path, texts: Iterable[str]) -> HFTokenizer:
    """Ids 0-255 are the bytes themselves; special tokens follow."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    del run_dir, texts  # the vocabulary is fixed
    to_char = byte_unicode()
    hf = HF(models.BPE(vocab={to_char[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(special_token_list(options.special_tokens))
    sp = options.special_tokens
    return HFTokenizer(hf, kind="byte", eos=sp.eos, bos=sp.bos, pad=sp.pad)


def build_pretrained(options: c.PretrainedTokenizer, *, run_dir: Path, texts: Iterable[str]) -> HFTokenizer:
    """A local tokenizer.json, HF tokenizer directory, llmforge tokenizer dir or tiktoken BPE file."""
    from llmforge.data.pretrained import load_pretrained

    del run_dir, texts
    return load_pretrained(Path(options.path).expanduser())
