"""The exception types library code raises; the CLI turns them into one-line messages and exit code 2."""


class RecnextError(Exception):
    """Base class: a problem the user can act on. The message says what to do next."""


class UnknownModelError(RecnextError):
    """A model name that is not in the zoo."""


class DownloadError(RecnextError):
    """A file could not be fetched (network, HTTP status, offline mode)."""


class IntegrityError(RecnextError):
    """Bytes on disk or on the wire disagree with the recorded digest, size or structure."""


class EnvironmentProblem(RecnextError):
    """The Python/torch/mmcv/mmdet stack is missing or broken."""


class DatasetLayoutError(RecnextError):
    """A dataset directory does not have the expected COCO layout."""


class UsageError(RecnextError):
    """Arguments that are individually valid but do not make sense together or on this machine."""
