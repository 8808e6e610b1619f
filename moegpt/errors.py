"""The one exception type for bad user input; the CLI renders it as `moegpt: error: <message>`."""


class MoegptError(Exception):
    """A problem the user can fix (bad flag, missing file, corrupt checkpoint). One line, no traceback."""

    exit_code = 2


class TrainingDiverged(MoegptError):
    """The loss became non-finite; training stopped before the optimizer step (exit 3)."""

    exit_code = 3


class WriteFailed(MoegptError):
    """A file could not be written (disk full, I/O error, no permission); earlier output is intact (exit 1)."""

    exit_code = 1


class NonFiniteOutput(MoegptError):
    """A model produced NaN or infinite values (finite weights can still overflow); exit 1."""

    exit_code = 1


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. The CLI exits 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.checkpoint = signum, checkpoint
