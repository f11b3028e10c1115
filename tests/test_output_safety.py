"""No command deletes or changes a file outside its own outputs (issue 12).

Every command runs with its output path set to the input itself, the input's parent, ``.`` (the
current directory holding the input), a symbolic link, an unrelated non-empty directory and an
existing unrelated file. Each is refused: exit code 2, one stderr line without a traceback that
names the path, and a snapshot of the tree (paths, sha256, link targets) unchanged. The only
exception is the documented directory form of ``convert hf-to-gguf --outfile DIR`` (write the
standard name into DIR): there the one change allowed is one new ``.gguf`` file.

The other tables: a recipe ``output:`` (refused at ``--dry-run``), names that become paths
(``card.name``, branch names, a tampered manifest in ``reproduce``), write errors at the boundary
(ENOSPC, EFBIG) and the redaction of credentials in URLs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import error_lines
from release_helpers import make_tiny_model  # noqa: E402
from tiny_gguf import TinyShape, bpe_vocab, write_tiny_gguf  # noqa: E402

from quantmill.cli import main

TOKEN = "s3cr3tT0ken"


# ----------------------------------------------------------------------------- fixtures
def _write_adapter(directory: Path, shape: TinyShape | None = None, rank: int = 2) -> None:
    shape = shape or TinyShape()
    from safetensors.numpy import save_file

    directory.mkdir()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"],
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "model"}
    (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(shape.n_layer):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, shape.hidden)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((shape.hidden, rank)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs every case starts from, plus the unrelated files and directories it must not touch."""
    root = tmp_path_factory.mktemp("output_safety") / "ws"
    root.mkdir()
    make_tiny_model(root / "model")
    write_tiny_gguf(root / "m.gguf", bpe_vocab(), tied=False, seed=3)
    shutil.copyfile(root / "m.gguf", root / "other.gguf")
    _write_adapter(root / "adapter")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("keep me\n", encoding="utf-8")
    (root / "notes.txt").write_text("keep me too\n", encoding="utf-8")
    (root / "empty").mkdir()
    work = root / "work"
    (work / "stages").mkdir(parents=True)
    (work / "stages" / "keep.txt").write_text("a stage\n", encoding="utf-8")
    (work / "notes").mkdir()
    (work / "notes" / "a.txt").write_text("unrelated\n", encoding="utf-8")
    (work / "notes.txt").write_text("unrelated\n", encoding="utf-8")
    (work / "empty").mkdir()
    return root


