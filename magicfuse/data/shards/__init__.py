"""WebDataset shards with a parquet manifest, and the training data loader.

Modules: `shards.format` (member names, progress file, manifest, checks),
`shards.writer` (`write_shards`), `shards.loader` (`ShardDataset`, `make_loader`).

Writing
-------
`write_shards(samples, out_dir, split=..., ...)` turns dataset samples
(`magicfuse.data.readers.PairSample`) into WebDataset tar shards
``out_dir/{split}/shard-%06d.tar``. Every sample becomes the members

* ``{key}.clean.png``     clean visible image (RGB)
* ``{key}.degraded.png``  the clean image degraded with a per-sample RNG (RGB)
* ``{key}.infrared.png``  infrared (L), when the sample has one
* ``{key}.label.png``     label (L, MFNet ids, 255 = ignore), when present
* ``{key}.json``          source, split, original key and paths, size, the exact
  degradation recipe, has_label / has_infrared

One shard set serves both pair types of the paper: degraded->clean visible (IKR)
and degraded visible->infrared (CKG); the loader picks the members.

The writer is

* deterministic: the degradation RNG of a sample is derived from
  (seed, source, split, key), never from iteration order, and tar members carry
  fixed metadata, so the same inputs and seed give byte-identical shards;
* atomic: a shard is written to a temporary file and renamed when complete;
* resumable: ``{split}/progress.json`` (written atomically) lists the finished
  shards with their sha256 and manifest rows; a rerun keeps the verified shards and
  continues from the first unfinished one.

``out_dir/manifest.parquet`` indexes every sample of every split written there.

Reading
-------
`make_loader(shards_dir, split, batch_size=..., crop=..., ...)` returns a
`torch.utils.data.DataLoader` over a `ShardDataset` (a plain
`IterableDataset` reading the tars with `tarfile`, decoding PNGs with OpenCV).
Shards are split across distributed ranks and DataLoader workers (or samples,
when there are fewer shards than rank x worker slots), so that every sample is
seen exactly once per epoch; order and crops are deterministic in (seed, epoch).
"""

from magicfuse.data.shards.format import (
    MANIFEST_NAME,
    MEMBERS,
    list_shards,
    manifest_hash,
    read_manifest,
    verify_shards,
)
from magicfuse.data.shards.loader import ShardDataset, collate_samples, make_loader
from magicfuse.data.shards.writer import ShardConfig, ShardWriteResult, sample_seed, write_shards

__all__ = [
    "MANIFEST_NAME",
    "MEMBERS",
    "ShardConfig",
    "ShardWriteResult",
    "ShardDataset",
    "write_shards",
    "read_manifest",
    "manifest_hash",
    "list_shards",
    "verify_shards",
    "make_loader",
    "collate_samples",
    "sample_seed",
]
