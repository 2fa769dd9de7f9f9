"""Pickle safety shared by checkpoints and weight files: recognise a pickle from its first
bytes (nothing parsed or unpickled), and the one error and warning that name the trust flag."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

from histoduo.runtime.errors import HistoduoError

CHECKPOINT_FORMAT = "histoduo-checkpoint"
TRUST_FLAG = "--trust-checkpoint"
# safetensors caps its JSON header at 100 MB; a bigger claimed header is a corrupt file.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(HistoduoError):
    """A file is not a usable histoduo checkpoint; the message names the file."""


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-pickle' (old torch.save) or 'unknown', from the
    first bytes only (nothing is parsed or unpickled)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size and header_len <= MAX_HEADER_BYTES:
            return "safetensors"
    return "unknown"


def pickle_names_histoduo(path: Path) -> bool:
    """Whether a torch zip file's pickle mentions our format tag, read with ``pickletools``
    (which lists opcodes and never builds objects, so nothing runs)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(name)
        return any(arg == CHECKPOINT_FORMAT for _, arg, _ in pickletools.genops(data))
    except Exception:  # not a zip, no pickle, a malformed pickle: just not recognised
        return False


def untrusted_pickle_error(path: Path, what: str = "checkpoint") -> CheckpointError:
    return CheckpointError(
        path,
        f"this {what} is a pickle (torch.save), and loading a pickle can run any code it "
        f"contains. histoduo does not load pickles unless told to: if you trust where the "
        f"file comes from, pass {TRUST_FLAG} (and resave it with `histoduo "
        f"convert-checkpoint` for checkpoints, or as .safetensors for weights)",
    )


def warn_trusted_pickle(path: Path) -> None:
    # Straight to stderr, not a logger nobody configured: this warning must be seen.
    print(
        f"warning: {path} is a pickle; loading it with {TRUST_FLAG} runs any code inside it. "
        "Only do this for files from a source you trust.",
        file=sys.stderr,
    )
