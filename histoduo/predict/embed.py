"""``histoduo embed``: one feature vector per tile of every slide of a store, from an encoder.

Output is TRIDENT's layout (``OUT/features_<encoder>/<slide>.h5``, written by
:mod:`histoduo.store.features`), so heads, MIL and TRIDENT's or CLAM's slide-level code read
it. Tiles go through the same DataLoader pipeline as ``predict`` (workers read the store; on a
GPU they hand over JPEG bytes the GPU decodes), are resized to the encoder's input and
normalised with its statistics; bf16 autocast on GPU.

Per slide the run resumes: a complete file from the same encoder, weights (by sha256) and
store slide (by fingerprint) is kept; anything else is recomputed and replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoduo.runtime.errors import HistoduoError

if TYPE_CHECKING:
    from histoduo.models.encoders import Encoder, EncoderSpec
    from histoduo.store import SlideRecord

log = logging.getLogger(__name__)

MANIFEST_NAME = "embed.json"
LOCK_NAME = ".embed.lock"
# Relative difference between the store's and the encoder's training mpp worth a warning.
MPP_TOLERANCE = 0.1


class EmbedError(HistoduoError):
    """An embedding run that cannot start or a slide that cannot be embedded."""


@dataclass(frozen=True, kw_only=True)
class EmbedParams:
    """How ``embed`` runs; recorded in ``embed.json``."""

    encoder: str  # registry name, timm:<model>, or a histoduo checkpoint path
    weights: str | None = None  # local file or model folder (not for checkpoints)
    batch_size: int | None = None  # None: 256 on GPU, 64 on CPU
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    decode: str = "auto"
    workers: int | None = None  # DataLoader workers; None: as predict
    torch_threads: int | None = None
    feature_dtype: str = "float16"  # storage dtype of the features
    overwrite: bool = False  # recompute even complete, matching files
    skip_errors: bool = False
    slides: tuple[str, ...] | None = None  # subset of the store's slides
    quiet: bool = False

    def __post_init__(self) -> None:
        from histoduo.runtime.device import check_decode, check_device_name

        check_device_name(self.device)
        check_decode(self.decode)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"feature dtype must be float16 or float32, not {self.feature_dtype}")


@dataclass
class EmbedResult:
    """What a run did: the folder, per-slide status, throughput and warnings."""

    features_dir: Path
    encoder: str
    weights_sha256: str
    status: dict[str, str] = field(default_factory=dict)  # written / skipped / error: ...
    tiles: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """The one place the output folder is locked: two embeds never write the same files.
    The shared writer lock (runtime/locks.py): it names the holder, and a lock whose
    process is gone on this host (a killed run) is cleared."""
    from histoduo.runtime.locks import writer_lock

    folder.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder / LOCK_NAME, what=f"feature folder {folder}"):
        yield


def _mpp_warning(spec: EncoderSpec, store_mpp: float) -> str | None:
    if abs(store_mpp - spec.mpp) / spec.mpp <= MPP_TOLERANCE:
        return None
    return (
        f"the store's tiles are {store_mpp:g} um/px but {spec.name} was trained at "
        f"{spec.mpp:g} um/px: features at another resolution are usually worse (re-tile "
        f"with --mpp {spec.mpp:g})"
    )


def _is_current(
    path: Path, spec: EncoderSpec, digest: str, record: SlideRecord, qc_checked: bool
) -> bool:
    """A complete file from this encoder, these weights and this version of the slide, with
    the slide's QC flags if the store has them (a file from before they were copied is
    redone, or train-mil would silently keep flagged tiles)."""
    from histoduo.store.features import FeatureFileError, read_feature_info

    if not path.is_file():
        return False
    try:
        info = read_feature_info(path)
    except FeatureFileError:
        return False  # a killed write or a foreign file: redo it
    return (
        info.encoder == spec.name
        and info.weights_sha256 == digest
        and info.extra.get("store_fingerprint") == record.fingerprint
        and info.extra.get("n_tiles") == record.n_tiles
        and bool(info.extra.get("qc_flags", False)) == qc_checked
    )


class TileEmbedder:
    """Encoder + device + precision + transform: store tiles in, (N, D) features out."""

    def __init__(self, encoder: Encoder, params: EmbedParams) -> None:
        from histoduo.predict.engine import _TransformSpec
        from histoduo.runtime.decode import decode_on_device
        from histoduo.runtime.device import Runtime, default_batch_size

        spec = encoder.spec
        self.spec = spec
        self.params = params
        self.runtime = Runtime.create(
            params.device, params.precision, channels_last=False, torch_threads=params.torch_threads
        )
        self.model = self.runtime.prepare_model(encoder)
        self.batch_size = params.batch_size or default_batch_size(self.runtime.device)
        self.transform = _TransformSpec(
            spec.input_size_px,
            list(spec.mean),
            list(spec.std),
            "resize",
            on_device=decode_on_device(params.decode, self.runtime.device),
        )

    def workers(self) -> int:
        from histoduo.runtime.pool import default_workers

        if self.params.workers is not None:
            return self.params.workers
        return default_workers("bytes" if self.transform.on_device else "pixels")

    def forward(self, x: Any) -> np.ndarray:
        """A loader batch -> (B, D) float32 features."""
        import torch

        from histoduo.runtime.decode import model_batch

        x = self.runtime.model_input(model_batch(x, self.runtime.device, self.transform.finish))
        with torch.inference_mode(), self.runtime.autocast():
            return self.model(x).float().cpu().numpy()

    def embed_slide(
        self, store_path: Path, slide: str, n_tiles: int, on_batch: Callable[[int], None]
    ) -> np.ndarray:
        from torch.utils.data import DataLoader

        from histoduo.predict.engine import StoreTiles, _worker_context
        from histoduo.runtime.device import loader_options

        features = np.zeros((n_tiles, self.spec.embedding_dim), dtype=np.float32)
        filled = np.zeros(n_tiles, dtype=bool)
        if n_tiles == 0:
            return features
        tiles = StoreTiles(str(store_path), slide, n_tiles, self.batch_size, self.transform)
        workers = min(self.workers(), math.ceil(n_tiles / self.batch_size))
        loader = DataLoader(
            tiles,
            batch_size=None,  # the dataset yields whole batches
            multiprocessing_context=_worker_context() if workers > 0 else None,
            **loader_options(self.runtime.device, workers),
        )
        for indices, x in loader:
            rows = indices.numpy()
            features[rows] = self.forward(x)
            filled[rows] = True
            on_batch(len(rows))
        if not filled.all():
            raise EmbedError(store_path, f"slide {slide!r}: some tiles got no features")
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        if bad:
            raise EmbedError(
                store_path,
                f"slide {slide!r}: the encoder gave non-finite features for {bad} tiles "
                "(damaged weights, or try --precision fp32)",
            )
        return features


def embed_store(
    store_path: str | Path,
    out_dir: str | Path,
    params: EmbedParams,
    *,
    encoder: Encoder | None = None,
) -> EmbedResult:
    """Features of every tile of every (selected) slide of a store; see the module doc.

    ``encoder`` skips building one from ``params`` (tests and benchmarks pass a random one).
    """
    from histoduo.models.encoders import EncoderError, build_encoder, resolve_encoder
    from histoduo.runtime.files import atomic_write_text, remove_stale_temporaries
    from histoduo.runtime.progress import SlideProgress
    from histoduo.store import TileStore, require_pixels
    from histoduo.store.features import (
        FeatureInfo,
        feature_dir,
        feature_file_path,
        write_feature_file,
    )

    store_path = Path(store_path)
    with TileStore(store_path) as store:  # the store first: loading a big encoder takes a while
        slides = list(params.slides) if params.slides is not None else store.slides
        unknown = sorted(set(slides) - set(store.slides))
        if unknown:
            raise EmbedError(store_path, f"no such slides in the store: {unknown[:5]}")
        records = {name: store.record(name) for name in slides}
        # the --qc each slide was tiled with; absent: QC never checked it
        qc_infos = {name: store.qc_info(name) for name in slides}
        qc_modes = {name: info.get("mode") for name, info in qc_infos.items() if info is not None}
        require_pixels(store)  # a coordinates-only store: say so before loading anything
    if encoder is None:
        try:
            encoder = build_encoder(resolve_encoder(params.encoder), params.weights)
        except EncoderError as err:
            raise EmbedError(err.path, err.reason) from err
    spec = encoder.spec
    digest = encoder.weights_sha256
    folder = feature_dir(out_dir, spec.name)
    result = EmbedResult(folder, spec.name, digest)
    for mpp in sorted({r.target_mpp for r in records.values()}):
        warning = _mpp_warning(spec, mpp)
        if warning:
            result.warnings.append(warning)
            log.warning(warning)

    embedder = TileEmbedder(encoder, params)
    start = time.perf_counter()
    with output_lock(folder), SlideProgress(not params.quiet, len(slides)) as progress:
        remove_stale_temporaries(folder)
        for name, record in records.items():
            path = feature_file_path(folder, name)
            checked_here = name in qc_modes
            if not params.overwrite and _is_current(path, spec, digest, record, checked_here):
                result.status[name] = "skipped"
                progress.slide_done()
                continue
            progress.start_slide(name, record.n_tiles)
            slide_start = time.perf_counter()
            done = 0

            def on_batch(n: int, slide_start: float = slide_start) -> None:
                nonlocal done
                done += n
                progress.advance_tiles(n, done / max(time.perf_counter() - slide_start, 1e-9))

            try:
                with TileStore(store_path) as store:
                    coords = store.coords(name)
                    checked = store.qc(name)  # kept beside the features for train-mil
                features = embedder.embed_slide(store_path, name, record.n_tiles, on_batch)
                info = FeatureInfo(
                    slide=name,
                    encoder=spec.name,
                    weights_sha256=digest,
                    embedding_dim=spec.embedding_dim,
                    mpp=record.target_mpp,
                    input_size_px=spec.input_size_px,
                    mean=tuple(spec.mean),  # type: ignore[arg-type]
                    std=tuple(spec.std),  # type: ignore[arg-type]
                    extra={
                        "encoder_spec": spec.describe(),
                        # what to pass to rebuild it (a checkpoint encoder's path)
                        "encoder_arg": spec.checkpoint or spec.name,
                        "weights_file": Path(params.weights).name if params.weights else "",
                        "encoder_training_mpp": spec.mpp,
                        "tile_size_px": record.tile_size_px,
                        "store": str(store_path),
                        "store_fingerprint": record.fingerprint,
                        "n_tiles": record.n_tiles,
                        "qc_flags": checked is not None,
                        "precision": embedder.runtime.precision,
                    },
                )
                write_feature_file(
                    path,
                    info,
                    features,
                    coords,
                    record.trident_attrs(),
                    dtype=_storage_dtype(features, params.feature_dtype),
                    qc_flags=None if checked is None else checked["qc_flags"],
                    qc_mode=qc_modes.get(name),
                )
            except HistoduoError as err:
                if not params.skip_errors:
                    raise
                result.status[name] = f"error: {err}"
                log.error("%s", err)
            else:
                result.status[name] = "written"
                result.tiles += record.n_tiles
            progress.slide_done()
        result.seconds = time.perf_counter() - start
        manifest = {
            "encoder": spec.describe(),
            "weights_sha256": digest,
            "params": {k: v for k, v in asdict(params).items() if k != "quiet"},
            "runtime": embedder.runtime.describe(),
            "status": result.status,
            "warnings": result.warnings,
            "tiles_embedded": result.tiles,
            "seconds": round(result.seconds, 3),
        }
        atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, default=str))
    return result


def _storage_dtype(features: np.ndarray, wanted: str) -> str:
    """float16 halves the files, but values beyond its range would become inf: keep those
    slides in float32 instead of writing damaged features."""
    if wanted == "float16" and len(features) and np.abs(features).max() > np.finfo(np.float16).max:
        log.warning("features exceed float16's range: stored as float32")
        return "float32"
    return wanted
