"""Read a checkpoint's small metadata (step, data reference, timing) without loading its tensors.

`load_checkpoint` reads and hashes the whole file and materialises every tensor: right for resuming,
far too slow for listing many runs. A checkpoint's payload is a `torch.save` zip archive behind our
fixed-size header; Python's zipfile finds the archive behind the header by itself, and the archive's
`data.pkl` holds the state's structure with tensors only as references to separate entries. This
module unpickles that one entry with an unpickler that resolves no global at all (each becomes an
inert stub), so nothing in the file can run code, and tensors come back as None.

The content hash is not checked: this is for display, never for training.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any


class _Inert:
    """Stands in for every global the pickle names; calling it builds nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Inert()

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage: not read


def peek_checkpoint(path: str | Path, keys: tuple[str, ...] = ("step", "data_ref", "timing")) -> dict[str, Any]:
    """The requested top-level entries of a checkpoint's state (tensors inside them come back as None).

    Returns {} when the file cannot be read this way (missing, damaged, another format): callers treat
    the metadata as unknown.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            entry = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if entry is None:
                return {}
            state = _MetadataUnpickler(io.BytesIO(archive.read(entry))).load()
    except Exception:  # any damage just means "unknown"; load_checkpoint reports it properly
        return {}
    if not isinstance(state, dict):
        return {}
    return {key: state[key] for key in keys if key in state}
