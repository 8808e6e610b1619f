"""Where text comes from: the built-in corpus (this Python's standard library), local files, or the
Hugging Face hub. Every source becomes a list of documents plus a meta.json `source` section.

Plain text files (.txt/.md/.py) are read here directly, one document per file, so a bad byte can be
reported with its file and offset and replacements counted exactly; structured files (.json/.jsonl/
.parquet) and hub datasets go through `datasets` loaders (streaming, so nothing is cached on disk).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import platform
import socket
import sysconfig
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moegpt.errors import MoegptError

ProgressFn = Callable[[str, int, "int | None"], None]  # (stage, done, total or None)

TEXT_SUFFIXES = (".txt", ".md", ".py")
STRUCTURED_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SUPPORTED = ", ".join(TEXT_SUFFIXES + tuple(STRUCTURED_SUFFIXES))
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                        "__pycache__"}
DEFAULT_STDLIB_MAX_BYTES = 16_000_000  # all of CPython 3.11's non-test stdlib is ~11.4 MB
HUB_TIMEOUT_S = 3.0
ENCODING_ERRORS = ("strict", "replace")


@dataclass
class Corpus:
    names: list[str] = field(default_factory=list)  # one per document: file path or file#record
    texts: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the meta.json `source` section


class Collector:
    """Gathers documents up to a byte cap (the last one cut at a line end), skipping blank ones."""

    def __init__(self, max_bytes: int | None, progress: ProgressFn | None, total: int | None) -> None:
        self.corpus = Corpus()
        self.max_bytes = max_bytes
        self.progress = progress
        self.total = min(total, max_bytes) if total is not None and max_bytes else (total or max_bytes)
        self.bytes = 0
        self.skipped_blank = 0
        self.cut = False  # the byte cap ended the corpus inside a document
        self.reported = 0
        self.hasher = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.cut or (self.max_bytes is not None and self.bytes >= self.max_bytes)

    def add(self, name: str, text: str) -> None:
        if not text.strip():
            self.skipped_blank += 1
            return
        data = text.encode("utf-8", errors="surrogatepass")
        if self.max_bytes is not None and self.bytes + len(data) > self.max_bytes:
            # The cap falls inside this document: keep its head up to the last line end, take nothing more.
            self.cut = True
            data = data[: self.max_bytes - self.bytes]
            line_end = data.rfind(b"\n")
            text = data[: line_end + 1 if line_end > 0 else len(data)].decode("utf-8", errors="ignore")
            data = text.encode("utf-8", errors="surrogatepass")
            if not text.strip():
                return
        self.corpus.names.append(name)
        self.corpus.texts.append(text)
        # The fingerprint covers names and text, so it changes when either does.
        for part in (name.encode("utf-8", errors="surrogatepass"), len(data).to_bytes(8, "little"), data):
            self.hasher.update(part)
        self.bytes += len(data)
        if self.progress and self.bytes - self.reported >= 1 << 16:  # hub datasets yield many small records
            self.reported = self.bytes
            self.progress("read", self.bytes, self.total)


# ---- bytes to text --------------------------------------------------------------------------------

_replaced = threading.local()


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError)
    _replaced.count = getattr(_replaced, "count", 0) + err.end - err.start
    return "\ufffd", err.end


codecs.register_error("moegpt-count-replace", _count_and_replace)


def decode_utf8(data: bytes, name: str, errors: str) -> tuple[str, int]:
    """Decode one file; strict names the file and byte offset of the first problem, replace counts bytes."""
    if errors == "strict":
        nul = data.find(b"\0")
        if nul >= 0:
            raise MoegptError(f"{name} looks binary (NUL byte at offset {nul}); remove it from the source "
                              "or pass --encoding-errors replace")
        try:
            return data.decode("utf-8"), 0
        except UnicodeDecodeError as err:
            raise MoegptError(f"{name} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                              "pass --encoding-errors replace to substitute U+FFFD") from None
    _replaced.count = 0
    text = data.decode("utf-8", errors="moegpt-count-replace")
    return text, _replaced.count


# ---- sources ----------------------------------------------------------------------------------------

def load_corpus(source: str, *, text_field: str | None = None, split: str = "train",
                max_bytes: int | None = None, encoding_errors: str = "strict", scratch: Path | None = None,
                progress: ProgressFn | None = None) -> Corpus:
    """Read a source spec: `stdlib`, `hf:owner/name[:config]`, or a local file, folder or glob."""
    check_read_options(max_bytes, encoding_errors)
    if source == "stdlib":
        cap = DEFAULT_STDLIB_MAX_BYTES if max_bytes is None else max_bytes
        corpus, state = read_stdlib(cap, encoding_errors, progress)
    elif source.startswith("hf:"):
        corpus, state = read_hub(source, text_field, split, max_bytes, progress)
        cap = max_bytes
    elif is_unknown_scheme(source):
        raise MoegptError(f"unknown source scheme in {source!r}; use stdlib, hf:owner/name[:config], "
                          "or a local file, folder or glob")
    else:
        corpus, state = read_local(source, text_field, max_bytes, encoding_errors, scratch, progress)
        cap = max_bytes
    if not corpus.texts:
        what = " after dropping blank documents" if state["skipped_blank"] else ""
        raise MoegptError(f"source {source!r} holds no text{what}; nothing to prepare")
    corpus.source.update({"spec": source, "sha256": state.pop("sha256"), "documents": len(corpus.texts),
                          "bytes": state.pop("bytes"), "max_bytes": cap, "encoding_errors": encoding_errors,
                          **state})
    return corpus


def check_read_options(max_bytes: int | None, encoding_errors: str) -> None:
    if encoding_errors not in ENCODING_ERRORS:
        raise MoegptError(f"--encoding-errors must be strict or replace (got {encoding_errors!r})")
    if max_bytes is not None and max_bytes <= 0:
        raise MoegptError(f"--max-bytes must be > 0 (got {max_bytes})")


def is_unknown_scheme(source: str) -> bool:
    scheme, sep, _ = source.partition(":")
    # "C:\\x" is a Windows drive, and an existing path wins over any scheme-looking prefix.
    return bool(sep) and len(scheme) > 1 and scheme.isidentifier() and not Path(source).exists()


def finish(collector: Collector, **extra: Any) -> tuple[Corpus, dict[str, Any]]:
    if collector.progress:
        collector.progress("read", collector.bytes, collector.bytes)
    state = {"sha256": collector.hasher.hexdigest(), "bytes": collector.bytes, "truncated": collector.cut,
             "skipped_blank": collector.skipped_blank, **extra}
    return collector.corpus, state


def stdlib_files() -> tuple[Path, list[tuple[str, Path]]]:
    """The running Python's standard-library .py files, sorted by path, without test suites and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for filename in filenames:
            if filename.endswith(".py") and not filename.startswith("test_") and filename != "conftest.py":
                path = Path(dirpath) / filename
                found.append((path.relative_to(root).as_posix(), path))
    return root, sorted(found)


