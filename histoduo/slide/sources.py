"""Which slides a run processes: files, folders, globs or a slide CSV, and a shard of them."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from histoduo.slide import find_slides, unsafe_name_reason


@dataclass(frozen=True)
class SlideSource:
    """One slide to process, with a per-slide mpp override when the CSV gives one."""

    path: Path
    mpp: float | None = None

    @property
    def name(self) -> str:
        from histoduo.slide import slide_name

        return slide_name(self.path)


def read_slide_csv(csv_path: Path) -> list[SlideSource]:
    """A slide CSV: a ``path`` column (relative paths are relative to the CSV), optional ``mpp``."""
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path}: slide CSV not found")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ValueError(f"{csv_path}: a slide CSV needs a 'path' column (got {fields})")
        sources = []
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path"):
                continue
            path = Path(row["path"])
            if not path.is_absolute():
                path = csv_path.parent / path
            mpp_text = row.get("mpp", "")
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                raise ValueError(
                    f"{csv_path}:{line_no}: mpp {mpp_text!r} is not a number"
                ) from None
            if mpp is not None and mpp <= 0:
                raise ValueError(f"{csv_path}:{line_no}: mpp must be positive, got {mpp}")
            sources.append(SlideSource(path, mpp))
    return sources


def collect_sources(inputs: list[str | Path], slide_mpp: float | None = None) -> list[SlideSource]:
    """Slides from files, folders (recursive), globs and ``.csv`` slide tables.

    ``slide_mpp`` overrides every slide's own mpp, except where a CSV row gives its own.
    """
    sources: list[SlideSource] = []
    plain: list[str | Path] = []
    for item in inputs:
        if str(item).lower().endswith(".csv"):
            for source in read_slide_csv(Path(item)):
                sources.append(SlideSource(source.path, source.mpp or slide_mpp))
        else:
            plain.append(item)
    sources.extend(SlideSource(path, slide_mpp) for path in find_slides(plain))
    names: dict[str, Path] = {}
    for source in sources:
        check_output_name(source.name, source.path)
        if source.name in names and names[source.name] != source.path:
            raise ValueError(
                f"two slides share the name {source.name!r}: {names[source.name]} and "
                f"{source.path}; slide names key the outputs, so they must be unique"
            )
        names[source.name] = source.path
    return sources


def check_output_name(name: str, where: str | Path) -> None:
    """ValueError naming ``where`` when ``name`` would put outputs outside the output folder."""
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise ValueError(
            f"{where}: slide name {name!r} {reason}, so its outputs would go outside the "
            "output folder (or replace it); rename the file or slide"
        )


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based K) -> (K, N); None passes through."""
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 2/8), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def shard_of(name: str, n: int) -> int:
    """The 1-based shard (of ``n``) that slide ``name`` belongs to, for every command.

    Hashes the exact name (any characters: ``lung_aca/img1.jpeg``, dots, spaces), so every
    job of an array computes the same split without coordination, a slide lands in exactly
    one shard, and the split is stable under reordering and adding other slides.
    """
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_names(names: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The slide names of shard K of N (a store's slides, a run's slides), in their order."""
    if shard is None:
        return list(names)
    k, n = shard
    return [name for name in names if shard_of(name, n) == k]


def select_shard(sources: list[SlideSource], shard: tuple[int, int] | None) -> list[SlideSource]:
    """The slides of shard K of N, by slide name (:func:`shard_of`)."""
    if shard is None:
        return sources
    k, n = shard
    return [s for s in sources if shard_of(s.name, n) == k]