@pytest.fixture
def ws(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))  # outside the snapshot, never reached here
    monkeypatch.chdir(tmp_path)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: ``dir``, ``link -> target`` or the file's sha256."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and stderr's lines, without progress lines (conftest.error_lines)."""
    capsys.readouterr()
    code = main(argv)
    return code, error_lines(capsys.readouterr().err)


def assert_one_line(code: int, lines: list[str], named: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("quantmill: error: ") and "Traceback" not in lines[0], lines
    assert named in lines[0], (named, lines)


# ----------------------------------------------------------------------------- the command table
@dataclass(frozen=True)
class Command:
    """How to run one command with output ``OUT``; ``main_input`` is what "the input itself" means."""

    name: str
    argv: Callable[[Path, str], list[str]]
    main_input: str  # relative to the workspace
    container: str  # the directory that holds the main input (for the "parent" and "." cases)
    kind: str  # "dir" or "file" output
    directory_form: bool = False  # an existing directory as output means "write the standard name into it"


def _gptq(ws: Path, out: str) -> list[str]:
    return ["quantize", "gptq", str(ws / "model"), "--branch", "4bit-32g", "--calib-samples", "2",
            "--calib-seqlen", "16", "--no-progress", "--out", out]


COMMANDS = (
    Command("gguf-to-hf", lambda ws, out: ["convert", "gguf-to-hf", str(ws / "m.gguf"), "--quiet", "--out", out],
            "m.gguf", ".", "dir"),
    Command("hf-to-gguf", lambda ws, out: ["convert", "hf-to-gguf", str(ws / "model"), "--outtype", "f16", "--vocab-pre", "smollm",
                                           "--outfile", out], "model/model.safetensors", ".", "file",
            directory_form=True),
    Command("quantize-gguf", lambda ws, out: ["quantize", "gguf", str(ws / "m.gguf"), "--type", "Q8_0", "--out", out],
            "m.gguf", ".", "file"),
    Command("quantize-gptq", _gptq, "model", ".", "dir"),
    Command("merge", lambda ws, out: ["merge", str(ws / "model"), "--adapter", str(ws / "adapter"), "--out", out],
            "model", ".", "dir"),
    Command("bake", lambda ws, out: ["bake", str(ws / "model"), "--rope", "linear", "--rope-factor", "2",
                                     "--out", out], "model", ".", "dir"),
    Command("calibrate", lambda ws, out: ["calibrate", str(ws / "model"), "--calib-samples", "2", "--calib-seqlen",
                                          "16", "--no-progress", "--out", out], "model/model.safetensors", ".", "file"),
    Command("lora-to-gguf", lambda ws, out: ["convert", "lora-to-gguf", str(ws / "adapter"), "--base", str(ws / "model"),
                                             "--outfile", out], "adapter/adapter_model.safetensors", ".", "file"),
    Command("verify-report-dir", lambda ws, out: ["verify", str(ws / "m.gguf"), "--reference", str(ws / "model"),
                                                  "--text", str(ws / "text.txt"), "--report-dir", out],
            "model", ".", "dir"),
    Command("verify-json", lambda ws, out: ["verify", str(ws / "m.gguf"), "--reference", str(ws / "model"),
                                            "--text", str(ws / "text.txt"), "--json", out], "text.txt", ".", "file"),
)

COMMANDS += (
    Command("verify-logprobs", lambda ws, out: ["verify", str(ws / "m.gguf"), "--reference", str(ws / "model"),
                                                "--text", str(ws / "text.txt"), "--reference-logprobs", out],
            "text.txt", ".", "file"),
)

OUT_CASES = ("input", "parent", "cwd", "symlink", "unrelated-dir", "unrelated-file")


def _out_arg(command: Command, case: str, ws: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set the case up in ``ws``; return the output argument."""
    if case == "input":
        return str(ws / command.main_input)
    if case == "parent":
        return str((ws / command.main_input).parent)
    if case == "cwd":
        monkeypatch.chdir(ws / command.container)
        return "."
    if case == "symlink":
        # a link to a directory (dir outputs) or to a GGUF (file outputs): nothing but the link is wrong
        link = ws / ("link" if command.kind == "dir" else "link.gguf")
        link.symlink_to("empty" if command.kind == "dir" else "other.gguf")
        return str(link)
    if case == "unrelated-dir":
        return str(ws / "notes")
    assert case == "unrelated-file"
    return str(ws / "notes.txt")


