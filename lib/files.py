"""Reading and writing files the one way: JSON written atomically, YAML read safely, prompt files, shipped paths.

Every reader raises UsageError with one line that names the file and what is accepted, so scripts end with exit 2
instead of a traceback.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from lib.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent  # the repository: shipped prompts and configs live under it
MAX_CONFIG_BYTES = 4 << 20  # a config or prompt file larger than this is not one a person wrote
MAX_PROMPT_FILE_BYTES = 256 << 20
MAX_DATA_FILE_BYTES = 256 << 20  # a result or state file the project wrote


def shipped(path: str | Path) -> Path:
    """A default that names a file shipped with the project, resolved against the repository (so scripts work from
    any folder); paths the user types are used as typed, relative to where they were typed."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def json_text(data) -> str:
    """The project's JSON layout (indented, UTF-8 as is, anything else as its str), strict JSON: an infinite float
    (BURSTINESS=inf) is written as the text "inf" or "-inf" and NaN as null, never as Python's Infinity or NaN,
    which other JSON parsers refuse."""
    return json.dumps(_strict(data), indent=2, ensure_ascii=False, default=str, allow_nan=False)


def json_line(data) -> str:
    """One JSONL line of strict JSON, as json_text writes (no newline)."""
    return json.dumps(_strict(data), ensure_ascii=False, default=str, allow_nan=False)


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically: a temporary file of its own in the same folder (a name no other writer uses), then
    one rename, so a reader (or a second process writing the same file) never sees half a file."""
    path = Path(path)
    tmp = temporary_path(path)
    # O_EXCL: never someone else's file; 0o666 and the umask: the permissions of a file written the plain way
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json_text(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_HOST = re.sub(r"[^A-Za-z0-9]", "-", socket.gethostname()) or "host"


def temporary_path(path: Path, suffix: str = "") -> Path:
    """A name of its own next to `path` for a file written and then renamed over it: .<name>.<host>-<pid>.<random>.tmp.
    A writer killed before its rename (SIGKILL, a power cut) leaves its temporary file behind: the next writer of
    `path` on this host removes those whose process has ended (a live writer's, or another host's, are left)."""
    prefix = f".{path.name}.{_HOST}-"
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp*"):
        pid = stale.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            stale.unlink(missing_ok=True)
    return path.parent / f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path of its own next to `path` for a writer that wants a file name (matplotlib's savefig),
    renamed over `path` when the block ends; on an error the temporary file is removed and `path` is untouched.
    An OSError on the way (a full disk, a file size limit) becomes one UsageError naming `path`."""
    path = Path(path)
    tmp = temporary_path(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot be written ({exc.strerror or exc}); it is left as it was") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file (Markdown, HTML) atomically, as write_json does."""
    write_texts({path: text})


def write_texts(texts: dict[str | Path, str]) -> None:
    """Write several text files that belong together (one table as CSV and Markdown, a report in its formats):
    each to its temporary file first, and only when all are written are they renamed into place, so a failure on
    the way (a full disk, a file size limit) leaves every one of them as it was."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            stack.enter_context(atomic_path(path)).write_text(text, encoding="utf-8")


class LockHeld(Exception):
    """Another process holds the lock; the message says who."""


class FolderLock:
    """An flock on one file (e.g. <folder>/.lock): one holder at a time. The holder's line is written into the file
    so the refused one can say who holds it. The kernel drops the lock when the last process holding the file
    open ends (however it ends), so a crash never leaves it stale; a child given the fd (pass_fds) keeps it held
    for its own lifetime."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, holder: str, wait: bool = False):
        """Take the lock, or raise LockHeld naming its holder (wait: block until it is free instead); a lock file
        that cannot be opened (a folder in its place, no permission) is one UsageError naming it."""
        for _ in range(3):
            self._open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                self._close()
                raise LockHeld(who) from None
            if self._still_ours():
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, holder.encode(), 0)
                return
            self._close()  # the holder removed the file as it let go: lock the file that is there now
        raise LockHeld("a process that keeps taking and removing it")

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"lock {self.path}: cannot be opened ({exc.strerror}); expected a lock file this "
                             "process may create or write (move what is in its place away)") from None

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self, remove: bool = False):
        """Let go; `remove` deletes the lock file first (while still held, so no one locks a file about to go)."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._close()

    def _close(self):
        os.close(self.fd)
        self.fd = None


def path_component(value: str, label: str) -> str:
    """`value` if it names one folder or file inside another (no '/', not '.' or '..', not empty), else one line
    naming `label` (e.g. "RUN_ID='../x'") and what is accepted."""
    accepted = "one folder name: not empty, not '.' or '..', no '/', '\\' or control characters, at most 200 characters"
    if (not value or value in (".", "..") or len(value) > 200
            or any(c in "/\\" or ord(c) < 32 for c in value)):
        raise UsageError(f"{label}: expected {accepted}")
    return value


def utf8_path(path: str | Path, label: str) -> Path:
    """`path` if its name is UTF-8 text (it goes into the result files), else one line naming `label`. Bytes that
    are not UTF-8 reach Python as lone surrogates, which no UTF-8 file can hold."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{label}: the path is not UTF-8 text; expected a path of UTF-8 characters") from None
    return Path(path)