def read_stdlib(max_bytes: int, errors: str, progress: ProgressFn | None) -> tuple[Corpus, dict[str, Any]]:
    root, files = stdlib_files()
    collector = Collector(max_bytes, progress, sum(path.stat().st_size for _, path in files))
    replaced = read = 0
    for rel, path in files:
        if collector.full:
            break
        text, n = decode_utf8(path.read_bytes(), str(path), errors)
        replaced, read = replaced + n, read + 1
        collector.add(rel, text)
    version = platform.python_version()
    corpus, state = finish(collector, replaced_bytes=replaced, files=read)
    corpus.source.update({
        "kind": "stdlib", "root": str(root), "python_version": version,
        "python_implementation": platform.python_implementation(),
        "excluded": sorted(STDLIB_EXCLUDED_DIRS) + ["test_*.py", "conftest.py"],
        "description": f"{platform.python_implementation()} {version} standard library, .py files "
                       "(test suites, idlelib, site-packages excluded)"})
    return corpus, state


def local_files(spec: str) -> tuple[Path, list[Path]]:
    """Expand a file, folder (recursive, hidden entries skipped) or glob into sorted supported files."""
    suffixes = set(TEXT_SUFFIXES) | set(STRUCTURED_SUFFIXES)
    if glob.has_magic(spec):
        matches = [Path(p) for p in glob.glob(spec, recursive=True)]
        files = sorted(p for p in matches if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise MoegptError(f"no {SUPPORTED} files match {spec!r}")
        return Path(os.path.commonpath([p.parent for p in files])), files
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise MoegptError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; "
                              f"supported: {SUPPORTED}")
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise MoegptError(f"no {SUPPORTED} files under {path}")
        return path, files
    raise MoegptError(f"no such file or folder: {spec}")


