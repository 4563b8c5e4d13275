"""Checkpoint files: tensors and plain data only, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict with a ``format`` marker, the classes it was written for and the states
of the model, optimizer, controller, scheduler and RNGs.  Nothing in it is code: torch's
restricted unpickler refuses every global that is not a tensor or a builtin container, so a
crafted file cannot run anything.  Every way a file can be wrong (missing, empty, truncated,
not a checkpoint, written for another model or optimizer) gives one :class:`CheckpointError`
that names the file and what does not match.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Marker and version of the checkpoint layout.
CHECKPOINT_FORMAT = "snopt-checkpoint"
CHECKPOINT_VERSION = 1

#: Keys every checkpoint holds.
_REQUIRED = ("model", "optimizer", "step", "epoch", "batch_in_epoch", "history", "rng", "totals")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, corrupt, not a checkpoint, or another model's."""


def _fail(path: str | os.PathLike, problem: str) -> CheckpointError:
    return CheckpointError(f"`checkpoint` file {str(path)!r} {problem}")


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint file, read without executing anything.

    Args:
        path: the file.
        device: where tensors are mapped.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, holds anything but
            tensors and plain data, or is not a snopt checkpoint.
    """
    file = Path(path)
    if not file.is_file():
        raise _fail(path, "does not exist or is not a file.")
    if file.stat().st_size == 0:
        raise _fail(path, "is empty (0 bytes); delete it or point `checkpoint` elsewhere.")
    if not zipfile.is_zipfile(file):
        raise _fail(path, _not_an_archive(file))
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if "global" in line.lower()), "")
        if not detail:
            raise _fail(
                path, f"is truncated or corrupt and cannot be read ({lines[-1] if lines else exc})."
            ) from None
        raise _fail(
            path,
            "holds objects other than tensors and plain data and was not loaded "
            f"(snopt checkpoints never do): {detail.split(' was not an allowed global')[0].rstrip('.')}.",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise _fail(
            path, f"is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _fail(path, f"is not a snopt checkpoint (no {CHECKPOINT_FORMAT!r} marker).")
    if state.get("version") != CHECKPOINT_VERSION:
        raise _fail(
            path, f"has layout version {state.get('version')!r}; this snopt reads {CHECKPOINT_VERSION}."
        )
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise _fail(path, f"lacks the entries {missing}.")
    return state


#: Bytes of a file that is not a checkpoint read to say what it is.
_SNIFF_BYTES = 1 << 20


def _not_an_archive(file: Path) -> str:
    """What a file that is not a torch zip archive (every snopt checkpoint is one) holds, unread.

    A raw pickle is never handed to torch, whose legacy reader would warn about its protocol
    and call it corrupt: its opcodes are listed (``pickletools`` runs nothing) and the globals
    it names are reported, since code in a pickle is reached through them.
    """
    with open(file, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head.startswith(b"\x80"):  # every pickle of protocol 2 and later starts with PROTO
        return (
            "is truncated or corrupt, or another kind of file: not a torch zip archive, as checkpoints are."
        )
    names = _pickle_globals(head)
    if names:
        return (
            "holds objects other than tensors and plain data and was not loaded (snopt checkpoints never "
            f"do): a raw pickle naming {', '.join(names[:5])}."
        )
    return (
        "is a raw pickle, not a snopt checkpoint (a torch zip archive of tensors and plain data); not loaded."
    )


def _pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) a pickle names, read with ``pickletools`` (nothing is run)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a cut or malformed pickle: what was read so far
        pass
    return list(dict.fromkeys(names))


def check_matches(
    path: str | os.PathLike,
    state: Mapping[str, Any],
    model: nn.Module,
    owners: Mapping[str, Any],
) -> None:
    """Raise :class:`CheckpointError` when ``state`` was written for another model or setup.

    Args:
        path: the file (for the message).
        state: what :func:`read_checkpoint` returned.
        model: the model that will load it.
        owners: ``{"optimizer": ..., "controller": ..., "preconditioner": ..., "scheduler": ...}``
            of the trainer (None where it has none).
    """
    classes = state.get("classes", {})
    for name, owner in (("model", model), *owners.items()):
        saved = classes.get(name)
        mine = None if owner is None else type(owner).__qualname__
        if saved != mine and not (saved is None and name not in classes):
            raise _fail(path, f"was written for {name} {saved!r}, but this run's {name} is {mine!r}.")
    problems = _state_mismatch(state["model"], model.state_dict())
    if problems:
        raise _fail(path, f"does not match this model: {problems}.")


def _state_mismatch(saved: Any, mine: Mapping[str, torch.Tensor]) -> str:
    if not isinstance(saved, Mapping):
        return f"its model state is a {type(saved).__name__}, not a mapping of tensors"
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    parts = []
    if missing:
        parts.append(f"missing {_some(missing)}")
    if extra:
        parts.append(f"unexpected {_some(extra)}")
    for key in sorted(set(mine) & set(saved)):
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            parts.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != mine[key].shape:
            parts.append(f"{key} has shape {tuple(value.shape)} in the file, {tuple(mine[key].shape)} here")
        if len(parts) >= 4:
            break
    return "; ".join(parts)


def _some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} keys)"


def write_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` atomically (temporary file, then rename) and return the path.

    The temporary file is this process's own, so that two processes that write the same
    path never write into one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
