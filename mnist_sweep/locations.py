"""Where a study's artifacts live: a tracking server's own store, a URI given as is, or a local folder.

Light on purpose (no MLflow import): the preflight checks use it before anything heavy is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from mnist_sweep import databases

SERVER_SCHEMES = ("http://", "https://")
LOCAL_ARTIFACTS = "mlruns/artifacts"  # beside the default store, for stores that are no sqlite file
# A scheme of two or more letters: `mlflow-artifacts:/x`, `s3://b/x`, `file:///x`; not a Windows drive `C:`.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


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
        return artifacts if is_uri(artifacts) else Path(artifacts).expanduser().resolve().as_uri()
    if uri.startswith(SERVER_SCHEMES):
        return None
    database = databases.sqlite_file(uri)
    folder = database.parent / "artifacts" if database is not None else Path(LOCAL_ARTIFACTS)
    return folder.expanduser().resolve().as_uri()


def local_artifact_folder(uri: str, artifacts: str) -> Path | None:
    """The local folder that holds the artifacts, if they are on this machine's disk."""
    location = artifact_location(uri, artifacts)
    if location is None or not location.startswith("file:"):
        return None
    return Path(unquote(urlparse(location).path))
