"""brainml: hybrid retrieval over store collections (index, query, ask, stats)."""

from bkg_kernel.plugins.brainml.plugin import BrainML

PLUGIN = BrainML
__all__ = ["PLUGIN", "BrainML"]
