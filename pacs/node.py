"""The work of ``lumireg pacs``: settle incoming series, pick pairs by the rules, register, store the results.

One loop (:meth:`Node.tick`, called every half second) moves each registration through the journal's states
(:mod:`lumireg.pacs.journal`); the DIMSE SCP's threads only spool instances. A registration that fails is
journalled as failed with its reason and counted; the loop goes on with the next. Results that cannot be
stored are retried ``store_attempts`` times with backoff, then reported (an error line and
``lumireg_pacs_store_failures_total``) and kept in the outbox, retried every ``resend_seconds`` until stored.
Log lines name series and studies by UID only.
"""

from __future__ import annotations

import logging
import shutil
import time

from lumireg.pacs.attributes import attributes_of
from lumireg.pacs.dimse import DeliveryError
from lumireg.pacs.journal import Journal
from lumireg.pacs.rules import OWN_PREFIX, Rule

log = logging.getLogger("lumireg.pacs")
LATENCY_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class NoFixedSeries(RuntimeError):
    """No series qualifies as the fixed image of a new series (a study with only one series, no earlier one)."""


class Metrics:
    """The node's Prometheus metrics, in a registry of its own (``start_http_server(port, registry=...)``)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.received = Counter(
            "lumireg_pacs_studies_received", "studies seen for the first time", registry=self.registry
        )
        self.registered = Counter(
            "lumireg_pacs_studies_registered", "registrations whose results were stored", registry=self.registry
        )
        self.failed = Counter(
            "lumireg_pacs_studies_failed", "registrations given up, by reason", ["reason"], registry=self.registry
        )
        self.refused = Counter(
            "lumireg_pacs_instances_refused", "instances refused by the C-STORE SCP", registry=self.registry
        )
        self.store_failures = Counter(
            "lumireg_pacs_store_failures",
            "results not stored after every attempt (kept, retried)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "lumireg_pacs_latency_seconds",
            "from a series settling to its results stored",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class Node:
    """A PACS node's state and work.

    Args:
        journal: the on-disk journal (:class:`lumireg.pacs.journal.Journal`).
        pacs: a :class:`lumireg.pacs.dimse.DimsePacs` or :class:`lumireg.pacs.dicomweb.DicomWebPacs`: queried for
            fixed series and labels, fetched from, and where results are stored.
        rules: the pairing rules (:func:`lumireg.pacs.rules.load_rules`).
        register: ``register(fixed_folder, moving_folder, labels_or_None, parameters) -> RegistrationResult``.
        settle_seconds: a series is complete when no instance came for this long.
        store_attempts, retry_seconds, resend_seconds: storing results: attempts with backoff (``retry_seconds``
            doubling), then every ``resend_seconds``.
        uid_root: root of the results' UIDs (:mod:`lumireg.client.dicom_out`).
    """

    def __init__(
        self,
        journal: Journal,
        pacs,
        rules: list[Rule],
        register,
        settle_seconds: float = 5.0,
        store_attempts: int = 3,
        retry_seconds: float = 2.0,
        resend_seconds: float = 60.0,
        uid_root: str | None = None,
        metrics: Metrics | None = None,
    ):
        self.journal, self.pacs, self.rules, self.register = journal, pacs, rules, register
        self.settle_seconds, self.store_attempts = settle_seconds, store_attempts
        self.retry_seconds, self.resend_seconds, self.uid_root = retry_seconds, resend_seconds, uid_root
        self.metrics = metrics or Metrics()
        self.journal.due_now()  # what a node before this one left unfinished is done first

    # --- arrivals ---
    def received(self, ds, path=None) -> None:
        """An instance spooled by the SCP (or a series found by a poll, as its attributes' dataset)."""
        self._seen(attributes_of(ds), touch=True)

    def _seen(self, attributes: dict, touch: bool) -> None:
        series, study = attributes["SeriesInstanceUID"], attributes["StudyInstanceUID"]
        new_study = not self.journal.study_known(study)
        if self.journal.seen(series, study, attributes, touch=touch):
            log.info("series %s of study %s: receiving", series, study)
        if new_study:
            self.metrics.received.inc()

    def refused(self, sop_instance: str, reason: str) -> None:
        """An instance the SCP refused: logged by its UID and counted."""
        log.warning("instance %s refused: %s", sop_instance, reason)
        self.metrics.refused.inc()

    def poll(self) -> None:
        """DICOMweb: every series the PACS holds that is new, or still changing, is recorded (QIDO-RS)."""
        for attributes in self.pacs.find_series():
            self._seen(attributes, touch=False)

    # --- the loop ---
    def tick(self) -> None:
        """One round: settled series become work, pending work is registered, registered work is stored."""
        for uid, _study, attributes in self.journal.settled(self.settle_seconds):
            rule = next((r for r in self.rules if r.matches(attributes)), None)
            self.journal.set_series_state(uid, "complete" if rule else "ignored")
            if rule and self.journal.add_work(uid, rule.name):
                log.info("series %s: to register (rule %r)", uid, rule.name)
        for work in self.journal.work("pending"):
            self._register(work)
        for work in self.journal.work("registered"):
            self._store(work)

    def _fail(self, moving: str, reason: str, message: str) -> None:
        self.journal.update_work(moving, state="failed", reason=message)
        self.metrics.failed.labels(reason).inc()
        log.error("series %s: failed (%s): %s", moving, reason, message)

    def _register(self, work: dict) -> None:
        from lumireg.client.registration import InputError, LumiregError, ServerUnavailable

        moving = work["moving"]
        try:
            fixed, labels, parameters = self._inputs(moving, work["rule"])
            moving_folder = self._local(moving)
            start = time.perf_counter()
            result = self.register(fixed, moving_folder, labels, parameters)
            result.save(self.journal.outbox / moving, "dicom", self.uid_root)
        except ServerUnavailable as exc:  # the service restarts: try again later, nothing is given up
            self.journal.update_work(moving, next_try=time.time() + self.resend_seconds)
            log.warning("series %s: no lumireg server, retried in %g s: %s", moving, self.resend_seconds, exc)
            return
        except NoFixedSeries as exc:
            return self._fail(moving, "no fixed series", str(exc))
        except DeliveryError as exc:
            return self._fail(moving, "pacs", str(exc))
        except (InputError, ValueError) as exc:
            return self._fail(moving, "input", str(exc))
        except LumiregError as exc:
            return self._fail(moving, "registration", str(exc))
        except Exception as exc:  # one study's unexpected failure must not stop the node
            return self._fail(moving, "internal", f"{type(exc).__name__}: {exc}")
        warnings = [w["code"] for w in (result.qc or {}).get("warnings", [])]
        self.journal.update_work(moving, state="registered", fixed=fixed.name, attempts=0, next_try=0)
        log.info(
            "series %s: registered onto series %s in %.1f s%s",
            moving,
            fixed.name,
            time.perf_counter() - start,
            f"; QC warnings {', '.join(warnings)}" if warnings else "",
        )

    def _inputs(self, moving: str, rule_name: str):
        """The fixed series' folder, the moving labels' SEG folder (or None) and the rule's parameters."""
        attributes = self.journal.attributes(moving)
        rule = next((r for r in self.rules if r.name == rule_name), None)
        if rule is None:
            raise ValueError(f"rule {rule_name!r} is no longer in the rule file")
        if rule.fixed_series:
            found = self.pacs.find_series(SeriesInstanceUID=rule.fixed_series)
            if not found:
                raise NoFixedSeries(f"the reference series {rule.fixed_series} is not in the PACS")
            fixed = found[0]
        else:
            candidates = rule.fixed_candidates(attributes, self.pacs.find_series(PatientID=attributes["PatientID"]))
            if not candidates:
                raise NoFixedSeries(f"no earlier series of the patient matches rule {rule.name!r}")
            fixed = candidates[0]
        return (
            self._local(fixed["SeriesInstanceUID"], fixed["StudyInstanceUID"]),
            self._labels(moving, attributes),
            rule.parameters,
        )

    def _local(self, series: str, study: str | None = None):
        """The spool folder of a series, fetched from the PACS first when it is not there."""
        folder = self.journal.series_folder(series)
        if not folder.is_dir() or not any(folder.glob("*.dcm")):
            study = study or self.journal.attributes(series)["StudyInstanceUID"]
            folder = self.pacs.fetch(study, series, self.journal.spool)
        return folder

    def _labels(self, moving: str, attributes: dict):
        """The SEG drawn on the moving series, from the node's own spool or the PACS's study, or None."""
        from pydicom import dcmread

        study = attributes["StudyInstanceUID"]
        segs = [uid for uid, a in self.journal.series_in_study(study) if a.get("Modality") == "SEG"]
        segs += [
            s["SeriesInstanceUID"]
            for s in self.pacs.find_series(StudyInstanceUID=study, Modality="SEG")
            if s["SeriesInstanceUID"] not in segs and not s["SeriesDescription"].lower().startswith(OWN_PREFIX)
        ]
        for uid in segs:
            folder = self._local(uid, study)
            for path in sorted(folder.glob("*.dcm")):
                ds = dcmread(str(path), stop_before_pixels=True)
                references = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])]
                if moving in references:
                    return path
        return None

    def _store(self, work: dict) -> None:
        moving = work["moving"]
        outbox = self.journal.outbox / moving
        paths = sorted(outbox.rglob("*.dcm"))
        try:
            self.pacs.store(paths)
        except DeliveryError as exc:
            attempts = work["attempts"] + 1
            if attempts >= self.store_attempts:
                self.metrics.store_failures.inc()
                log.error(
                    "series %s: results not stored after %d attempts, kept and retried every %g s: %s",
                    moving,
                    attempts,
                    self.resend_seconds,
                    exc,
                )
                self.journal.update_work(moving, attempts=0, next_try=time.time() + self.resend_seconds)
            else:
                delay = self.retry_seconds * 2 ** (attempts - 1)
                log.warning("series %s: storing results failed (attempt %d), retried in %g s", moving, attempts, delay)
                self.journal.update_work(moving, attempts=attempts, next_try=time.time() + delay)
            return
        self.journal.update_work(moving, state="stored")
        self.metrics.registered.inc()
        self.metrics.latency.observe(time.time() - work["started"])
        log.info("series %s: %d result instances stored", moving, len(paths))
        shutil.rmtree(outbox, ignore_errors=True)
