"""What ``quantmill run`` did: one row per stage, filled by the executor, for people and for ``--json``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    """What ``run`` did, for people (``lines``) and for ``--json``."""

    work_dir: Path
    output_dir: Path
    stages: list[dict[str, Any]]
    disk_needed: int | None
    disk_free: int
    dry_run: bool
    verification_passed: bool | None = None
    published: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # a dry run: why a run here would be refused (disk, memory)

    def as_json(self) -> dict[str, Any]:
        return {
            "work_dir": str(self.work_dir), "output": str(self.output_dir), "dry_run": self.dry_run,
            "disk_needed_bytes": self.disk_needed, "disk_free_bytes": self.disk_free,
            "estimated_seconds": round(sum(r["estimated_seconds"] or 0 for r in self.stages if r.get("status") != "done"), 1),
            "stages": self.stages, "verification_passed": self.verification_passed, "published": self.published,
            "notes": self.notes,
        }
