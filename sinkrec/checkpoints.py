"""Checkpoint files: written atomically, read only as data, checked against the model before use.

* `AtomicCheckpointIO` (the Trainer's CheckpointIO): torch.save into a hidden temp file in the same
  folder, fsync, rename over the target, fsync the folder. A kill at any moment leaves either the old
  file or the new one, never a truncated `last.ckpt`. A full disk (ENOSPC, EDQUOT, EFBIG) is a
  `CheckpointWriteError` naming the file; the previous checkpoint is untouched.
* `read_checkpoint`: torch.load(weights_only=True) always; a file that is not a checkpoint (or holds
  objects a weights-only load refuses) is a `UserError`, and nothing in it is executed.
* `check_against`: a checkpoint from another model shape, or resumed with a conflicting model or
  optimizer override, is refused naming the keys and the config the checkpoint was made with.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sinkrec.errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# implementation choices that may differ between the run that wrote a checkpoint and the one using it
RUNTIME_KEYS = ("kernel_backend", "gate_backend", "conv_backend")


class CheckpointWriteError(UserError, OSError):
    pass


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first, so a failing write is a plain OSError
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in FULL_DISK:
                kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
                error = CheckpointWriteError(
                    f"{path}: the disk is full ({os.strerror(e.errno)}) while writing the checkpoint; {kept}. "
                    f"Free space in {path.parent} or point checkpoint.dirpath at a larger disk, then resume with "
                    "--ckpt_path last")
                error.errno = e.errno
                raise error from e
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Any) -> dict[str, Any]:
    """torch.load(path, weights_only=True) on CPU, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass a .ckpt written by `python -m sinkrec fit` "
                        "(see checkpoint.dirpath) or --ckpt_path last")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({_reason(e)}). It was opened with "
                        "torch.load(weights_only=True), so nothing in it ran. Pass a .ckpt written by "
                        "`python -m sinkrec fit` (see checkpoint.dirpath), or --ckpt_path last") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: a torch file but not a Lightning checkpoint (no 'state_dict'); pass a .ckpt "
                        "written by `python -m sinkrec fit`")
    return ckpt


def _reason(e: Exception) -> str:
    """The cause in one line, without torch's advice to retry with weights_only=False."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [line for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return "refused by the weights-only unpickler: " + (rest[0].strip() if rest else "unsupported content")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0].rstrip(".")  # the cause; torch's next sentences advise an unsafe load


def _diff(made: dict[str, Any], now: dict[str, Any], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return [f"{prefix}.{k}: checkpoint {made[k]!r}, this run {now.get(k)!r}"
            for k in made if k not in skip and k in now and plain(made[k]) != plain(now[k])]


def check_against(ckpt: dict[str, Any], path: Any, module: torch.nn.Module, resuming: bool) -> list[str]:
    """Raise a UserError if the checkpoint cannot serve this module (or this resumed run); returns warnings.

    Shapes must match key for key. The model config must equal the checkpoint's (except RUNTIME_KEYS,
    which are warnings); when resuming a fit, so must the optimizer config (the schedule and AdamW
    state continue from the checkpoint, so a new value would silently not apply).
    """
    made = ckpt.get("hyper_parameters") or {}
    state, own = ckpt["state_dict"], module.state_dict()
    problems = [f"{k}: missing from the checkpoint" for k in own if k not in state]
    problems += [f"{k}: in the checkpoint, not in this model" for k in state if k not in own]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)}, this model {tuple(own[k].shape)}"
                 for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    hp = getattr(module, "hparams", {})
    conflicts = _diff(made.get("config", {}), hp.get("config", {}), "model.config", RUNTIME_KEYS)
    if resuming:
        conflicts += _diff(made.get("optim", {}), hp.get("optim", {}), "optimizer")
    if problems or conflicts:
        config = ", ".join(f"{k}={v!r}" for k, v in made.get("config", {}).items() if k not in RUNTIME_KEYS)
        shown = problems[:6] + ([f"... {len(problems) - 6} more"] if len(problems) > 6 else [])
        what = "resume" if resuming else "use"
        raise UserError(
            f"{path} does not match this run, so it cannot {what} it. "
            + (f"Mismatching keys: {'; '.join(shown)}. " if problems else "")
            + (f"Conflicting settings: {'; '.join(conflicts)}"
               + (" (model.config.max_len is data.max_len)" if any(".max_len:" in c for c in conflicts) else "")
               + ". " if conflicts else "")
            + f"The checkpoint was made with model.config: {config or '(not recorded)'}. "
            "Use the config that made it (drop the overrides), or start a new run without --ckpt_path.")
    return [f"{path}: {d} (runtime choice, this run's value is used)"
            for d in _diff(made.get("config", {}), hp.get("config", {}), "model.config")
            if d.split(":")[0].rsplit(".", 1)[-1] in RUNTIME_KEYS]
