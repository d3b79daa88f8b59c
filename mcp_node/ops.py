"""The ops builder: a Nanos image made by ``ops build`` from a generated config.json.

ops is not installable on the test machines (it fetches its binary and kernel from the
internet), so this builder is tested at the level of the config.json and the command
line it produces. Volumes are refused: ops would copy a host directory into the image
(``MapDirs``), which is not a volume, and a live 9p share cannot be tested through ops
here; the nanos builder shares volumes live on q35.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import QemuConfig
from .errors import ImageError, ValidationError
from .grammar import Volume, parse_env
from .vmimage import BootPlan, BuildRequest, find_tool, run_tool


def ops_config(req: BuildRequest) -> dict[str, object]:
    """The ops config.json: program args, env, memory and CPUs."""
    return {
        "Args": [req.program_name, *req.argv],
        "Env": dict(parse_env(req.env)),
        "RunConfig": {
            "Memory": f"{req.memory_mb}M",
            "CPUs": req.vcpus,
            "Ports": [str(p) for p in req.ports],
        },
    }


def ops_build_argv(ops: str, elf: Path, config: Path, image_name: str) -> list[str]:
    return [ops, "build", str(elf), "-c", str(config), "-i", image_name]


class OpsBuilder:
    name = "ops"

    def __init__(self, cfg: QemuConfig) -> None:
        self.cfg = cfg

    def available(self) -> tuple[bool, str]:
        if find_tool(self.cfg.ops):
            return True, ""
        return False, f"ops ({self.cfg.ops!r} not on PATH)"

    def check(self, volumes: tuple[Volume, ...]) -> None:
        if volumes:
            raise ValidationError(
                "not supported with the ops builder (it could only copy them into the "
                "image); the nanos builder ([qemu] nanos_dir) shares volumes live on q35",
                "volumes")

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        self.check(req.volumes)
        if req.secret_files:
            raise ImageError("the ops builder cannot give a program secret files; use the "
                             "nanos builder ([qemu] nanos_dir) or secret env values")
        ops = find_tool(self.cfg.ops)
        if not ops:
            raise ImageError("ops is not installed")
        conf = out / "config.json"
        conf.write_text(json.dumps(ops_config(req), indent=2, sort_keys=True))
        elf = out / req.program_name       # ops names the program after the file
        shutil.copyfile(req.elf, elf)
        os.chmod(elf, 0o755)  # noqa: S103 - an executable
        image_name = f"mcp-{req.service}-{req.component}-{os.getpid()}"
        run_tool(ops_build_argv(ops, elf, conf, image_name), cwd=out)
        built = Path.home() / ".ops" / "images" / image_name
        if not built.exists():
            built = built.with_suffix(".img")
        if not built.exists():
            raise ImageError(f"ops build did not produce {built}")
        disk = out / "disk.raw"
        shutil.move(str(built), disk)
        kernel = ""
        if self.cfg.machine == "microvm":
            kernels = sorted((Path.home() / ".ops").glob("*/kernel.img"))
            if not kernels:
                raise ImageError("microvm needs Nanos's kernel.img; none found under ~/.ops")
            kernel = str(kernels[-1])
        return BootPlan(builder=self.name, image=str(disk),
                        disk=str(disk), kernel=kernel, nanos=True)
