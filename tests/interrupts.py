"""A real Ctrl-C landing inside a query of MLflow's SQLite store, as the Ctrl-C tests need it."""
from __future__ import annotations

import os
import signal
import time


class CtrlCInRunsQuery:
    """Sends a real SIGINT right after the store's next SELECT of the runs table once armed (by arm(),
    or by the store's INSERT of a run with arm_on_insert): Python raises it there, at the next
    instruction. Python's handler is installed meanwhile: a shell's background job (`make test &`)
    starts with SIGINT ignored. `sent_at`: when it was sent (None: never)."""

    def __init__(self, arm_on_insert: bool = False):
        self.arm_on_insert = arm_on_insert
        self.armed = False
        self.sent_at: float | None = None

    def arm(self) -> None:
        self.armed = True

    def _after_execute(self, conn, cursor, statement, parameters, context, executemany):
        text = " ".join(statement.split()).upper()
        if self.arm_on_insert and self.sent_at is None and text.startswith("INSERT INTO RUNS"):
            self.armed = True
        elif self.armed and text.startswith("SELECT") and " FROM RUNS" in text:
            self.armed = False
            self.sent_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self):
        import sqlalchemy
        from sqlalchemy import event

        event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", self._after_execute)
        self._previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc):
        import sqlalchemy
        from sqlalchemy import event

        event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", self._after_execute)
        signal.signal(signal.SIGINT, self._previous)
