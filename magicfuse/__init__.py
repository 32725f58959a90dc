"""MagicFuse: single-image fusion for visual and semantic reinforcement (CVPR 2026).

The library holds everything real; `stages/` (DVC) and `flows/` (Prefect) are thin
front-ends over it.
"""

__version__ = "0.1.0"
