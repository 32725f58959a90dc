"""Data layer: synthetic scenes, degradations, dataset readers, shards and the loader."""
