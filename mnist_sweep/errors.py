"""Every error of mnist-sweep, grouped by what it means for the user; the CLI maps each base to an exit code.

- `UserError` (exit 2): input that cannot be used: the sweep file, a flag, the data, a store or folder.
  Its message is one line naming the key and the value; nothing was written.
- `TooManyFailures` (exit 1): trials keep failing, so the sweep stopped; the finished ones are kept.
- `TrialDiverged`: one trial failed; it is recorded on the trial and the study goes on.
- `WithheldTestSplitError`: a bug, not an input: the test images were asked for while trials run.
- `MissingParamError`: a run's params lack a key; `replay` turns it into a `UsageError` naming the run.

Light on purpose (no third-party import): `validate` and the preflight checks use it.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type where it has none: for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CommandError(Exception):
    """Ends the command: its message on one line (passwords masked), and `exit_code`."""

    exit_code = EXIT_FAILED


# --------------------------------------------------------------------------- exit 2: bad input


class UserError(CommandError):
    """Input that cannot be used; nothing was written."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError):
    """A sweep file, or a `--set` value, that cannot be used."""


class UsageError(UserError):
    """A command-line argument that is not a sweep-file key (`--sort`, `--port`, a run id) and cannot be used."""


class DataError(UserError):
    """Missing or corrupt MNIST data; the message names the file and what is wrong."""


class PreflightError(UserError):
    """A storage, tracking store or folder that cannot be written to, found before anything is written."""


class StorageError(UserError):
    """The Optuna storage cannot be opened as configured."""


class TrackingError(UserError):
    """The MLflow tracking store has no store, run or experiment where one was asked for, or refuses us."""


class StudyMismatchError(UserError):
    """The stored study disagrees with the sweep file (direction, sealed test set)."""


class StudySealedError(UserError):
    """More trials were asked of a study whose test set was already scored."""


class NoSuchStudyError(UserError):
    """A command that reads a study (finalize, report, trials, ui, dashboard) on one not in the storage."""


class TrialsLiveError(UserError):
    """The test set was asked to be scored while trials of the study still train (they could change the choice)."""


class FinalizeError(UserError):
    """The test set cannot be scored now (no trial with a model, a model we did not write, a claim held)."""


class RegistryError(UserError):
    """tracking.registered_model cannot be used: a name MLflow refuses, another project's model, a refusal (403).

    Found before any trial where it can be; after scoring, the test result stays sealed and recorded."""


class ServeError(UserError):
    """The MLflow UI or optuna-dashboard cannot be served (port taken, server gone, package missing)."""


# --------------------------------------------------------------------------- exit 1: the sweep stopped


class TooManyFailures(CommandError):
    """Trials keep failing: stop instead of burning the machine."""

    exit_code = EXIT_FAILED


# --------------------------------------------------------------------------- never reach the CLI as such


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: this trial failed, the study goes on."""


class WithheldTestSplitError(RuntimeError):
    """Something asked for the test images while trials run: a bug, shown with its traceback."""


class OracleStopped(RuntimeError):
    """keras-tuner's oracle gave no values for a trial (its search space is exhausted); the trial fails with this."""


class MissingParamError(KeyError):
    """A run's params lack a key that retraining needs: not a (finished) mnist-sweep trial run."""
