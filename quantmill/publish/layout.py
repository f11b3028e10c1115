"""What goes where: a release directory as repository branches, each a flat set of files.

* GGUF repository, branch ``main``: every ``.gguf`` file, ``README.md`` (the GGUF card), ``parity.png``.
* GPTQ repository, one branch per variant: the branch's files, its ``README.md`` and ``parity.png``.
  When GPTQ and GGUF share one repository, ``main`` holds the GGUF files and every GPTQ variant keeps
  its release name; in a GPTQ repository of its own, the main variant is ``main``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.card import GGUF_DIR, GPTQ_DIR, PLOT, README
from quantmill.pipeline.release import (
    default_repo,
    gguf_files,
    gptq_branch_dirs,
    hub_layout,
    render_cards,
)


@dataclass(frozen=True)
class RepoBranch:
    repo: str
    branch: str
    files: dict[str, Path]  # path in the repository -> local file
    texts: dict[str, str] = field(default_factory=dict)  # path in the repository -> generated text (cards)

    def paths(self) -> list[str]:
        return sorted({*self.files, *self.texts})


def plan_branches(release_dir: Path, manifest: dict[str, Any], *, gguf_repo: str | None, gptq_repo: str | None,
                  hub_ids: bool = True) -> list[RepoBranch]:
    """The branches to publish: every other branch before ``main`` (a new branch starts as a copy of main).

    ``hub_ids`` False (a git remote): the cards name the release's default Hub repositories.
    """
    shared = gguf_repo is not None and gguf_repo == gptq_repo
    published = ({p.name: p.name for p in gptq_branch_dirs(release_dir)} if shared
                 else hub_layout(manifest, release_dir))
    cards = render_cards(release_dir, manifest,
                         gptq_repo=(gptq_repo or "") if hub_ids else default_repo(manifest, "GPTQ"),
                         gguf_repo=(gguf_repo or "") if hub_ids else default_repo(manifest, "GGUF"),
                         published=published)
    branches: list[RepoBranch] = []
    if gptq_repo is not None:
        for directory in gptq_branch_dirs(release_dir):
            files = {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.name != README}
            card = cards[f"{GPTQ_DIR}/{directory.name}/{README}"]
            branches.append(RepoBranch(gptq_repo, published[directory.name], files, {README: card}))
    if gguf_repo is not None:
        files = {p.name: p for p in gguf_files(release_dir)}
        plot = release_dir / GGUF_DIR / PLOT
        if plot.is_file():
            files[PLOT] = plot
        branches.append(RepoBranch(gguf_repo, "main", files, {README: cards[f"{GGUF_DIR}/{README}"]}))
    return sorted(branches, key=lambda b: b.branch == "main")  # new branches start from a main with no files yet
