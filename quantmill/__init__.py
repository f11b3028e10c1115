"""quantmill: reproducible model conversion and quantization."""
from __future__ import annotations

__version__ = "0.1.0"
