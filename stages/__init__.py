"""Thin DVC entry points: each reads params.yaml and calls one function of magicfuse.pipeline."""
