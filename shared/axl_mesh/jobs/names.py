"""Names the gateway and the workers agree on: queues, job kinds, the job functions (by import path) and record
ids. Imports no torch."""

from __future__ import annotations

import re
import secrets
import time
from enum import StrEnum

from axl_mesh.jobs_protocol import FILE_ID_PATTERN, FT_JOB_ID_PATTERN, QUANT_JOB_ID_PATTERN


class QueueName(StrEnum):
    TRAIN = "axl-train"
    QUANTIZE = "axl-quantize"


class JobKind(StrEnum):
    FINE_TUNE = "ft"
    QUANTIZE = "q"


# Functions the workers run, named by import path so the gateway never imports them (nor torch).
TRAIN_FUNCTION = "services.trainer_worker.jobs.run_training_job"
# A rank > 0 of a job trained by a group of trainer workers (``hyperparameters.workers``; see ``jobs.groups``).
TRAIN_MEMBER_FUNCTION = "services.trainer_worker.group.run_group_member"
QUANTIZE_FUNCTION = "services.quantizer.jobs.run_quantization_job"


def new_id(kind: str) -> str:
    """``file-…``, ``ftjob-…``, ``qjob-…``, ``ftevent-…``, ``ftckpt-…``: 24 hex characters of randomness."""
    return f"{kind}-{secrets.token_hex(12)}"


def now() -> float:
    return time.time()


_ID_PATTERNS = {"file": FILE_ID_PATTERN, "ft": FT_JOB_ID_PATTERN, "q": QUANT_JOB_ID_PATTERN}


def valid_id(kind: str, value: str) -> bool:
    return re.fullmatch(_ID_PATTERNS[kind], value) is not None
