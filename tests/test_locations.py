"""Where a study's artifacts go: a server's own store, a URI as given, or a local folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_sweep.locations import artifact_location, is_uri, local_artifact_folder


@pytest.mark.parametrize(
    "location",
    ["mlflow-artifacts:/sweeps", "mlflow-artifacts://host:5000/sweeps", "s3://bucket/sweeps", "gs://b/x", "file:///x"],
)
def test_a_uri_of_any_scheme_is_used_as_given(location: str) -> None:
    assert is_uri(location)
    assert artifact_location("http://127.0.0.1:5000", location) == location
    assert artifact_location("sqlite:///mlruns/mlflow.db", location) == location


def test_a_folder_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not is_uri("runs/artifacts") and not is_uri("/abs/artifacts")
    assert artifact_location("http://127.0.0.1:5000", "runs/artifacts") == (tmp_path / "runs/artifacts").as_uri()
    assert local_artifact_folder("sqlite:///x.db", "runs/artifacts") == tmp_path / "runs/artifacts"


def test_a_tracking_server_keeps_the_artifacts_by_default() -> None:
    assert artifact_location("http://127.0.0.1:5000", "") is None
    assert artifact_location("https://mlflow.example.org", "") is None
    assert local_artifact_folder("http://127.0.0.1:5000", "") is None


def test_a_sqlite_store_keeps_them_beside_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_artifact_folder("sqlite:///mlruns/mlflow.db", "") == tmp_path / "mlruns" / "artifacts"
    assert local_artifact_folder(f"sqlite:///{tmp_path}/db/m.db", "") == tmp_path / "db" / "artifacts"
    assert local_artifact_folder("s3://b", "s3://b") is None