def _allowed_new_file(command: Command, case: str) -> bool:
    """hf-to-gguf's --outfile DIR writes a *new* file into DIR: allowed when DIR is a directory."""
    return command.directory_form and case in ("parent", "cwd", "unrelated-dir")


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_output_never_destroys(command: Command, case: str, ws: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = _out_arg(command, case, ws, monkeypatch)
    before = snapshot(ws)
    code, lines = run_cli(command.argv(ws, out), capsys)
    after = snapshot(ws)
    if _allowed_new_file(command, case):
        assert code == 0, lines
        added = set(after) - set(before)
        assert len(added) == 1 and next(iter(added)).endswith(".gguf"), added
        assert {k: after[k] for k in before} == before
        return
    assert_one_line(code, lines, out)
    assert after == before


# ----------------------------------------------------------------------------- a recipe's output:
def _recipe(ws: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {"name": "tiny", "source": {"kind": "local", "path": "model"},
                            "gguf": {"base": "f16", "types": []}, "verify": None, "work_dir": "work", "threads": 1}
    data.update(changes)
    path = ws / "release.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("output", ["notes.txt", "notes", "link", "stages", "quantmill.log"])
def test_recipe_output_refused_at_dry_run(output: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "work" / "link").symlink_to("empty")
    (ws / "work" / "quantmill.log").write_text("an earlier run\n", encoding="utf-8")
    recipe = _recipe(ws, output=output)
    before = snapshot(ws)
    code, lines = run_cli(["run", str(recipe), "--dry-run"], capsys)
    assert_one_line(code, lines, output)
    assert snapshot(ws) == before


@pytest.mark.parametrize("name", ["../../../x", "/tmp/quantmill-evil", "a/b", "..", ".hidden", "x" * 101, "a b"])
@pytest.mark.parametrize("field", ["card", "name"])
def test_names_that_become_paths(field: str, name: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(ws, card={"name": name}) if field == "card" else _recipe(ws, name=name)
    before = snapshot(ws)
    code, lines = run_cli(["run", str(recipe), "--dry-run"], capsys)
    assert_one_line(code, lines, "name")
    assert snapshot(ws) == before


@pytest.mark.parametrize("branch", ["../x=4bit-32g", "/tmp/x=4bit-32g", ".git=4bit-32g", "a/b=4bit-32g"])
def test_branch_names_that_become_paths(branch: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(ws)
    argv = _gptq(ws, str(ws / "gptq"))
    argv[argv.index("4bit-32g")] = branch
    code, lines = run_cli(argv, capsys)
    assert_one_line(code, lines, "branch")
    assert snapshot(ws) == before


# ----------------------------------------------------------------------------- reproduce
def _manifest(ws: Path, recipe: dict[str, Any] | None, drop: tuple[str, ...] = ()) -> Path:
    data: dict[str, Any] = {"manifest_version": 1, "name": "tiny", "recipe_sha256": "ab" * 32,
                            "inputs": {}, "outputs": {}, "recipe": recipe}
    for key in drop:
        data.pop(key)
    path = ws / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _good_recipe(ws: Path, **changes: Any) -> dict[str, Any]:
    return {"name": None, "source": {"kind": "local", "path": str(ws / "model")}, "gguf": {"base": "f16", "types": []},
            "verify": None, "threads": 1, **changes}


REPRODUCE_CASES = {
    "card-name-escapes": lambda ws: _manifest(ws, _good_recipe(ws, card={"name": "../../../evil"})),
    "card-name-absolute": lambda ws: _manifest(ws, _good_recipe(ws, card={"name": str(ws / "notes")})),
    "output-escapes": lambda ws: _manifest(ws, _good_recipe(ws, output="../../evil")),
    "unknown-field": lambda ws: _manifest(ws, _good_recipe(ws, surprise=1)),
    "no-recipe": lambda ws: _manifest(ws, None, drop=("recipe",)),
    "recipe-not-a-mapping": lambda ws: _manifest(ws, None),
    "no-inputs": lambda ws: _manifest(ws, _good_recipe(ws), drop=("inputs",)),
    "sha-escapes": lambda ws: _sha_escape(ws),
}


def _sha_escape(ws: Path) -> Path:
    path = _manifest(ws, _good_recipe(ws))
    data = json.loads(path.read_text(encoding="utf-8"))
    data["recipe_sha256"] = "../../../../x"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(REPRODUCE_CASES))
def test_reproduce_refuses_before_any_work(case: str, ws: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = REPRODUCE_CASES[case](ws)
    monkeypatch.chdir(ws / "empty")
    before = snapshot(ws.parent)
    argv = ["reproduce", str(manifest)] + ([] if case == "sha-escapes" else ["--work-dir", str(ws / "empty" / "re")])
    code, lines = run_cli(argv, capsys)
    assert_one_line(code, lines, str(manifest))
    assert snapshot(ws.parent) == before  # no release.yaml left behind, nothing written anywhere


# ----------------------------------------------------------------------------- GPTQ temporaries
def test_gptq_rerun_removes_its_stale_temporaries(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ws / "gptq"
    stale = out / ".gptq-4bit-32g-actorder_False.k1ll3d.part"  # what a killed run leaves (its spool inside)
    stale.mkdir(parents=True)
    (stale / "spool.bin").write_bytes(b"\0" * 64)
    code, lines = run_cli(_gptq(ws, str(out)), capsys)
    assert code == 0, lines
    assert sorted(p.name for p in out.iterdir()) == ["gptq-4bit-32g-actorder_False"]
    code, lines = run_cli(_gptq(ws, str(out)), capsys)  # an earlier output of its own: replaced
    assert code == 0, lines
    assert sorted(p.name for p in out.iterdir()) == ["gptq-4bit-32g-actorder_False"]


# ----------------------------------------------------------------------------- write errors at the boundary
def _full_disk(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


ENOSPC_CASES: dict[str, tuple[str, str, Callable[[Path], list[str]]]] = {
    "gguf-to-hf": ("quantmill.convert.gguf_to_hf", "write_checkpoint",
                   lambda ws: ["convert", "gguf-to-hf", str(ws / "m.gguf"), "--quiet", "--out", str(ws / "hf")]),
    "merge": ("quantmill.convert.merge.merge", "write_checkpoint",
              lambda ws: ["merge", str(ws / "model"), "--adapter", str(ws / "adapter"), "--out", str(ws / "merged")]),
    "bake": ("quantmill.convert.bake", "_copy_entry",
             lambda ws: ["bake", str(ws / "model"), "--rope", "linear", "--rope-factor", "2", "--out", str(ws / "baked")]),
}


@pytest.mark.parametrize("case", sorted(ENOSPC_CASES))
def test_full_disk_is_one_line_and_leaves_nothing(case: str, ws: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module, attr, argv = ENOSPC_CASES[case]
    monkeypatch.setattr(importlib.import_module(module), attr, _full_disk)
    before = snapshot(ws)
    code, lines = run_cli(argv(ws), capsys)
    assert_one_line(code, lines, str(ws))
    assert "disk is full" in lines[0]
    assert snapshot(ws) == before  # the temporary directory is gone too


def test_run_efbig_is_one_line_and_leaves_no_temporary(ws: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from quantmill.pipeline import stages

    def too_big(ctx: Any, params: Any) -> None:
        (ctx.out / "partial.gguf").write_bytes(b"GGUF")
        raise OSError(errno.EFBIG, "File too large", str(ctx.out / "partial.gguf"))

    monkeypatch.setitem(stages.STAGES, "gguf-base", dataclasses.replace(stages.STAGES["gguf-base"], run=too_big))
    recipe = _recipe(ws)
    code, lines = run_cli(["run", str(recipe), "--no-publish"], capsys)
    assert_one_line(code, lines, "partial.gguf")
    assert "ulimit -f" in lines[0]
    leftovers = [p for p in (ws / "work").rglob("*.part")]
    assert leftovers == []


def test_file_size_limit_in_a_real_process(ws: Path) -> None:
    """RLIMIT_FSIZE makes the kernel answer EFBIG (Python ignores SIGXFSZ): one line, exit 2, nothing left."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    before = snapshot(ws)
    result = subprocess.run([sys.executable, "-m", "quantmill.cli", "convert", "gguf-to-hf", str(ws / "m.gguf"),
                             "--quiet", "--out", str(ws / "hf")], capture_output=True, text=True, preexec_fn=limit,
                            check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "ulimit -f" in lines[0] and str(ws) in lines[0], lines
    assert snapshot(ws) == before


# ----------------------------------------------------------------------------- secrets
def test_redact_rule() -> None:
    from quantmill.redact import redact

    assert redact(f"https://user:{TOKEN}@host/x.git") == "https://***@host/x.git"
    assert redact(f"'ssh://{TOKEN}@h:22/r' and http://u:p@a/b") == "'ssh://***@h:22/r' and http://***@a/b"
    assert redact("https://host/x.git user@example.com") == "https://host/x.git user@example.com"


def test_git_publish_errors_are_redacted(tmp_path: Path) -> None:
    from quantmill.errors import QuantmillError
    from quantmill.publish.git import _check_remote, _git

    url = f"https://user:{TOKEN}@127.0.0.1:9/nowhere.git"
    repo = tmp_path / "scratch"
    repo.mkdir()
    subprocess.run(["git", "init", "--quiet", str(repo)], check=True)
    for call in (lambda: _check_remote(repo, url), lambda: _git(repo, "ls-remote", url)):
        with pytest.raises(QuantmillError) as info:
            call()
        assert TOKEN not in str(info.value)


def test_cli_error_line_and_log_are_redacted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from quantmill import cli
    from quantmill.errors import ToolError
    from quantmill.redact import RedactingFormatter

    def fail(*_: Any, **__: Any) -> None:
        raise ToolError(f"git push failed: fatal: unable to access 'https://u:{TOKEN}@h/x.git/'")

    monkeypatch.setattr(cli.cli, "main", fail)
    code, lines = run_cli(["run", "x.yaml"], capsys)
    assert code == 1 and len(lines) == 1 and TOKEN not in lines[0] and "https://***@h/x.git" in lines[0], lines
    record = logging.LogRecord("quantmill", logging.INFO, __file__, 1, "push %s", (f"https://a:{TOKEN}@h/r",), None)
    assert TOKEN not in RedactingFormatter("%(message)s").format(record)


# ----------------------------------------------------------------------------- the atomic helpers themselves
def test_atomic_dir_never_removes_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantmill.atomic import atomic_dir
    from quantmill.errors import OutputError

    here = tmp_path / "here"
    here.mkdir()
    (here / "input.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(here)
    for final in (Path("."), Path("..")):
        with pytest.raises(OutputError, match="current directory"), atomic_dir(final):
            pass
    assert sorted(p.name for p in here.iterdir()) == ["input.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary left either
    with atomic_dir(tmp_path / "new") as tmp:
        assert tmp.parent == tmp_path
        (tmp / "x").write_text("x", encoding="utf-8")
    assert (tmp_path / "new" / "x").is_file()
    link = tmp_path / "link"
    link.symlink_to(here)
    with pytest.raises(OutputError, match="symbolic link"), atomic_dir(link):
        pass
    assert here.is_dir() and link.is_symlink()


def test_cli_backstop_turns_a_write_error_into_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from quantmill import cli

    def fail(*_: Any, **__: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/model.safetensors")

    monkeypatch.setattr(cli.cli, "main", fail)
    code, lines = run_cli(["merge", "x"], capsys)
    assert_one_line(code, lines, "/mnt/ro/model.safetensors")
    assert "read-only" in lines[0]


def test_quantize_gguf_on_a_full_disk_blames_the_output(ws: Path) -> None:
    """libllama's write fails as an iostream error ("basic_ios::clear"): the line names the output and its disk,
    not the input, exit 2, and no temporary is left (RLIMIT_FSIZE gives the write failure for real)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    before = snapshot(ws)
    out = ws / "q8.gguf"
    result = subprocess.run([sys.executable, "-m", "quantmill.cli", "quantize", "gguf", str(ws / "m.gguf"), "--type",
                             "Q8_0", "--out", str(out)], capture_output=True, text=True, preexec_fn=limit, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and str(out) in lines[0] and "free space" in lines[0], lines
    assert "basic_ios" not in lines[0].split(";")[-1]
    assert snapshot(ws) == before


def test_temporaries_are_exclusive_and_outputs_get_the_usual_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporaries are made with O_EXCL / mkdir: a name already taken, even by a planted link, is skipped and never
    written through; finished files and directories get 0666 / 0777 less the umask, as any new file does."""
    import itertools
    import stat

    from quantmill import atomic

    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    monkeypatch.setattr(atomic, "_serial", itertools.count(7))
    (tmp_path / f".out.gguf.{os.getpid()}-7.part").symlink_to(target)
    tmp = atomic.temporary_next_to(tmp_path / "out.gguf")
    assert tmp.name == f".out.gguf.{os.getpid()}-8.part" and tmp.is_file() and not tmp.is_symlink()
    assert target.read_text() == "untouched"
    old = os.umask(0o027)
    try:
        atomic.write_text_atomic(tmp_path / "card.md", "x")
        with atomic.atomic_dir(tmp_path / "branch") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "card.md").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "branch").stat().st_mode) == 0o750
