"""Which slides a run processes: files, folders, globs or a slide CSV, and a shard of them."""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from histoduo.slide import find_slides, unsafe_name_reason
from histoduo.slide.shards import parse_shard_text

# A slide's level-0 resolution: scanners give 0.1-1 um/px, plain images and thumbnails
# maybe tens; 1 mm per pixel is no microscope, so a larger value is a typo or a unit mix-up.
MAX_SLIDE_MPP = 1000.0


def check_slide_mpp(mpp: float, where: str) -> float:
    """``mpp`` if it is a plausible level-0 resolution, else ValueError naming ``where``."""
    if not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"{where}: mpp must be positive and finite, got {mpp}")
    if mpp > MAX_SLIDE_MPP:
        raise ValueError(
            f"{where}: mpp {mpp:g} um/px is not a slide resolution (at most "
            f"{MAX_SLIDE_MPP:g}; scanners give about 0.25 at 40x, 0.5 at 20x)"
        )
    return mpp


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
    # utf-8-sig: Excel starts its "CSV UTF-8" files with a byte-order mark.
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
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
            if mpp is not None:
                check_slide_mpp(mpp, f"{csv_path}:{line_no}")
            sources.append(SlideSource(path, mpp))
    return sources


def collect_sources(inputs: list[str | Path], slide_mpp: float | None = None) -> list[SlideSource]:
    """Slides from files, folders (recursive), globs and ``.csv`` slide tables.

    ``slide_mpp`` overrides every slide's own mpp, except where a CSV row gives its own.
    """
    if slide_mpp is not None:
        check_slide_mpp(slide_mpp, "--slide-mpp")
    sources: list[SlideSource] = []
    plain: list[str | Path] = []
    for item in inputs:
        if str(item).lower().endswith(".csv"):
            for source in read_slide_csv(Path(item)):
                sources.append(SlideSource(source.path, source.mpp or slide_mpp))
        else:
            plain.append(item)
    sources.extend(SlideSource(path, slide_mpp) for path in find_slides(plain))
    names: dict[str, SlideSource] = {}
    unique: list[SlideSource] = []
    for source in sources:
        check_output_name(source.name, source.path)
        seen = names.get(source.name)
        if seen is None:
            names[source.name] = source
            unique.append(source)
        elif _same_file(seen.path, source.path):
            # The same slide listed twice (a CSV row repeated, a file and its folder):
            # one slide, processed and reported once, unless the two rows disagree.
            if seen.mpp != source.mpp:
                raise ValueError(
                    f"{source.path} is listed twice with different mpp ({seen.mpp} and "
                    f"{source.mpp}); keep one row"
                )
        else:
            raise ValueError(
                f"two slides share the name {source.name!r}: {seen.path} and "
                f"{source.path}; slide names key the outputs, so they must be unique"
            )
    return unique


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the names as given
        return a.absolute() == b.absolute()


def check_output_name(name: str, where: str | Path) -> None:
    """ValueError naming ``where`` when ``name`` would put outputs outside the output folder."""
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise ValueError(
            f"{where}: slide name {name!r} {reason}, so its outputs would go outside the "
            "output folder (or replace it); rename the file or slide"
        )


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based K), 'auto' or 'auto/N' (a SLURM array task) -> (K, N); None passes through.

    Raises ValueError (histoduo.slide.shards.ShardError) saying what is wrong.
    """
    return parse_shard_text(text)


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
