"""llmserver: local GGUF LLMs through llama.cpp, OpenAI-compatible at the gateway's /v1."""

from bkg_kernel.plugins.llmserver.plugin import LLMServer

PLUGIN = LLMServer
__all__ = ["PLUGIN", "LLMServer"]
