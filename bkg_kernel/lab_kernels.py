"""The kernel manager of `bkg run`'s JupyterLab and the Hub's users' servers: Jupyter Server's own, with the
kernel's channels on Unix sockets in a private folder (`bkg_kernel.kernels`). Chosen on the command line:
`kernels.LAB_KERNEL_MANAGER` (this module imports Jupyter Server, which the CLI need not)."""

from __future__ import annotations

from jupyter_server.services.kernels.kernelmanager import ServerKernelManager
from traitlets import default

from bkg_kernel.kernels import ipc_prefix


class IpcKernelManager(ServerKernelManager):
    """A Jupyter Server kernel over IPC; its connection file stays in Jupyter's runtime dir."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:  # the socket path prefix, short whatever the runtime dir's length
        return ipc_prefix() if self.transport == "ipc" else super()._ip_default()
