"""sysinfo: the smallest real plugin: facts about the machine and the worker it runs in."""

from bkg_kernel.plugins.sysinfo.plugin import SysInfo

PLUGIN = SysInfo
__all__ = ["PLUGIN", "SysInfo"]
