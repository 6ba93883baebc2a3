"""candle: torch / transformers model runner (embeddings, generation, torch programs, quantization)."""

from bkg_kernel.plugins.candle.plugin import Candle

PLUGIN = Candle
__all__ = ["PLUGIN", "Candle"]
