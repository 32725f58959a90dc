"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480): WIDTHxHEIGHT, as the benchmarks' --sizes options take it."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    return w, h
