"""The worker: jobs that run on a schedule: sending the outbox's email and the expiry sweep.
`tally serve` runs it in a thread by default (TALLY_WORKER=inline), `tally worker` runs it as
its own process."""

from __future__ import annotations

import threading
import time
from typing import Final

import structlog

from tally.adapters.sales import sources
from tally.bootstrap import Tally
from tally.domain.errors import TallyError
from tally.service import commerce, ledger, reconcile

log = structlog.get_logger("tally.worker")

#: How often the worker wakes to send due email: a buyer waits at most this for the code.
MAIL_EVERY_SECONDS: Final = 2.0
#: How often the sweep writes down expired lots and lapsed holds. Balances never wait for it
#: (rule 2); it only records the entries, so it need not run on every wake.
SWEEP_EVERY_SECONDS: Final = 60.0
#: Reconciliation runs every TALLY_RECONCILE_INTERVAL_SECONDS (config.py, default hourly); its
#: first run comes this long after the start.
RECONCILE_FIRST_DELAY_SECONDS: Final = 60


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
        self._reconciler: threading.Thread | None = None

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
        if self.tally.settings.reconcile_interval_seconds > 0 and self._reconciler is None:
            self._reconciler = threading.Thread(
                target=self.reconcile_forever, name="tally-reconcile", daemon=True
            )
            self._reconciler.start()
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
        if self._reconciler is not None:
            self._reconciler.join(timeout)

    # --- reconciliation (issue 5, engineer B) ------------------------------------------------

    def reconcile_once(self) -> list[reconcile.Reconciliation]:
        """Fulfil sales the processors have and Tally missed (see service/reconcile.py)."""
        tally = self.tally
        reports = reconcile.reconcile(
            sources(tally.settings, tally.catalog),
            tally.uow(),
            pepper=tally.pepper,
            links=tally.links,
        )
        for report in reports:
            if report.error:
                log.warning("reconcile_failed", processor=report.processor, error=report.error)
            elif report.fulfilled or report.unmatched:
                log.info(
                    "reconcile",
                    processor=report.processor,
                    fulfilled=report.fulfilled,
                    unmatched=report.unmatched,
                )
        return reports

    def reconcile_forever(self) -> None:
        """Its own thread: a slow processor API never delays the mail. The first run waits
        RECONCILE_FIRST_DELAY_SECONDS (at most one interval) so a start-up stays quick."""
        every = self.tally.settings.reconcile_interval_seconds
        wait = min(RECONCILE_FIRST_DELAY_SECONDS, every)
        while not self._stop.wait(wait):
            try:
                self.reconcile_once()
            except TallyError as error:
                log.warning("reconcile_failed", code=error.code, detail=error.detail)
            except Exception:
                log.exception("reconcile_crashed")
            wait = every
