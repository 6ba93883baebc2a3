"""repoagent: sandboxed code-repository workspaces, a code index, a repo map, cited answers and docs."""

from bkg_kernel.plugins.repoagent.plugin import RepoAgent

PLUGIN = RepoAgent
__all__ = ["PLUGIN", "RepoAgent"]
