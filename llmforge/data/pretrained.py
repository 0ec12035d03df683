"""Local pretrained tokenizers: tokenizer.json files, HF tokenizer folders and tiktoken BPE files.

Nothing is downloaded. A tiktoken file holds only `base64(token) rank` lines, so we
rebuild the BPE merges from the ranks (the same algorithm tiktoken applies when encoding)
and express it as an HF byte-level BPE.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from llmforge.data.tokenizers import HF_FILES, HFTokenizer, byte_unicode, load_tokenizer, read_text
from llmforge.spec.errors import UserError

# Which token ends a document, when no config says: the common names, most specific first.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eos|>", "</s>", "<eos>", "<|im_end|>")
# The pre-tokenization regex of tiktoken's cl100k_base (a tiktoken file does not carry its own).
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _token_name(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_specials(folder: Path, hf) -> dict[str, str | None]:
    """eos/bos/pad names from tokenizer_config.json or special_tokens_map.json, else by common name."""
    found: dict[str, str | None] = {"eos": None, "bos": None, "pad": None}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: invalid JSON: {e}", "fix or remove the file") from None
            for role in found:
                found[role] = found[role] or _token_name(config.get(f"{role}_token"))
    if found["eos"] is None:
        found["eos"] = next((t for t in EOS_NAMES if hf.token_to_id(t) is not None), None)
    return found


def _load_json_tokenizer(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HF

    try:
        hf = HF.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path}: not a loadable tokenizer.json: {e}", "point tokenizer.path at a tokenizer.json written by HF tokenizers") from None
    sp = _hf_specials(path.parent, hf)
    if sp["eos"] is None:
        raise UserError(f"{path}: cannot tell which token ends a document",
                        "put a tokenizer_config.json with eos_token next to it (HF tokenizer folders have one)")
    # The HF files beside it go along as they are (generation_config.json's eos ids say where
    # generation stops; transformers reads them after an export), as an import keeps them.
    from llmforge.data.tokenizers import HF_FILES, read_text

    files = {name: read_text(path.parent / name) for name in HF_FILES if (path.parent / name).is_file()}
    return HFTokenizer(hf, kind="pretrained", eos=sp["eos"], bos=sp["bos"], pad=sp["pad"], text=read_text(path), files=files)


def _read_tiktoken(path: Path) -> dict[bytes, int] | None:
    """{token bytes: rank}, or None when the file is not in tiktoken's format."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return ranks or None


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Apply the merges ranked below `max_rank` to `token`'s bytes: what tiktoken's BPE would."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def tiktoken_to_hf(path: Path, ranks: dict[bytes, int]) -> HFTokenizer:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{path}: the tiktoken file lacks {len(missing)} of the 256 single bytes (e.g. {missing[0]})",
                        "a byte-level BPE needs every byte as a token")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once", "the file is not a tiktoken BPE ranking")
    to_char = byte_unicode()

    def as_str(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _merge_parts(ranks, tok, rank)
            if len(parts) != 2:
                raise UserError(f"{path}: token of rank {rank} cannot be built by merging two lower-ranked tokens", "the file is not a BPE ranking")
            merges.append((as_str(parts[0]), as_str(parts[1])))
    hf = HF(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    eos = EOS_NAMES[0]
    hf.add_special_tokens([eos])  # takes the id after the highest rank, as in tiktoken's encodings
    return HFTokenizer(hf, kind="pretrained", eos=eos, bos=None, pad=None)


def load_pretrained(path: Path) -> HFTokenizer:
    """Load whatever local tokenizer `path` names; a clear error for anything else."""
    if path.is_dir():
        if (path / "meta.json").is_file():
            return load_tokenizer(path)  # another llmforge run's tokenizer dir
        if (path / "tokenizer.json").is_file():
            return _load_json_tokenizer(path / "tokenizer.json")
        candidates = sorted(path.glob("*.tiktoken")) + sorted(path.glob("tokenizer.model"))
        if not candidates:
            raise UserError(f"{path}: no tokenizer.json, meta.json or *.tiktoken file in this folder",
                            "point tokenizer.path at a tokenizer.json, an HF tokenizer folder or a tiktoken BPE file")
        path = candidates[0]
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}", "point tokenizer.path at a local file; nothing is downloaded")
    if path.suffix == ".json":
        return _load_json_tokenizer(path)
    ranks = _read_tiktoken(path)
    if ranks is None:
        raise UserError(f"{path}: neither a tokenizer.json nor a tiktoken BPE file (`base64-token rank` lines)",
                        "sentencepiece .model files are not supported; convert them to tokenizer.json with transformers")
    return tiktoken_to_hf(path, ranks)
