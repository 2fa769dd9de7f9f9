"""Slide labels, patient-level splits and streamed bags for slide-level training.

Only the labels, the file paths and one feature file's provenance per slide are held in
memory; features are read one bag at a time (in a DataLoader worker), so a cohort's size is
bounded by disk, not RAM.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoduo.runtime.errors import HistoduoError
from histoduo.store.features import FeatureInfo, feature_files, read_feature_bag, read_feature_info
from histoduo.training.data import SPLITS, TileTable, make_splits


class MILLabelError(HistoduoError):
    """A slide-label CSV, splits file or feature folder that cannot be used as given."""


@dataclass
class Cohort:
    """Labelled slides with a feature file each: ``frame`` has slide, label (int), patient, path."""

    frame: pd.DataFrame
    class_names: list[str]
    ordinal: bool  # classes were declared in grade order (--grades)
    info: FeatureInfo  # the first file's provenance; every file was checked against it

    def label_counts(self, rows: pd.DataFrame | None = None) -> dict[str, int]:
        labels = (self.frame if rows is None else rows)["label"].to_numpy()
        counts = np.bincount(labels, minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist()))


def read_label_csv(path: Path) -> pd.DataFrame:
    """``slide,label[,patient]`` as strings; a BOM, spaces and header case are tolerated."""
    if not path.is_file():
        raise MILLabelError(path, "slide-label CSV not found")
    try:
        # utf-8-sig: Excel writes a byte-order mark that would otherwise rename 'slide'.
        frame = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MILLabelError(path, f"not a readable CSV ({exc})") from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = {"slide", "label"} - set(frame.columns)
    if missing:
        raise MILLabelError(
            path,
            f"needs columns slide,label[,patient]; missing {sorted(missing)} "
            f"(found {list(frame.columns)})",
        )
    for column in [c for c in ("slide", "label", "patient") if c in frame.columns]:
        frame[column] = frame[column].str.strip()
    empty = frame.index[frame["slide"].isna() | (frame["slide"] == "")]
    if len(empty):
        raise MILLabelError(path, f"row {int(empty[0]) + 2} has no slide name")
    no_label = frame.loc[frame["label"].isna() | (frame["label"] == ""), "slide"]
    if len(no_label):
        raise MILLabelError(path, f"slides without a label: {', '.join(no_label[:5])}")
    conflicts = frame.groupby("slide")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise MILLabelError(path, f"slides with two labels: {', '.join(conflicts.index[:5])}")
    frame = frame.drop_duplicates("slide").reset_index(drop=True)
    if "patient" not in frame.columns:
        frame["patient"] = frame["slide"]
    frame["patient"] = frame["patient"].fillna(frame["slide"]).replace("", np.nan)
    frame["patient"] = frame["patient"].fillna(frame["slide"])
    return frame[["slide", "label", "patient"]]


def load_cohort(features_dir: Path, labels_csv: Path, grades: list[str] | None) -> Cohort:
    """The labelled slides, each matched to its feature file, and the class order."""
    labels = read_label_csv(labels_csv)
    files = feature_files(features_dir)
    missing = sorted(set(labels["slide"]) - set(files))
    if missing:
        raise MILLabelError(
            labels_csv,
            f"{len(missing)} slide(s) have no complete feature file in {features_dir}: "
            f"{', '.join(missing[:5])} (run embed for them, or drop them from the CSV)",
        )
    found = sorted(set(labels["label"]))
    if grades is not None:
        unknown = sorted(set(found) - set(grades))
        if unknown:
            raise MILLabelError(
                labels_csv, f"unknown label(s) {unknown}; --grades declares {grades}"
            )
        class_names = list(grades)
    else:
        class_names = found
    if len(set(found)) < 2:
        raise MILLabelError(labels_csv, f"needs slides of at least two labels, found {found}")
    frame = labels.assign(
        label=[class_names.index(v) for v in labels["label"]],
        path=[str(files[s]) for s in labels["slide"]],
    )
    info = _check_provenance(frame["path"].tolist())
    return Cohort(frame, class_names, grades is not None, info)


def _check_provenance(paths: Sequence[str]) -> FeatureInfo:
    """Every file made by the same encoder (name, weights, width): a model needs one."""
    first = read_feature_info(paths[0])
    for path in paths[1:]:
        info = read_feature_info(path)
        same = (info.encoder, info.weights_sha256, info.embedding_dim) == (
            first.encoder,
            first.weights_sha256,
            first.embedding_dim,
        )
        if not same:
            raise MILLabelError(
                path,
                f"made by encoder {info.encoder!r} ({info.embedding_dim}-d, weights "
                f"{info.weights_sha256[:12] or 'none'}), but {paths[0]} by {first.encoder!r} "
                f"({first.embedding_dim}-d, weights {first.weights_sha256[:12] or 'none'})",
            )
    return first


# --- splits ----------------------------------------------------------------------------------


def _group_table(cohort: Cohort) -> TileTable:
    frame = cohort.frame.assign(tile=0, group=cohort.frame["patient"])
    return TileTable(frame[["slide", "tile", "label", "group"]], cohort.class_names)


def split_by_patient(
    cohort: Cohort, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """slide -> train/val/test, whole patients per split, stratified by label and seeded."""
    by_patient = make_splits(_group_table(cohort), val_fraction, test_fraction, seed)
    return {s: by_patient[p] for s, p in zip(cohort.frame["slide"], cohort.frame["patient"])}


def fold_of_patient(cohort: Cohort, folds: int, seed: int) -> dict[str, int]:
    """patient -> fold in 0..K-1, stratified: patients sorted by (label, random) and dealt
    round-robin, so each fold holds about 1/K of every class."""
    dominant = cohort.frame.groupby("patient")["label"].agg(lambda s: int(np.bincount(s).argmax()))
    if len(dominant) < folds:
        raise MILLabelError(
            "--folds", f"{folds} folds need at least {folds} patients, found {len(dominant)}"
        )
    keys = np.random.default_rng([seed, 0xF01D]).permutation(len(dominant))
    order = sorted(range(len(dominant)), key=lambda i: (dominant.iloc[i], keys[i]))
    return {str(dominant.index[i]): position % folds for position, i in enumerate(order)}


def fold_splits(cohort: Cohort, folds: int, fold: int, seed: int) -> dict[str, str]:
    """slide -> split for fold ``fold``: that fold tests, the next validates, the rest train."""
    fold_of = fold_of_patient(cohort, folds, seed)
    names = {fold: "test", (fold + 1) % folds: "val"}
    return {
        s: names.get(fold_of[p], "train")
        for s, p in zip(cohort.frame["slide"], cohort.frame["patient"])
    }


def write_splits_csv(path: Path, cohort: Cohort, split_of: dict[str, str]) -> None:
    from histoduo.runtime.files import atomic_write

    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "split", "patient", "label"])
        for slide, patient, label in cohort.frame[["slide", "patient", "label"]].itertuples(
            index=False
        ):
            writer.writerow([slide, split_of[slide], patient, cohort.class_names[label]])


def read_splits_csv(path: Path, cohort: Cohort) -> dict[str, str]:
    """A run's own splits.csv (on resume): the same slides, each in a known split."""
    if not path.is_file():
        raise MILLabelError(path, "splits file not found (cannot resume without it)")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    split_of = {row["slide"].strip(): row["split"].strip() for row in rows if row.get("slide")}
    bad = sorted(set(split_of.values()) - set(SPLITS))
    if bad:
        raise MILLabelError(path, f"unknown split name(s) {bad}")
    missing = sorted(set(cohort.frame["slide"]) - set(split_of))
    if missing:
        raise MILLabelError(path, f"no split for labelled slide(s) {', '.join(missing[:5])}")
    return split_of


# --- bags --------------------------------------------------------------------------------------


class BagDataset:
    """Map-style dataset: item ``i`` is slide ``i``'s (features float32 tensor, label, i),
    read from its file when asked, so only the bags in flight are in memory."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], qc: str | None = None) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.qc = qc  # QC policy for flagged tiles (FeatureBag.kept)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        import torch

        bag = read_feature_bag(self.paths[index]).kept(self.qc)
        return torch.from_numpy(bag.features), int(self.labels[index]), int(index)


class EpochSlides:
    """The slide order of one epoch, seeded by (seed, epoch) so a resumed run draws the same.

    Balanced: as many draws as slides, each class drawn equally often (with replacement), so
    a rare grade weighs as much as a common one. Otherwise: every slide once, shuffled.
    """

    def __init__(self, labels: Sequence[int], seed: int, balanced: bool) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed = seed
        self.balanced = balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 0xB46])
        if not self.balanced:
            yield from rng.permutation(len(self.labels)).tolist()
            return
        by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        classes = np.resize(rng.permutation(len(by_class)), len(self.labels))
        rng.shuffle(classes)
        for c in classes:
            yield int(rng.choice(by_class[c]))
