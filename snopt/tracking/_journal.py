"""The local fallback journal of a run, and its replay into MLflow (``snopt tracking sync``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._redact import is_redacted, redact_text, redact_url
from ._common import (
    _JOURNAL_FORMAT,
    _OFFLINE_PREFIX,
    _PARENT_TAG,
    _check_database,
    _describe,
    _is_rejection,
    _mark_reachable,
    _mlflow,
    _short_http_retries,
    default_fallback_dir,
)
from ._ops import (
    JournalRefused,
    _apply,
    _experiment_for,
)

#: What a journal's ``local_id`` (the name of its files folder) may look like.
_LOCAL_ID = re.compile(r"[A-Za-z0-9_.-]+")

#: Operations whose ``path`` names a file of the journal's folder.
_FILE_OPS = ("log_artifact", "log_model_weights")


def _confined(base: Path, rel: Any) -> Path:
    """``base / rel``, refused unless it stays inside ``base`` (links resolved, inside folders too)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise JournalRefused(f"path {rel!r} is not a relative path inside the journal's folder {base}")
    root = base.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(root):
        raise JournalRefused(f"path {rel!r} resolves to {target}, outside the journal's folder {root}")
    if target.is_dir():
        for item in target.rglob("*"):
            if not item.resolve().is_relative_to(root):
                raise JournalRefused(f"{item} in {rel!r} links outside the journal's folder {root}")
    return target


def _target_uri(header: Mapping[str, Any], explicit: str | None) -> str:
    """Where a journal replays: the URI given explicitly, else the one it was written for.

    The header holds that URI with its credentials masked; the environment's URI
    (``MLFLOW_TRACKING_URI``) supplies them when it is the same URI.
    """
    if explicit:
        return explicit
    uri = header.get("tracking_uri")
    if not isinstance(uri, str) or not uri:
        raise JournalRefused("its header names no tracking URI; pass one explicitly (--tracking-uri)")
    if is_redacted(uri):
        own = os.environ.get("MLFLOW_TRACKING_URI", "")
        if redact_url(own) != uri:
            raise JournalRefused(
                f"it was written for {uri}, whose credentials are not stored; "
                "pass that URI explicitly (--tracking-uri) to replay it there"
            )
        uri = own
    from .._checks import tracking_uri

    return str(tracking_uri("tracking_uri", uri))


# ------------------------------------------------------------------ the journal
class _Journal:
    """The local record of one run's operations while the tracking server is unreachable."""

    def __init__(self, directory: Path, header: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.local_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"{self.local_id}.jsonl"
        self.files = directory / self.local_id
        self._lock = threading.Lock()
        self._n_files = 0
        self.closed = False
        self._write(
            {
                "format": _JOURNAL_FORMAT,
                "version": 1,
                "local_id": self.local_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **header,
                # Credentials never go to disk; a sync gets them from --tracking-uri or the environment.
                "tracking_uri": redact_url(header.get("tracking_uri")),
            }
        )

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, op: dict[str, Any]) -> None:
        self._write(op)

    def close(self) -> None:
        """Mark the journal complete: nothing more will be appended, a sync may replay it."""
        if not self.closed:
            self._write({"op": "close"})
            self.closed = True

    def stash(self, source: Path) -> str:
        """Copy a file or folder next to the journal; returns its path relative to the files folder."""
        self._n_files += 1
        rel = f"{self._n_files:04d}/{source.name}"
        dest = self.files / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy2(source, dest)
        return rel

    def new_dir(self, name: str) -> tuple[Path, str]:
        self._n_files += 1
        rel = f"{self._n_files:04d}/{name}"
        (self.files / rel).parent.mkdir(parents=True, exist_ok=True)
        return self.files / rel, rel


# ------------------------------------------------------------------------ sync
@dataclass
class SyncResult:
    """What :func:`sync_fallback` did with one journal.

    Attributes:
        journal: path of the journal file.
        status: ``"synced"`` (all replayed; the journal moved to ``synced/``), ``"refused"``
            (not a valid journal, or no tracking URI it may replay to: nothing sent), ``"failed"``
            (MLflow still unreachable; the replay resumes where it stopped next time),
            ``"waiting"`` (its parent run has not been synced yet) or ``"open"`` (its run is
            still going).
        run_id: the MLflow run the journal was replayed into (None if not created yet).
        operations: operations replayed by this call.
        error: why it stopped, when it did.
        notes: items the server refused (for example a param that already had another value).
    """

    journal: str
    status: str
    run_id: str | None = None
    operations: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.error = redact_text(self.error)  # an exception's text may quote the URI it failed on


def _read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or not isinstance(lines[0], dict) or lines[0].get("format") != _JOURNAL_FORMAT:
        raise ValueError(f"{path} is not a snopt tracking journal (no {_JOURNAL_FORMAT!r} header).")
    local_id = lines[0].get("local_id")
    if not isinstance(local_id, str) or not _LOCAL_ID.fullmatch(local_id) or set(local_id) <= {"."}:
        raise ValueError(
            f"{path} is not a snopt tracking journal: its local_id {local_id!r} is not a plain "
            "folder name (letters, digits, '-', '_', '.')."
        )
    if not all(isinstance(op, dict) and isinstance(op.get("op"), str) for op in lines[1:]):
        raise ValueError(f"{path} is not a snopt tracking journal: an entry is not an operation.")
    return lines[0], lines[1:]


