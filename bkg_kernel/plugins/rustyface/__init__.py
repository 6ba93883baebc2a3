"""rustyface: face detection, alignment, embedding and verification."""

from bkg_kernel.plugins.rustyface.plugin import RustyFace

PLUGIN = RustyFace
__all__ = ["PLUGIN", "RustyFace"]
