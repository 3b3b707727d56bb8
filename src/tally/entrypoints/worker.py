"""The worker: jobs that run on a schedule: sending the outbox's email and the expiry sweep.
`tally serve` runs it in a thread by default (TALLY_WORKER=inline), `tally worker` runs it as
its own process."""

from __future__ import annotations

import threading
import time
from typing import Final

import structlog

from tally.bootstrap import Tally
from tally.domain.errors import TallyError
from tally.service import commerce, ledger

log = structlog.get_logger("tally.worker")

#: How often the worker wakes to send due email: a buyer waits at most this for the code.
MAIL_EVERY_SECONDS: Final = 2.0
#: How often the sweep writes down expired lots and lapsed holds. Balances never wait for it
#: (rule 2); it only records the entries, so it need not run on every wake.
SWEEP_EVERY_SECONDS: Final = 60.0


class Worker:
    def __init__(
        self,
        tally: Tally,
        *,
        every: float = MAIL_EVERY_SECONDS,
        sweep_every: float = SWEEP_EVERY_SECONDS,
    ) -> None:
        assert 0 < every <= sweep_every
        self.tally = tally
        self.every = every
        self.sweep_every = sweep_every
        self._next_sweep = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ledger.SweepResult | None:
        """Send due email; sweep when its time has come (answers the sweep's result, if any)."""
        tally = self.tally
        sent = commerce.deliver_mail(tally.uow(), tally.mailer, tally.templates, tally.links)
        if sent != commerce.Delivery():
            log.info("mail", sent=sent.sent, retried=sent.retried, failed=sent.failed)
        if time.monotonic() < self._next_sweep:
            return None
        self._next_sweep = time.monotonic() + self.sweep_every
        result = ledger.sweep(tally.uow())
        if result.accounts:
            log.info(
                "sweep",
                accounts=result.accounts,
                holds_expired=result.holds_expired,
                lots_expired=result.lots_expired,
            )
        return result

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except TallyError as error:  # a database outage: try again next round
                log.warning("worker_failed", code=error.code, detail=error.detail)
            except Exception:  # a bug must not stop every later round
                log.exception("worker_crashed")
            self._stop.wait(self.every)

    def start(self) -> None:
        assert self._thread is None, "a worker starts once"
        self._thread = threading.Thread(target=self.run_forever, name="tally-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
