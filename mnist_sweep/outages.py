"""A store that stops answering mid-run (a tracking server or database restarting, a network gone): one line.

MLflow's client retries each request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, set in cli.py: about 12 s of backoff),
SQLAlchemy's pool pings before each use (databases.engine_kwargs) and the trial heartbeat skips a beat that
fails (BeatThroughOutages), so a restart shorter than that is ridden out; a trial whose request outlasts it
fails like any failed trial, and the study goes on. An outage that outlasts the retries ends the command here
in one line: what finished is recorded, and the same command resumes.
"""

from __future__ import annotations

import contextlib

import optuna

from mnist_sweep.config import SweepConfig
from mnist_sweep.errors import first_line
from mnist_sweep.masking import mask_password


class BeatThroughOutages(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose trial heartbeat outlives a database that restarts.

    Optuna beats from a thread that ends at the first beat that raises: a database away for one interval (a
    PostgreSQL restart) printed the thread's traceback and left the trial beatless for good, so once the database
    was back another worker failed the live trial as stale. A beat that fails is skipped instead: the next is in
    time if the database is back within the grace period, and the trial is failed as stale (and retried) if not.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(Exception):  # sqlalchemy, psycopg and optuna raise many kinds
            super().record_heartbeat(trial_id)


# What MLflow's REST client and requests/urllib3 say once the retries are spent on a server that does not answer.
UNANSWERED_SIGNS = ("Max retries exceeded", "Connection refused", "Connection aborted", "Read timed out")


def outage_line(exc: BaseException, cfg: SweepConfig | None) -> str | None:
    """One line naming the store that stopped answering, if that is what `exc` (or what led to it) is; else None."""
    if cfg is None:
        return None
    through_mlflow = False  # a database error reached through MLflow is its store's (tracking.uri), not Optuna's
    for current in _chain(exc):
        kind = type(current).__module__.split(".")[0]
        message = str(current)
        through_mlflow = through_mlflow or kind == "mlflow"
        if kind in ("mlflow", "requests", "urllib3") and any(sign in message for sign in UNANSWERED_SIGNS):
            key, uri, reason = "tracking.uri", cfg.tracking.uri, _reason(message)
        elif kind == "sqlalchemy" and type(current).__name__ == "OperationalError":
            key, uri = ("tracking.uri", cfg.tracking.uri) if through_mlflow else ("study.storage", cfg.study.storage)
            if uri.startswith("sqlite"):  # a local file: an error of it is no outage
                continue
            reason = first_line(getattr(current, "orig", None) or current)
        else:
            continue
        return mask_password(
            f"{key} = {uri!r} stopped answering mid-run ({reason}); what finished is recorded: "
            "rerun the same command once it answers, and the sweep resumes"
        )
    return None


def _reason(message: str) -> str:
    for sign in UNANSWERED_SIGNS:
        if sign in message:
            return sign.lower()
    return first_line(Exception(message))


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it was raised from or while handling, each once."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        linked = (current.__cause__, None if current.__suppress_context__ else current.__context__)
        pending += [e for e in linked if e is not None]
    return seen
