"""Passwords: masked in every line and file the tool writes, and never needed in the sweep file at all."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import POSTGRES_PASSWORD, CliRunner, small_sweep_args, write_sweep
from tests.stores import tracking_url


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://sweep:s3cret@db:5432/optuna", "postgresql://sweep:***@db:5432/optuna"),
        ("postgresql+psycopg://sweep:p@ss:w@rd@db/optuna", "postgresql+psycopg://sweep:***@db/optuna"),
        ("postgresql://sweep:p/ss w@db/optuna", "postgresql://sweep:***@db/optuna"),  # SQLAlchemy reads 'p/ss w'
        ("HTTPS://alice:pw@mlflow.example/x", "HTTPS://alice:***@mlflow.example/x"),
        ("mysql+pymysql://root:x@127.0.0.1/m", "mysql+pymysql://root:***@127.0.0.1/m"),
        ("postgresql://sweep@db/optuna", "postgresql://sweep@db/optuna"),
        ("http://127.0.0.1:5000/path@x", "http://127.0.0.1:5000/path@x"),
        ("sqlite:///mlruns/optuna.db", "sqlite:///mlruns/optuna.db"),
        # The password in the query, which SQLAlchemy passes to the driver (libpq, psycopg, PyMySQL read it).
        ("postgresql://sweep@db/optuna?password=s3cret", "postgresql://sweep@db/optuna?password=***"),
        ("postgresql://db/o?sslmode=require&PASSWORD=s%40c&x=1", "postgresql://db/o?sslmode=require&PASSWORD=***&x=1"),
        ("mysql+pymysql://root@h/m?passwd=q#top", "mysql+pymysql://root@h/m?passwd=***#top"),
        ("postgresql://db/o?application_name=sweep", "postgresql://db/o?application_name=sweep"),
    ],
)
def test_mask_password_hides_only_the_password(uri: str, shown: str) -> None:
    from mnist_sweep.masking import mask_password

    assert mask_password(uri) == shown
    assert mask_password(f"study.storage = {uri!r}: cannot open") == f"study.storage = {shown!r}: cannot open"


def test_resolved_config_masks_passwords_in_what_is_shown_and_logged() -> None:
    from mnist_sweep.config import build_config

    cfg = build_config({"study": {"storage": "postgresql://sweep:s3cret@db/optuna"}})
    assert cfg.study.storage == "postgresql://sweep:s3cret@db/optuna"  # what connects keeps it
    assert cfg.to_dict()["study"]["storage"] == "postgresql://sweep:***@db/optuna"  # sweep.json, validate
    assert "s3cret" not in cfg.to_toml()


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("sweep:s3cret@db.example/{db}", "sweep:***@db.example/{db}"),
        ("db.example/{db}?password=s3cret", "db.example/{db}?password=***"),
    ],
    ids=["userinfo", "query"],
)
def test_validate_prints_both_store_passwords_masked(
    run_here: CliRunner, tmp_path: Path, secret: str, shown: str
) -> None:
    storage, tracking = (f"postgresql://{secret.format(db=db)}" for db in ("optuna", "mlflow"))
    sweep = write_sweep(tmp_path, f'[study]\nstorage = "{storage}"\n[tracking]\nuri = "{tracking}"\n')
    result = run_here("validate", str(sweep))
    assert result.returncode == 0, result.stderr
    assert f'storage = "postgresql://{shown.format(db="optuna")}"' in result.stdout
    assert f'uri = "postgresql://{shown.format(db="mlflow")}"' in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def _database(server: str, name: str, password: str) -> str:
    """A fresh database on the password server; returns its URL with the password in it."""
    import psycopg

    with psycopg.connect(f"{server}/postgres", password=password, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.replace("sweep@", f"sweep:{password}@") + f"/{name}"


def test_wrong_postgres_password_exits_2_naming_the_key_and_creates_nothing(
    postgres_password_server: str, run_here: CliRunner, tmp_path: Path
) -> None:
    url = _database(postgres_password_server, "wrong_password", POSTGRES_PASSWORD)
    wrong = url.replace(POSTGRES_PASSWORD, "Wrong-pw-4711")
    work = tmp_path / "work"
    work.mkdir()
    result = run_here("run", "--set", f'study.storage="{wrong}"', str(write_sweep(tmp_path, "")), cwd=work)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "study.storage" in lines[0] and "sweep:***@" in lines[0]
    assert "password authentication failed" in lines[0]
    assert "Wrong-pw-4711" not in result.stdout + result.stderr
    assert list(work.iterdir()) == []


def _every_file(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_password_appears_in_nothing_the_tool_writes_or_prints(
    postgres_password_server: str, run_cli: CliRunner, tmp_path: Path, form: str
) -> None:
    """A tiny sweep on a PostgreSQL that asks for a password: every file, run record and line searched for it.

    `query`: the password as `?password=` in both the Optuna storage's and the MLflow tracking URI's query.
    """
    url = _database(postgres_password_server, f"secret_{form}", POSTGRES_PASSWORD)
    tracking = tracking_url(tmp_path / "work")
    text = f'[study]\nstorage = "{url}"\n'
    if form == "query":
        url = url.replace(f":{POSTGRES_PASSWORD}@", "@") + f"?password={POSTGRES_PASSWORD}"
        tracking = _database(postgres_password_server, "secret_tracking", POSTGRES_PASSWORD)
        tracking = tracking.replace(f":{POSTGRES_PASSWORD}@", "@") + f"?password={POSTGRES_PASSWORD}"
        text = f'[study]\nstorage = "{url}"\n[tracking]\nuri = "{tracking}"\n'
    sweep = write_sweep(tmp_path, text, name="secret.toml")
    work = tmp_path / "work"
    work.mkdir()
    printed = []
    for args in (
        ["run", str(sweep), *small_sweep_args(trials=2)],
        ["validate", str(sweep)],
        ["trials", str(sweep)],
        ["report", str(sweep)],
        ["finalize", str(sweep)],
    ):
        result = run_cli(*args, cwd=work)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout + result.stderr)

    assert ("sweep:***@" if form == "userinfo" else "?password=***") in printed[1]  # validate shows it masked
    for output in printed:
        assert POSTGRES_PASSWORD not in output
    written = _every_file(work)
    assert any(p.name == "sweep.json" for p in written) and any(p.name == "test_metrics.json" for p in written)
    assert any(p.name == "model.keras" for p in written) and any(p.suffix == ".html" for p in written)
    for path in written:  # databases, models, zips and the report included: bytes, not text
        assert POSTGRES_PASSWORD.encode() not in path.read_bytes(), path
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4  # the parent, two trials and the lecture's network
    for run in runs:
        assert POSTGRES_PASSWORD not in repr(run.data.params) + repr(run.data.tags)
    study = optuna.load_study(study_name="fcn", storage=url)
    stored = repr(study.user_attrs) + repr([t.user_attrs for t in study.trials])
    assert POSTGRES_PASSWORD not in stored


def test_pgpassword_or_pgpass_keeps_the_password_out_of_the_sweep_file(
    postgres_password_server: str, run_cli: CliRunner, tmp_path: Path
) -> None:
    """libpq reads PGPASSWORD and ~/.pgpass (or $PGPASSFILE): the sweep file holds no password at all."""
    url = _database(postgres_password_server, "from_environment", POSTGRES_PASSWORD)
    without = url.replace(f":{POSTGRES_PASSWORD}@", "@")
    sweep = write_sweep(tmp_path, f'[study]\nstorage = "{without}"\n')
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:*:*:sweep:{POSTGRES_PASSWORD}\n")
    pgpass.chmod(0o600)
    work = tmp_path / "work"
    work.mkdir()
    refused = run_cli("trials", str(sweep), cwd=work, env={"PGPASSWORD": "", "PGPASSFILE": str(tmp_path / "none")})
    assert refused.returncode == 2 and "study.storage" in refused.stderr, refused.stderr
    for env in ({"PGPASSWORD": POSTGRES_PASSWORD}, {"PGPASSFILE": str(pgpass)}):
        accepted = run_cli("trials", str(sweep), cwd=work, env=env)
        # Past the connection: the study is simply not there yet.
        assert accepted.returncode == 2 and "does not exist" in accepted.stderr, accepted.stderr
        assert "authentication" not in accepted.stderr