def not_a_file(path: Path) -> str:
    """Why `path`, which is not a regular file, cannot be read as one (a device or a pipe could block a read)."""
    if path.is_dir():
        return "is a folder"
    if path.exists():
        return "is not a regular file (a device, a pipe or a socket)"
    return "no such file"


def not_a_folder(path: Path) -> str:
    """Why `path`, which is not a folder, cannot be read as one."""
    return "no such folder" if not path.exists() else "is not a folder"


def read_text(path: str | Path, label: str, accepted: str, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a user's file, or one line naming `label` (e.g. '--config x.yaml') and what is accepted."""
    p = utf8_path(path, label)
    if not p.is_file():
        raise UsageError(f"{label}: {not_a_file(p)}; expected {accepted}")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise UsageError(f"{label}: {size} bytes is too large (at most {max_bytes}); expected {accepted}")
        return p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text; expected {accepted}") from None
    except OSError as exc:
        raise UsageError(f"{label}: cannot be read ({exc.strerror}); expected {accepted}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str):
    """json.loads of strict JSON: NaN and Infinity, which Python's json takes, are refused. Raises ValueError for
    text that is not JSON (an integer past Python's 4300-digit limit included) and RecursionError for nesting too
    deep: every reader of user files catches both."""
    return json.loads(text, parse_constant=_refuse_constant)


def read_json(path: str | Path, label: str, accepted: str, max_bytes: int = MAX_DATA_FILE_BYTES):
    """The data of a JSON file this project wrote (results, state), or one line naming `label` and what is
    accepted: missing, a folder, not UTF-8, not JSON, nested too deeply."""
    text = read_text(path, label, accepted, max_bytes)
    try:
        return json.loads(text)  # NaN and Infinity too: files of earlier versions hold them (BURSTINESS=inf)
    except ValueError as exc:
        raise UsageError(f"{label}: not valid JSON ({exc}); expected {accepted}") from None
    except RecursionError:
        raise UsageError(f"{label}: JSON nested too deeply; expected {accepted}") from None


class _DuplicateKey(Exception):
    pass


def _safe_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """safe_load without anchors and aliases (a few hundred bytes of nested aliases expand to gigabytes) and
        without keys listed twice in one mapping (YAML would silently keep the last)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not accepted")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if (key.tag, key.value) in seen:
                        raise _DuplicateKey(f"line {key.start_mark.line + 1}: {key.value!r} is listed twice "
                                            "(each key may appear once in a mapping)")
                    seen.add((key.tag, key.value))
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml(path: str | Path, label: str | None = None, expect_mapping: str = "a YAML mapping"):
    """A YAML file as Python data (a mapping unless expect_mapping is empty). Aliases and repeated keys are refused."""
    import yaml
    label = label or str(path)
    text = read_text(path, label, expect_mapping or "a YAML file")
    try:
        data = yaml.load(text, Loader=_safe_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise UsageError(f"{label}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise UsageError(f"{label}: nested too deeply to be a config") from None
    if data is None:
        data = {}
    if expect_mapping and not isinstance(data, dict):
        raise UsageError(f"{label}: expected {expect_mapping}, found {type(data).__name__}")
    return data


def read_prompt_file(path: str | Path, label: str) -> list[str]:
    """Non-empty lines of a prompt file, stripped. `label` names the input, e.g. 'PROMPT_FILE=x.txt'."""
    accepted = "a UTF-8 text file, one prompt per line"
    prompts = [line.strip() for line in read_text(path, label, accepted, MAX_PROMPT_FILE_BYTES).splitlines()
               if line.strip()]
    if not prompts:
        raise UsageError(f"{label}: the file has no prompts; expected {accepted}")
    return prompts


def output_dir(path: str | Path, label: str) -> Path:
    """Create (if needed) a folder results go to, or one line naming `label` (e.g. 'RESULTS_DIR=x') and the reason:
    a regular file in the way, no permission, a name that is not UTF-8."""
    p = utf8_path(path, label)
    blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{label}: {blocker} is a file, not a folder; expected a folder to write results into")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{label}: cannot create the folder ({exc.strerror}); expected a writable folder") from None
    if not os.access(p, os.W_OK):
        raise UsageError(f"{label}: the folder is not writable; expected a writable folder")
    return p


def output_file(path: str | Path, label: str) -> Path:
    """A file results will be written to, checked before any work: its folder created (output_dir's checks) and
    the path itself not a folder; or one line naming `label` (e.g. '--csv x.csv')."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{label}: is a folder; expected the path of a file to write")
    output_dir(p.parent, label)
    return p


def for_display(path: str | Path) -> str:
    """A path as the user would type it: relative when it lies under the working folder."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
