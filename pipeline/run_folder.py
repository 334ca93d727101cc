"""A training run's folder: whose it is, what it was started with, what it depends on, and that one live process
owns it.

    OUT/run.json        the run's settings and the fingerprints of its inputs (cache keys, model and data hashes)
    OUT/.lock           held while the run is live: a second run on the folder is refused
    OUT/metrics.jsonl   OUT/checkpoints/   OUT/final/   OUT/summary.json

A run starts only in an empty folder or in its own (the same settings, nothing trained yet); another run's folder
needs --overwrite, which removes that run's files and nothing else. --resume continues only the run that the folder
holds, and only if the inputs it depends on are the ones it started with. A folder that is an input (the student,
a cache, the data) or lies inside one, or holds one, is refused always.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import RunError

RUN = "run.json"
LEGACY = "config.json"  # runs before run.json kept their settings here
RUN_FILES = (RUN, "metrics.jsonl", "summary.json", "checkpoints", "final")
LOCK = ".lock"
IGNORED = ("resume", "overwrite", "progress")  # how a run is invoked, not what it computes


def check_apart(out, inputs: dict[str, str | None]) -> None:
    """Refuse an --out that is an input, lies inside one, or holds one (they would be written over)."""
    o = Path(out).resolve()
    for flag, path in inputs.items():
        if not path or not Path(path).exists():
            continue  # a hub name, or an input that does not exist yet
        p = Path(path).resolve()
        if p == o or o in p.parents or p in o.parents:
            where = "is" if p == o else "holds" if o in p.parents else "lies inside"
            raise RunError(f"--out {out} {where} the {flag} input {path}; choose a run folder apart from the inputs")


def saved_settings(out: Path) -> dict | None:
    """The settings a run folder was started with (None if it holds no run)."""
    for name in (RUN, LEGACY):
        f = out / name
        if f.is_file():
            try:
                saved = json.loads(f.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                return None
            if isinstance(saved, dict) and ("settings" in saved or "student" in saved):
                return saved if "settings" in saved else {"settings": saved, "inputs": None}
    return None


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k not in IGNORED and a.get(k) != b.get(k)]


class RunFolder:
    def __init__(self, out, settings: dict, inputs: dict):
        self.out, self.settings, self.inputs = Path(out), settings, inputs
        self.lock: FileLock | None = None

    def claim(self) -> None:
        """Own the folder for this process's lifetime (released by release(), or by the OS when it dies)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.out / LOCK), thread_local=False)
        try:
            self.lock.acquire(blocking=False)
        except Timeout:
            raise RunError(f"{self.out} is in use by another live run; wait for it or choose another --out") from None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @contextlib.contextmanager
    def owned(self, active: bool = True):
        """claim() for the block's duration (a no-op where not active: the ranks other than 0)."""
        if active:
            self.claim()
        try:
            yield self
        finally:
            self.release()

    def start(self, resume: bool, overwrite: bool, latest_step) -> bool:
        """Check the folder against this run (see the module docstring) and prepare it; True when resuming."""
        saved = saved_settings(self.out)
        others = [p.name for p in self.out.iterdir() if p.name != LOCK] if self.out.exists() else []
        if resume:
            self._check_resumable(saved, latest_step)
            return True
        ours = (
            saved is not None
            and not _differences(saved["settings"], self.settings)
            and saved["inputs"] == self.inputs
            and latest_step is None
            and not (self.out / "final").exists()
        )
        if others and not ours and not overwrite:
            raise RunError(self._occupied(saved, latest_step))
        if others:
            self._clear(saved)
        (self.out / RUN).write_text(json.dumps({"settings": self.settings, "inputs": self.inputs}, indent=1))
        (self.out / "metrics.jsonl").write_text("")
        return False

    def _occupied(self, saved, latest_step) -> str:
        if saved is None:
            return f"--out {self.out} is not empty and holds no training run; choose another --out or pass --overwrite"
        diff = _differences(saved["settings"], self.settings)
        if diff:
            return (
                f"--out {self.out} holds another run (it differs in {', '.join(diff[:5])}); choose another --out, "
                "or pass --overwrite to replace it"
            )
        if saved["inputs"] != self.inputs:
            return (
                f"--out {self.out} holds a run of other inputs ({self._changed(saved)}); pass --overwrite to replace it"
            )
        what = f"a checkpoint at step {latest_step}" if latest_step is not None else "a finished model"
        return (
            f"--out {self.out} holds this run with {what}; pass --resume to continue it or --overwrite to start again"
        )

    def _check_resumable(self, saved, latest_step) -> None:
        if saved is None:
            raise RunError(f"--resume: {self.out} holds no training run; drop --resume to start one")
        diff = _differences(saved["settings"], self.settings)
        if diff:
            raise RunError(f"--resume with different settings than the run in {self.out}: {', '.join(diff)}")
        if saved["inputs"] is not None and saved["inputs"] != self.inputs:
            raise RunError(
                f"--resume: the run in {self.out} was started on other inputs ({self._changed(saved)}); "
                "resume it with those, or start a new run"
            )
        if latest_step is None:
            raise RunError(
                f"--resume: {self.out} holds no checkpoint yet (the run stopped before its first "
                "--save-every); run again without --resume to start it over"
            )

    def _changed(self, saved) -> str:
        old, new = saved["inputs"] or {}, self.inputs
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return ", ".join(f"{k}: {str(old.get(k))[:12]} → {str(new.get(k))[:12]}" for k in keys[:3])

    def _clear(self, saved) -> None:
        """Remove a run's own files; anything else in the folder stays."""
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if saved is not None and (self.out / LEGACY).exists() and "student" in saved["settings"]:
            (self.out / LEGACY).unlink()
