"""End-to-end `embed` tiles/s against encoder-forward-only tiles/s, measured in one run.

    python benchmarks/bench_embed.py                          # ViT-S/16 at 224 px, CPU
    python benchmarks/bench_embed.py --encoder tiny --size 4096  # quick look
    python benchmarks/bench_embed.py --encoder uni --device cuda --batch 256   # GPU, bf16

On one synthetic slide tiled into a store (0.5 um/px, 224 px tiles):
  forward-only  the same tiles, read and normalised beforehand and held in memory (on a GPU,
                already there), through the same TileEmbedder (model, batch, precision)
  end-to-end    `embed_store` as the CLI calls it: DataLoader workers reading the store (on a
                GPU, JPEG bytes decoded there), the encoder, and the feature file written
The encoder is randomly initialised (same cost as its real weights; none are downloaded).
Goal on 2 CPU cores with a small ViT: end-to-end >= 90% of forward-only. The load average
before and after is printed: other work on the machine changes both numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ENCODERS = {
    # ViT-S/16 at 224 px (22 M params, ~4.6 GFLOPs/tile): a ViT a CPU can run
    "small": dict(timm_name="vit_small_patch16_224", embedding_dim=384),
    # ViT-Ti/16: faster than one core decodes tiles, so bound by I/O by construction
    "tiny": dict(timm_name="vit_tiny_patch16_224", embedding_dim=192),
}


def _encoder(name: str):  # noqa: ANN202
    from histoduo.models.encoders import (
        EncoderSpec,
        build_encoder,
        get_encoder_spec,
        register_encoder,
    )

    if name in ENCODERS:
        spec = register_encoder(
            EncoderSpec(name=f"bench-{name}", timm_kwargs={"num_classes": 0}, **ENCODERS[name]),
            replace=True,
        )
    else:
        spec = get_encoder_spec(name)
    return build_encoder(spec, random_init=True)


def _store(folder: Path, size: int) -> Path:
    from histoduo.slide.sources import SlideSource
    from histoduo.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from histoduo.tiling import TilingParams, tile_slides

    store = folder / f"embed_{size}.h5"
    if store.exists():
        return store
    slide = folder / f"embed_{size}.svs"
    if not slide.exists():
        write_synthetic_slide(
            slide, SyntheticSlideSpec(level0_width=size, level0_height=size, seed=5)
        )
    tile_slides(
        [SlideSource(slide)], store, TilingParams(target_mpp=0.5, tile_size_px=224), progress=False
    )
    return store


def _forward_only(embedder, store: Path) -> tuple[float, int]:  # noqa: ANN001
    import numpy as np
    import torch

    from histoduo.models.preprocess import to_tensor_batch
    from histoduo.runtime.decode import model_batch
    from histoduo.store import TileStore
    from histoduo.store.read import read_encoded

    device = embedder.runtime.device
    batches = []
    with TileStore(store) as tiles:
        slide = tiles.slides[0]
        n = tiles.num_tiles(slide)
        for start in range(0, n, embedder.batch_size):
            rows = np.arange(start, min(start + embedder.batch_size, n))
            if embedder.transform.on_device:
                raw = read_encoded(tiles, slide, rows)
            else:
                raw = embedder.transform.finish(to_tensor_batch(tiles.read_tiles(slide, rows)))
            batches.append(model_batch(raw, device, embedder.transform.finish))
    embedder.forward(batches[0])  # warm-up
    t0 = time.perf_counter()
    for x in batches:
        embedder.forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="small", help="small, tiny, or a registry name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: embed's default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size", type=int, default=8192, help="slide side, level-0 px")
    parser.add_argument("--cache", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    from histoduo.predict.embed import EmbedParams, TileEmbedder, embed_store

    print(f"load average before: {os.getloadavg()}")
    args.cache.mkdir(parents=True, exist_ok=True)
    store = _store(args.cache, args.size)
    encoder = _encoder(args.encoder)
    params = EmbedParams(
        encoder=encoder.spec.name,
        device=args.device,
        batch_size=args.batch,
        workers=args.workers,
        torch_threads=args.threads,
        overwrite=True,
        quiet=True,
    )
    forward, n = _forward_only(TileEmbedder(encoder, params), store)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        result = embed_store(store, tmp, params, encoder=encoder)
    assert result.tiles == n, (result.tiles, n)
    pipeline = result.tiles_per_s
    print(
        f"{encoder.spec.name} ({encoder.spec.timm_name}) on {store.name}: {n} tiles, {args.device}"
    )
    print(f"forward-only  {forward:8.1f} tiles/s")
    print(
        f"end-to-end    {pipeline:8.1f} tiles/s  = {pipeline / forward:.0%} of forward-only "
        "(goal >= 90%)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
