"""Prefect 3 flows over the pipeline steps of `magicfuse.pipeline` (see docs/ORCHESTRATION.md)."""
