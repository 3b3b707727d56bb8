"""The worker: jobs that run on a schedule: sending the outbox's email, the expiry sweep and
reconciliation with the processors. `tally serve` runs it in threads by default
(TALLY_WORKER=inline), `tally worker` runs it as its own process.

Each job runs in its own thread and each run is isolated: a job that fails (a bug, the
database down) is logged and counted, and runs again at its next time, while the others go on;
a slow or hanging mail server delays only the mail. Jobs are scheduled by Tally's clock (the
sweep every SWEEP_EVERY_SECONDS of it), checked each time the worker wakes (every
MAIL_EVERY_SECONDS of real time); mail runs on every wake, since each message carries its own
due time. Every completed run counts in `cycles()` and, in `tally serve`, in /metrics
(`tally_worker_cycles_total`), so a test can wait for a run instead of sleeping."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

import structlog

from tally.adapters.sales import sources
from tally.bootstrap import Tally
from tally.domain.errors import TallyError
from tally.service import commerce, ledger, limits, reconcile

if TYPE_CHECKING:
    from tally.entrypoints.http.metrics import Metrics

log = structlog.get_logger("tally.worker")

#: How often the worker wakes to send due email: a buyer waits at most this for the code.
MAIL_EVERY_SECONDS: Final = 2.0
#: How often the sweep writes down expired lots and lapsed holds. Balances never wait for it
#: (rule 2); it only records the entries, so it need not run on every wake.
SWEEP_EVERY_SECONDS: Final = 60.0
#: Reconciliation runs every TALLY_RECONCILE_INTERVAL_SECONDS (config.py, default hourly); its
#: first run comes this long after the start.
RECONCILE_FIRST_DELAY_SECONDS: Final = 60
#: The jobs, in the order `run_once` runs them.
JOBS: Final = ("mail", "sweep", "reconcile")


@dataclass
class _Schedule:
    every: float  # seconds of Tally's clock between runs; 0: on every wake
    next_at: datetime | None = None  # None: at once
    last_at: datetime | None = None

    def due(self, now: datetime) -> bool:
        if self.every == 0 or self.next_at is None or now >= self.next_at:
            return True
        # The clock went back (a corrected system clock): run rather than wait it out.
        return self.last_at is not None and now < self.last_at

    def ran(self, now: datetime) -> None:
        self.last_at = now
        self.next_at = now + timedelta(seconds=self.every)


class Worker:
    def __init__(
        self,
        tally: Tally,
        *,
        every: float = MAIL_EVERY_SECONDS,
        sweep_every: float = SWEEP_EVERY_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        assert 0 < every <= sweep_every
        self.tally = tally
        self.every = every
        self.sweep_every = sweep_every
        self.metrics = metrics
        self._runs: dict[str, Callable[[], object]] = {
            "mail": self.send_mail,
            "sweep": self.sweep,
        }
        self._schedules = {"mail": _Schedule(0), "sweep": _Schedule(sweep_every)}
        interval = tally.settings.reconcile_interval_seconds
        if interval > 0:
            self._runs["reconcile"] = self.reconcile_once
            first = min(RECONCILE_FIRST_DELAY_SECONDS, interval)  # a start-up stays quick
            self._schedules["reconcile"] = _Schedule(
                interval, next_at=tally.clock() + timedelta(seconds=first)
            )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cycles = dict.fromkeys(self._runs, 0)
        self._cycle_done = threading.Condition()

    # --- the jobs -------------------------------------------------------------------------

    def send_mail(self) -> commerce.Delivery:
        """Send due email; a message that cannot be sent is recorded on itself (see
        service/commerce.py), never stopping the others."""
        tally = self.tally
        done = commerce.deliver_mail(tally.uow(), tally.mailer, tally.templates, tally.links)
        if done != commerce.Delivery():
            log.info("mail", sent=done.sent, retried=done.retried, failed=done.failed)
        if self.metrics is not None:
            self.metrics.mail_handled(sent=done.sent, retried=done.retried, failed=done.failed)
        return done

    def sweep(self) -> ledger.SweepResult:
        """Write down expired lots and lapsed holds, a batch of accounts per transaction, and
        delete the failed attempts no rate limit counts any more."""
        result = ledger.sweep(self.tally.uow())
        pruned = limits.prune(self.tally.uow())
        if pruned:
            log.info("failures_pruned", failures=pruned)
        if result.accounts:
            log.info(
                "sweep",
                accounts=result.accounts,
                holds_expired=result.holds_expired,
                lots_expired=result.lots_expired,
            )
        return result

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

    # --- running them -----------------------------------------------------------------------

    def run_job(self, job: str) -> bool:
        """Run one job now, isolated: whatever it raises is logged and counted, never passed
        on. Answers whether it completed."""
        ok = False
        if self.metrics is not None:
            self.metrics.worker_started(job)
        try:
            self._runs[job]()
            ok = True
        except TallyError as error:  # a database outage: try again next time
            log.warning("worker_job_failed", job=job, code=error.code, detail=error.detail)
        except Exception:  # a bug must not stop this job's later runs, or any other job
            log.exception("worker_job_crashed", job=job)
        if self.metrics is not None:
            self.metrics.worker_cycle(job, ok=ok)
        with self._cycle_done:
            self._cycles[job] += 1
            self._cycle_done.notify_all()
        return ok

    def run_once(self) -> dict[str, bool]:
        """Each job whose time has come, once, one after the other in this thread (each
        isolated): {job: completed}."""
        done = {}
        for job in JOBS:
            completed = self._run_if_due(job)
            if completed is not None:
                done[job] = completed
        return done

    def _run_if_due(self, job: str) -> bool | None:
        """Run `job` if its time has come (by Tally's clock): whether it completed, or None."""
        schedule = self._schedules.get(job)
        now = self.tally.clock()
        if schedule is None or not schedule.due(now):
            return None
        schedule.ran(now)
        return self.run_job(job)

    def _loop(self, job: str) -> None:
        while not self._stop.is_set():
            self._run_if_due(job)
            self._stop.wait(self.every)

    def start(self) -> None:
        assert not self._threads, "a worker starts once"
        for job in self._runs:
            thread = threading.Thread(
                target=self._loop, args=(job,), name=f"tally-{job}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop waking; wait up to `timeout` for the runs in progress (a message being sent
        when it passes is claimed, and tried again once its claim lapses)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def run_forever(self) -> None:
        """`tally worker`: run until SIGTERM or SIGINT, then stop after the runs in progress."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
        self.start()
        log.info("worker_started", jobs=list(self._runs))
        with contextlib.suppress(KeyboardInterrupt):
            while not self._stop.wait(1.0):
                pass
        self.stop()
        log.info("worker_stopped")

    # --- what tests and operators can see -------------------------------------------------------

    def cycles(self, job: str) -> int:
        """How many runs of `job` completed (succeeded or failed) in this worker."""
        with self._cycle_done:
            return self._cycles[job]

    def wait_for_cycles(self, job: str, count: int, timeout: float = 30.0) -> None:
        """Until `job` has completed `count` runs in all; AssertionError after `timeout`."""
        with self._cycle_done:
            reached = self._cycle_done.wait_for(lambda: self._cycles[job] >= count, timeout)
        assert reached, f"{job}: {self._cycles[job]} of {count} runs in {timeout} s"
