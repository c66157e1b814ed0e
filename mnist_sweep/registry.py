"""The chosen model in MLflow's Model Registry: a version of `tracking.registered_model`, alias `champion`.

Called once the test result is recorded (sweep._finalize), by the process that scored it and by any later
`finalize` or `run` of the study, so a registration that failed or was cut short is made by the next one. It is
idempotent: a version of this run's model already there is reused, not made again, and two processes that
each created one at the same moment both keep the lower version number and delete the other. So a study has
one version, whoever registers it and however often.

A registered model this tool did not create (no `mnist_sweep.registered_by` tag) is another project's: it is
refused, up front where the store already exists (`check_up_front`, before any trial) and again here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from mnist_sweep.errors import RegistryError, first_line
from mnist_sweep.records import (
    CHAMPION,
    PARENT_RUN_ID_TAG,
    REGISTERED_BY,
    REGISTERED_BY_TAG,
    STUDY_TAG,
    TRIAL_NUMBER_TAG,
    Registration,
    TestResult,
)
from mnist_sweep.workarounds import validate_registered_model_name

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

KEY = "tracking.registered_model"


def register_champion(
    client: MlflowClient, *, name: str, result: TestResult, parent_run_id: str, report: str
) -> Registration:
    """The result's model as one version of `name` with alias champion and the test numbers as tags.

    `report` says where the report is, for the version's description. Raises RegistryError (one line).
    """
    from mlflow.exceptions import MlflowException

    try:
        _own_registered_model(client, name, study=result.study)
        version = _version_of(client, name, result) or _create_version(
            client, name, result, parent_run_id=parent_run_id, report=report
        )
        _point_champion_at(client, name, version.version)
    except MlflowException as exc:
        raise RegistryError(_refusal(name, exc)) from None
    return Registration(name=name, version=str(version.version))


def _point_champion_at(client: MlflowClient, name: str, version: str | int) -> None:
    """The alias champion set to `version`. Two finalizers racing on a sqlite store can both insert the alias
    row; the later insert fails (IntegrityError, seen once under load) though the row now exists, so it is set
    once more, which updates that row."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    except MlflowException:
        client.set_registered_model_alias(name, CHAMPION, str(version))


def check_up_front(client_for: Callable[[], MlflowClient] | None, name: str) -> None:
    """Before any trial: a name MLflow refuses, or one that another project's registered model holds (looked up
    through `client_for()`; None where the store does not exist yet)."""
    from mlflow.exceptions import MlflowException

    if not name:
        return
    try:
        validate_registered_model_name(name)
    except MlflowException as exc:
        raise RegistryError(f"{KEY} = {name!r}: MLflow refuses this name ({first_line(exc)})") from None
    if client_for is None:
        return
    try:
        found = client_for().get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise RegistryError(_refusal(name, exc)) from None
    if found.tags.get(REGISTERED_BY_TAG) != REGISTERED_BY:
        raise RegistryError(_taken(name))


def _own_registered_model(client: MlflowClient, name: str, *, study: str) -> None:
    """Create the registered model, marked as this tool's; or check that the one of that name is."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={REGISTERED_BY_TAG: REGISTERED_BY},
            description=f"The MNIST fully connected network chosen by mnist-sweep (first: study `{study}`); the "
            f"alias `{CHAMPION}` is the latest study's chosen model.",
        )
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if client.get_registered_model(name).tags.get(REGISTERED_BY_TAG) != REGISTERED_BY:
        raise RegistryError(_taken(name))


def _version_of(client: MlflowClient, name: str, result: TestResult) -> ModelVersion | None:
    """The lowest version of `name` holding the result's model; any higher ones, made by a finalizer racing
    this one, are deleted (each racer keeps the same, lowest, version)."""
    from mlflow.exceptions import MlflowException

    found = client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{result.run_id}'")
    # The source, not model_id: the sqlite store does not give a version's model_id back.
    versions = sorted((v for v in found if v.source == result.model_uri), key=lambda v: int(v.version))
    for duplicate in versions[1:]:
        with contextlib.suppress(MlflowException):  # the other racer deleted it first
            client.delete_model_version(name, duplicate.version)
    return versions[0] if versions else None


def _create_version(
    client: MlflowClient, name: str, result: TestResult, *, parent_run_id: str, report: str
) -> ModelVersion:
    low, high = result.test_accuracy_ci95
    tags = {
        "test_accuracy": f"{result.test_accuracy:.6f}",
        "test_accuracy_ci95_low": f"{low:.6f}",
        "test_accuracy_ci95_high": f"{high:.6f}",
        "test_loss": f"{result.test_loss:.6f}",
        "test_images": str(result.test_images),
        TRIAL_NUMBER_TAG: str(result.trial_number),
        STUDY_TAG: result.study,
        PARENT_RUN_ID_TAG: parent_run_id,
    }
    description = (
        f"Trial {result.trial_number} of mnist-sweep study `{result.study}`, chosen on validation "
        f"({result.metric}) and scored once on {result.test_images} held-out test images: accuracy "
        f"{result.test_accuracy:.4f} (95 % Wilson CI {low:.4f} to {high:.4f}), loss {result.test_loss:.4f}.\n\n"
        f"Report: {report}"
    )
    client.create_model_version(
        name,
        source=result.model_uri,
        run_id=result.run_id,
        tags=tags,
        description=description,
        model_id=result.model_uri.removeprefix("models:/"),
    )
    # Read back through the same lookup, so a racer's version made meanwhile is settled the same way here.
    version = _version_of(client, name, result)
    assert version is not None  # just created
    return version


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")


def _taken(name: str) -> str:
    return (
        f"{KEY} = {name!r}: the Model Registry already has a model of that name that mnist-sweep did not create "
        f'(no {REGISTERED_BY_TAG} tag); choose another name, or "" to register nothing'
    )


def _refusal(name: str, exc: MlflowException) -> str:
    if exc.get_http_status_code() == 403:  # type: ignore[no-untyped-call]
        return f"{KEY} = {name!r}: the MLflow server refused to register the model (403): {first_line(exc)}"
    return f"{KEY} = {name!r}: the Model Registry refused it ({first_line(exc)})"
