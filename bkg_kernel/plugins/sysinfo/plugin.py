"""sysinfo: machine facts (CPU, memory, disk, Python) from the worker process that hosts it."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from bkg_kernel.errors import Unavailable
from bkg_kernel.runtime.contract import Plugin, PluginSettings, Progress, capability


class SysInfoSettings(PluginSettings):
    """sysinfo settings."""

    disk_path: str = Field(".", max_length=4096, description="Path whose disk usage is reported (a folder).")

    @field_validator("disk_path")
    @classmethod
    def _a_folder(cls, v: str, info: ValidationInfo) -> str:
        """A new value must be a folder now; a stored one that went away makes facts a 503, not the plugin an
        error at start."""
        if "\0" in v or (isinstance(info.context, dict) and info.context.get("new") and not os.path.isdir(v)):
            raise ValueError(f"{v[:200]!r} is not a folder on the gateway's machine")
        return v


class Empty(BaseModel):
    """No input."""


class MachineFacts(BaseModel):
    """What sysinfo reports."""

    hostname: str
    platform: str
    python: str
    cpu_count: int
    load_avg: list[float]
    memory_total: int
    memory_available: int
    disk_total: int
    disk_free: int
    pid: int
    uptime_s: float


class SleepInput(BaseModel):
    """Hold a request slot."""

    seconds: float = Field(..., ge=0, le=600, description="How long to hold the slot.")


class SleepOutput(BaseModel):
    """How long the request really slept."""

    slept: float


class SurveyInput(BaseModel):
    """Sample the machine's CPU use."""

    samples: int = Field(5, ge=1, le=600, description="How many samples.")
    every_s: float = Field(0.2, ge=0.01, le=60, description="Seconds between samples.")


class SurveyOutput(BaseModel):
    """CPU use per sample (percent of all cores) and their mean."""

    cpu_percent: list[float]
    mean: float


class SysInfo(Plugin):
    """Machine facts; also a probe for the runtime (timeouts, queueing) through `sysinfo.sleep`."""

    id = "sysinfo"
    name = "System info"
    version = "0.1.0"
    description = "Reports CPU, memory, disk and Python facts of the machine bkg runs on."
    mode = "worker"
    Settings = SysInfoSettings

    def start(self) -> None:
        self._started = time.monotonic()
        self.log.info("sysinfo ready in pid %s", os.getpid())

    @capability("sysinfo.facts", scope="plugins:read")
    def facts(self, inp: Empty) -> MachineFacts:
        """Report machine facts."""
        import psutil

        vm = psutil.virtual_memory()
        settings = self.settings
        assert isinstance(settings, SysInfoSettings)
        try:
            disk = shutil.disk_usage(settings.disk_path)
        except (OSError, ValueError) as exc:  # the folder went away after it was configured
            raise Unavailable(f"sysinfo cannot read the disk of disk_path {settings.disk_path!r}: {exc}") from None
        self.log.info("facts requested")
        return MachineFacts(
            hostname=platform.node(),
            platform=platform.platform(),
            python=sys.version.split()[0],
            cpu_count=os.cpu_count() or 1,
            load_avg=list(os.getloadavg()),
            memory_total=vm.total,
            memory_available=vm.available,
            disk_total=disk.total,
            disk_free=disk.free,
            pid=os.getpid(),
            uptime_s=time.monotonic() - getattr(self, "_started", time.monotonic()),
        )

    @capability("sysinfo.sleep", scope="plugins:write")
    def sleep(self, inp: SleepInput) -> SleepOutput:
        """Hold a request slot for a while (probe timeouts and queueing)."""
        t0 = time.monotonic()
        time.sleep(inp.seconds)
        return SleepOutput(slept=time.monotonic() - t0)

    @capability("sysinfo.survey", scope="plugins:write", job=True)  # it holds a slot for a while, like sleep
    def survey(self, inp: SurveyInput, progress: Progress) -> SurveyOutput:
        """Sample CPU use `samples` times, `every_s` apart, as a background job with progress."""
        import psutil

        psutil.cpu_percent(None)
        out: list[float] = []
        for i in range(inp.samples):
            time.sleep(inp.every_s)
            out.append(psutil.cpu_percent(None))
            progress((i + 1) / inp.samples, f"sample {i + 1}/{inp.samples}: {out[-1]:.0f}% CPU")
        return SurveyOutput(cpu_percent=out, mean=sum(out) / len(out))
