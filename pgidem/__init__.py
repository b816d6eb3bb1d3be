"""pgidem: a PostgreSQL-native task queue whose retries are safe.

Handlers' database writes commit in the same transaction as a fenced completion record, so
they happen exactly once; idempotency keys dedupe enqueues and replay outcomes; fencing tokens
reject stale workers. See README.md.
"""

from pgidem.app import App, RetryPolicy, Task, TaskHandle, TaskInfo
from pgidem.context import Context
from pgidem.errors import (
    ConfigurationError,
    DatabaseError,
    IdempotencyKeyMismatch,
    InvalidInput,
    InvalidState,
    LeaseLost,
    NonRetryable,
    PgidemError,
    ResultTimeout,
    Retry,
    SchemaError,
    SchemaOutdated,
    SchemaTooNew,
    StepFailed,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TransactionEnded,
)
from pgidem.worker import Worker, WorkerConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "App",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "IdempotencyKeyMismatch",
    "InvalidInput",
    "InvalidState",
    "LeaseLost",
    "NonRetryable",
    "PgidemError",
    "ResultTimeout",
    "Retry",
    "RetryPolicy",
    "SchemaError",
    "SchemaOutdated",
    "SchemaTooNew",
    "StepFailed",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskNotFound",
    "TransactionEnded",
    "Worker",
    "WorkerConfig",
    "__version__",
]
