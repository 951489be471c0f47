"""Score caches keyed by file content, so a second plan for the same pair costs almost nothing.

The key is the SHA-256 of each file's bytes (plus the scorer version), never a path or an mtime alone.
Hashing a 300 MB LoRA takes a few hundred milliseconds, so digests are memoised per
(path, size, mtime, inode): an unchanged file is not re-read, a changed one always is.
Strengths are not part of the key because scores scale linearly with |strength|; the plan applies them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from lib_klora.fusion.scores import SCORER_VERSION, ScoreTable

_CHUNK = 4 * 1024 * 1024


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


class DigestMemo:
    """SHA-256 of files, recomputed only when size, mtime or inode change."""

    def __init__(self, disk_file: Path | None = None) -> None:
        self._memo: dict[tuple[str, int, int, int], str] = {}
        self._disk_file = disk_file
        self._lock = threading.Lock()
        if disk_file is not None and disk_file.is_file():
            try:
                for row in json.loads(disk_file.read_text()):
                    self._memo[tuple(row[:4])] = row[4]
            except (OSError, ValueError, TypeError, IndexError):
                pass  # a damaged memo only costs a re-hash

    def peek(self, path: Path) -> str | None:
        try:
            return self._memo.get(_stat_key(path))
        except OSError:
            return None

    def remember(self, path: Path, digest: str) -> None:
        with self._lock:
            self._memo[_stat_key(path)] = digest
            if self._disk_file is not None:
                rows = [[*key, value] for key, value in self._memo.items()]
                _atomic_write(self._disk_file, json.dumps(rows))

    def digest(self, path: Path) -> str:
        known = self.peek(path)
        if known is not None:
            return known
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
        self.remember(path, digest)
        return digest


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ScoreCache:
    """LRU memory cache of score tables with an optional on-disk layer (one JSON file per LoRA set)."""

    def __init__(self, max_entries: int = 16, directory: str | os.PathLike[str] | None = None) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.directory = Path(directory) if directory is not None else None
        self.digests = DigestMemo(self.directory / "digests.json" if self.directory else None)
        self._tables: OrderedDict[tuple[str, ...], ScoreTable] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _file(self, digests: tuple[str, ...]) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / ("-".join(d[:20] for d in digests) + f"-v{SCORER_VERSION}.json")

    def get(self, digests: tuple[str, ...]) -> ScoreTable | None:
        with self._lock:
            table = self._tables.get(digests)
            if table is not None:
                self._tables.move_to_end(digests)
                self.hits += 1
                return table
        file = self._file(digests)
        if file is not None and file.is_file():
            try:
                data = json.loads(file.read_text())
                if tuple(data.get("digests", ())) == digests:
                    table = ScoreTable.from_dict(data["table"])
                    self._store(digests, table)
                    self.hits += 1
                    return table
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable entries are recomputed and overwritten
        self.misses += 1
        return None

    def put(self, digests: tuple[str, ...], table: ScoreTable) -> None:
        self._store(digests, table)
        file = self._file(digests)
        if file is not None:
            _atomic_write(file, json.dumps({"digests": list(digests), "table": table.to_dict()}))

    def _store(self, digests: tuple[str, ...], table: ScoreTable) -> None:
        with self._lock:
            self._tables[digests] = table
            self._tables.move_to_end(digests)
            while len(self._tables) > self.max_entries:
                self._tables.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)