def _check_folder(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"`directory` must be the fallback folder, but directory={str(directory)!r} is a file."
        )


def pending_journals(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The journals in ``directory`` that still wait for a sync, with their headers and sizes."""
    directory = Path(directory) if directory is not None else default_fallback_dir()
    _check_folder(directory)
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        try:
            header, ops = _read_journal(path)
        except (ValueError, json.JSONDecodeError) as exc:
            out.append({"journal": str(path), "error": str(exc)})
            continue
        progress = _read_progress(path)
        out.append(
            {
                "journal": str(path),
                "tracking_uri": header.get("tracking_uri"),
                "experiment": header.get("experiment"),
                "run_id": progress.get("run_id") or header.get("run_id"),
                "operations": len(ops),
                "done": progress.get("done", 0),
            }
        )
    return out


def _progress_path(journal: Path) -> Path:
    return journal.with_name(journal.stem + ".progress.json")


def _read_progress(journal: Path) -> dict[str, Any]:
    path = _progress_path(journal)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_progress(journal: Path, progress: dict[str, Any]) -> None:
    path = _progress_path(journal)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, path)


def _map_offline(value: str | None, id_map: Mapping[str, str]) -> str | None:
    if value and value.startswith(_OFFLINE_PREFIX):
        return id_map.get(value[len(_OFFLINE_PREFIX) :])
    return value


def _journal_is_live(header: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> bool:
    """A journal still being written: not closed, and its writer process is alive on this host."""
    if ops and ops[-1].get("op") == "close":
        return False
    if header.get("host") != socket.gethostname():
        return False  # a journal copied from another machine: its writer is not here
    pid = header.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # the writer crashed: replay what it wrote
    except PermissionError:
        return True
    return True


def sync_fallback(
    directory: str | os.PathLike | None = None,
    *,
    tracking_uri: str | None = None,
    journals: Iterable[str | os.PathLike] | None = None,
) -> list[SyncResult]:
    """Replay the runs of the local fallback into MLflow.

    Over 60 lines only for this docstring (what a replay may and may not do); the body is 30.

    Every journal is replayed into the run it belongs to (created on the server if the server
    was down when the run started, with its parent mapped).  A replay that stops (server still
    down) resumes where it stopped on the next call; metrics that were already sent are not
    duplicated.  Fully replayed journals are moved to ``<directory>/synced``.

    Nothing from a journal executes: models travel as weights files (tensors only), and every
    file an entry names must resolve inside the journal's own folder, else that entry is
    refused (listed in :attr:`SyncResult.notes`).

    Journals of runs that are still going (their process is alive on this machine) are left
    alone (status ``"open"``); those of a process that died are replayed as far as they go.

    Args:
        directory: the fallback folder (default ``./snopt_runs/fallback``).
        tracking_uri: replay into this tracking URI instead of the one each run was meant for
            (a journal never replays anywhere else; its header holds that URI without
            credentials, which come from ``MLFLOW_TRACKING_URI`` when it is the same URI).
        journals: only these journal files of ``directory`` (default: all).

    Returns:
        One :class:`SyncResult` per journal.

    Raises:
        ValueError: ``directory`` is a file, or ``journals`` names files outside it.
    """
    directory = Path(directory) if directory is not None else default_fallback_dir()
    _check_folder(directory)
    if not directory.exists():
        return []
    id_map_path = directory / "id_map.json"
    id_map: dict[str, str] = json.loads(id_map_path.read_text()) if id_map_path.exists() else {}
    synced_map_path = directory / "synced" / "id_map.json"
    if synced_map_path.exists():
        id_map = {**json.loads(synced_map_path.read_text()), **id_map}
    results = []
    with _short_http_retries():
        if journals is None:
            pending = sorted(directory.glob("*.jsonl"))
        else:
            pending = sorted(Path(j) for j in journals if Path(j).exists())
            outside = [p for p in pending if p.resolve().parent != directory.resolve()]
            if outside:
                names = [str(p) for p in outside]
                raise ValueError(f"`journals` must be files of {directory}, but got {names}.")
        # Parents before children: a journal may refer to a run another journal creates.
        while pending:
            waiting = []
            for path in pending:
                result = _replay(path, id_map, tracking_uri)
                if result.status == "waiting":
                    waiting.append(path)
                else:
                    results.append(result)
                id_map_path.write_text(json.dumps(id_map))  # _replay adds the runs it creates
            if len(waiting) == len(pending):
                break
            pending = waiting
        results += [SyncResult(str(p), "waiting", error="its parent run is not synced yet") for p in pending]
    return results


class _Waiting(Exception):
    """A run this journal names (its own or its parent) is not synced yet: retried later."""


def _replay(path: Path, id_map: dict[str, str], tracking_uri: str | None) -> SyncResult:
    try:
        header, ops = _read_journal(path)
    except (ValueError, json.JSONDecodeError) as exc:
        return SyncResult(str(path), "refused", error=str(exc))
    if _journal_is_live(header, ops):
        return SyncResult(str(path), "open", error="its run is still being written")
    try:
        uri = _target_uri(header, tracking_uri)
    except (JournalRefused, ValueError) as exc:
        return SyncResult(str(path), "refused", error=f"not replayed: {exc}")
    progress = _read_progress(path)
    done = int(progress.get("done", 0))
    try:
        run_id = _known_run_id(header, progress, id_map)
    except _Waiting as exc:
        return SyncResult(str(path), "waiting", error=str(exc))
    if progress.get("run_id") and any(op["op"] == "create_run" for op in ops[:done]):
        id_map[header["local_id"]] = progress["run_id"]  # created by an earlier, interrupted sync
    try:
        _check_database(uri)  # a database that is down fails the sync in seconds, not minutes
    except ConnectionError as exc:
        return SyncResult(str(path), "failed", run_id=run_id, error=str(exc))
    client = _mlflow().MlflowClient(tracking_uri=uri)
    base = path.parent / header["local_id"]  # the journal's own folder (a plain name, checked on reading)
    result = SyncResult(str(path), "failed", run_id=None)
    try:
        for index, op in enumerate(ops):
            if index < done:
                if op["op"] == "create_run" and run_id is None:
                    raise RuntimeError(f"{path}: progress says the run was created but records no run id.")
                continue
            if op["op"] == "create_run":
                run_id = _create_run(client, uri, header, op, id_map)
            elif op["op"] != "close":
                if run_id is None:
                    raise RuntimeError(f"{path}: operation {index} comes before the run is created.")
                result.notes += _replay_op(client, uri, run_id, base, index, op, id_map)
            done = index + 1
            result.operations += 1
            _write_progress(path, {"run_id": run_id, "done": done})
    except _Waiting as exc:
        return SyncResult(str(path), "waiting", run_id=run_id, error=str(exc))
    except Exception as exc:
        result.error = _describe(exc)
        result.run_id = run_id
        return result
    _mark_reachable(uri)
    _archive(path, base)
    result.status, result.run_id = "synced", run_id
    return result


def _known_run_id(header: dict[str, Any], progress: dict[str, Any], id_map: dict[str, str]) -> str | None:
    """The tracking run this journal writes to, or None when the journal creates it."""
    run_id = progress.get("run_id") or header.get("run_id")
    if run_id and run_id.startswith(_OFFLINE_PREFIX):
        if run_id[len(_OFFLINE_PREFIX) :] == header["local_id"]:
            return None  # this journal creates the run
        mapped = _map_offline(run_id, id_map)
        if mapped is None:
            raise _Waiting(f"run {run_id} is not synced yet")
        return mapped
    return run_id


def _with_parent(tags: dict[str, Any], id_map: dict[str, str]) -> dict[str, Any]:
    """``tags`` with an offline parent run id replaced by the synced one."""
    if _PARENT_TAG not in tags:
        return tags
    parent = _map_offline(tags[_PARENT_TAG], id_map)
    if parent is None:
        raise _Waiting(f"parent {tags[_PARENT_TAG]} is not synced yet")
    return {**tags, _PARENT_TAG: parent}


def _create_run(
    client: Any, uri: str, header: dict[str, Any], op: dict[str, Any], id_map: dict[str, str]
) -> str:
    tags = _with_parent(dict(op.get("tags", {})), id_map)
    experiment_id = _experiment_for(client, header["experiment"], tags, uri)
    run = client.create_run(
        experiment_id, start_time=op.get("start_time"), tags=tags, run_name=op.get("run_name")
    )
    id_map[header["local_id"]] = run.info.run_id
    return str(run.info.run_id)


def _replay_op(
    client: Any, uri: str, run_id: str, base: Path, index: int, op: dict[str, Any], id_map: dict[str, str]
) -> list[str]:
    """Apply one logging operation; notes for what the server or the confinement refused."""
    if op["op"] == "log_batch" and _PARENT_TAG in op.get("tags", {}):
        op = {**op, "tags": _with_parent(op["tags"], id_map)}
    try:
        if op["op"] in _FILE_OPS:
            _confined(base, op.get("path"))
        return _apply(client, uri, run_id, op, base)
    except JournalRefused as exc:
        return [f"operation {index} ({op['op']}) refused: {exc}"]
    except Exception as exc:
        if not _is_rejection(exc):
            raise
        return [f"operation {index} ({op['op']}) refused: {_describe(exc)}"]


def _archive(path: Path, base: Path) -> None:
    """Move a synced journal, its progress file and its folder into ``synced/``."""
    synced = path.parent / "synced"
    synced.mkdir(exist_ok=True)
    for item in (path, _progress_path(path), base):
        if item.exists():
            target = synced / item.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(item), str(target))
