"""Where things live on disk: a study's artifacts (a tracking server's own store, a URI given as is, or a
local folder), and what a path given by the user can be (its length, what is there).

Light on purpose (no MLflow import): the config and the preflight checks use it before anything heavy is loaded.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from mnist_sweep import databases

SERVER_SCHEMES = ("http://", "https://")
LOCAL_ARTIFACTS = "mlruns/artifacts"  # beside the default store, for stores that are no sqlite file
# A scheme of two or more letters: `mlflow-artifacts:/x`, `s3://b/x`, `file:///x`; not a Windows drive `C:`.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")

# The kernel's limits (bytes), past which every open fails with ENAMETOOLONG; Linux's values where the
# platform does not say.
NAME_MAX = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096

# What `path_kind` answers; the others name what is there instead ("a FIFO", "a symlink loop", ...).
MISSING, FOLDER, FILE = "missing", "a folder", "a file"


def path_problem(value: str) -> str | None:
    """Why the path `value` can never be opened, or None: a name or a whole path (made absolute, as the
    stores open it) longer than the kernel takes. (A NUL, which no path can hold, is a control character:
    the config refuses it in every string.)"""
    try:
        absolute = os.fsencode(Path(value).expanduser().absolute())
    except (RuntimeError, UnicodeError) as exc:  # `~` without a home folder; a name the filesystem cannot encode
        return f"cannot be made a path ({exc})"
    longest = max(absolute.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        start = longest[:20].decode(errors="replace")
        return f"has a name of {len(longest)} bytes ({start}...); at most {NAME_MAX} fit"
    if len(absolute) >= PATH_MAX:
        return f"is {len(absolute)} bytes long as an absolute path; at most {PATH_MAX - 1} fit"
    return None


def path_kind(path: Path) -> str:
    """What is at `path`, following symlinks: MISSING, FOLDER, FILE, or a phrase naming what else is there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a symlink to the missing {os.readlink(path)}" if os.path.islink(path) else MISSING
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if exc.errno == errno.ENOTDIR:
            return MISSING  # a file stands where a folder should: the caller finds it among the parents
        return f"out of reach ({exc.strerror})"
    return kind_of_mode(mode)


def kind_of_mode(mode: int) -> str:
    """FOLDER, FILE, or a phrase naming what else an `os.stat` mode says is there."""
    if stat.S_ISDIR(mode):
        return FOLDER
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "neither a file nor a folder"


def nearest_existing(path: Path) -> Path:
    """`path` made absolute, or its nearest ancestor that is there (a symlink counts, even a broken one)."""
    current = path.expanduser().absolute()
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def is_uri(location: str) -> bool:
    """Whether an artifact location is a URI (any scheme MLflow knows) rather than a local folder."""
    return bool(_URI_SCHEME.match(location))


def artifact_location(uri: str, artifacts: str) -> str | None:
    """The artifact root of a new experiment; None leaves it to the tracking server's own artifact store.

    An explicit URI is used as given; a folder is made absolute. Left empty, a server keeps the artifacts
    (every worker then uploads through it, as `mlflow-artifacts:`), and a sqlite store gets the folder
    `artifacts` beside its database file.
    """
    if artifacts:
        return artifacts if is_uri(artifacts) else _real(Path(artifacts)).as_uri()
    if uri.startswith(SERVER_SCHEMES):
        return None
    database = databases.sqlite_file(uri)
    folder = database.parent / "artifacts" if database is not None else Path(LOCAL_ARTIFACTS)
    return _real(folder).as_uri()


def _real(path: Path) -> Path:
    """`path` absolute, symlinks resolved where they resolve: Path.resolve raises on a symlink loop, which
    the preflight names instead."""
    return Path(os.path.realpath(path.expanduser()))


def local_artifact_folder(uri: str, artifacts: str) -> Path | None:
    """The local folder that holds the artifacts, if they are on this machine's disk."""
    location = artifact_location(uri, artifacts)
    if location is None or not location.startswith("file:"):
        return None
    return Path(unquote(urlparse(location).path))