def read_local(spec: str, text_field: str | None, max_bytes: int | None, errors: str, scratch: Path | None,
               progress: ProgressFn | None) -> tuple[Corpus, dict[str, Any]]:
    base, files = local_files(spec)
    structured = [p for p in files if p.suffix.lower() in STRUCTURED_SUFFIXES]
    if structured and not text_field:
        raise MoegptError(f"{structured[0]} is structured ({structured[0].suffix}); pass --text-field to "
                          "name the field that holds the text")
    collector = Collector(max_bytes, progress, sum(p.stat().st_size for p in files))
    replaced = 0
    for path in files:
        if collector.full:
            break
        rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text, n = decode_utf8(path.read_bytes(), str(path), errors)
            replaced += n
            collector.add(rel, text)
            continue
        load_path = path
        if suffix != ".parquet":  # parquet strings are UTF-8-checked by arrow itself
            text, n = decode_utf8(path.read_bytes(), str(path), errors)
            replaced += n
            if n:  # hand datasets a repaired copy; the scratch folder goes away with the temp output
                scratch = scratch or Path(os.environ.get("TMPDIR", "/tmp"))
                scratch.mkdir(parents=True, exist_ok=True)
                load_path = scratch / f"repaired-{len(collector.corpus.texts)}{suffix}"
                load_path.write_text(text, encoding="utf-8")
        records = load_records(STRUCTURED_SUFFIXES[suffix], str(load_path), str(path))
        add_records(collector, records, str(text_field), rel)
    corpus, state = finish(collector, replaced_bytes=replaced, files=len(files), text_field=text_field)
    shown_path = spec if glob.has_magic(spec) else str(Path(spec).expanduser().resolve())
    corpus.source.update({"kind": "local", "path": shown_path,
                          "description": f"{len(files)} local file(s) from {spec}"})
    return corpus, state


def load_records(builder: str, path: str, shown: str) -> Iterable[dict[str, Any]]:
    import datasets

    try:
        return iter(datasets.load_dataset(builder, data_files=[path], split="train", streaming=True))
    except Exception as err:  # datasets raises many types; the user needs the file and the reason
        raise MoegptError(f"cannot read {shown}: {type(err).__name__}: {err}") from None


def add_records(collector: Collector, records: Iterable[dict[str, Any]], text_field: str, shown: str) -> None:
    index = 0
    try:
        for index, record in enumerate(records):  # noqa: B007  (index names the record in errors)
            if collector.full:
                break
            if text_field not in record:
                raise MoegptError(f"{shown} record {index} has no field {text_field!r}; fields: "
                                  f"{', '.join(map(str, record)) or '(none)'}")
            value = record[text_field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise MoegptError(f"{shown} record {index}: field {text_field!r} is "
                                  f"{type(value).__name__}, not text")
            collector.add(f"{shown}#{index}", value)
    except MoegptError:
        raise
    except Exception as err:  # malformed JSON and arrow errors surface while iterating
        raise MoegptError(f"cannot read {shown} (near record {index}): {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None


# ---- the hub ---------------------------------------------------------------------------------------

def host_reachable(host: str, port: int = 443, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can a TCP connection to host (or the HTTPS proxy) open within `timeout`? DNS included, via a thread."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 80
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if not host_reachable(host):
        return f"{host} did not answer within {HUB_TIMEOUT_S:g} s"
    return None


def parse_hub_spec(source: str) -> tuple[str, str | None]:
    repo, _, config = source[len("hf:"):].partition(":")
    if not repo or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise MoegptError(f"hub source must be hf:owner/name[:config] (got {source!r})")
    return repo, config or None


def read_hub(source: str, text_field: str | None, split: str, max_bytes: int | None,
             progress: ProgressFn | None) -> tuple[Corpus, dict[str, Any]]:
    repo, config = parse_hub_spec(source)
    reason = hub_offline_reason()
    if reason:
        raise MoegptError(f"cannot reach the Hugging Face hub for {source} ({reason}); download the data "
                          "elsewhere and pass a local path (.jsonl/.parquet file or a folder of .txt)")
    import datasets

    try:
        records = iter(datasets.load_dataset(repo, config, split=split, streaming=True))
        first = next(records, None)
    except Exception as err:
        raise MoegptError(f"loading {source} (split {split!r}) failed: {type(err).__name__}: {err}") from None
    if first is None:
        raise MoegptError(f"{source} split {split!r} has no records; nothing to prepare")
    if text_field is None:  # hub datasets nearly always call it "text"; say so when they do not
        if "text" not in first:
            raise MoegptError(f"{source} has no 'text' field; pass --text-field (fields: {', '.join(first)})")
        text_field = "text"
    collector = Collector(max_bytes, progress, None)

    def chained() -> Iterable[dict[str, Any]]:
        yield first
        yield from records

    add_records(collector, chained(), text_field, source)
    corpus, state = finish(collector, repo=repo, config=config, split=split, text_field=text_field,
                           replaced_bytes=0)
    corpus.source.update({"kind": "hub", "description": f"Hugging Face dataset {repo}"
                          f"{f' ({config})' if config else ''}, split {split}, field {text_field}",
                          "datasets_version": datasets.__version__})
    return corpus, state
