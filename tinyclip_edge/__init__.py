"""tinyclip-edge: compress CLIP models into small, fast students and ship them to the edge.

This module is imported by every subpackage (runtimes on a Jetson included), so it stays empty of
imports: no torch, no open_clip.
"""

__version__ = "0.1.0"
