"""bkg_kernel: the library behind bkg, a notebook-first ML research workbench.

Importing it is cheap: heavy libraries (faiss, torch, llama_cpp, insightface) load inside the code that needs them.
"""

from bkg_kernel.errors import BkgError

__version__ = "0.1.0"
__all__ = ["BkgError", "__version__"]
