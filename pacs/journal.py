"""The node's durable state: a small sqlite journal and the spool and outbox folders beside it.

One row per series seen (``series``: its study, attributes, when its last instance arrived, and its state) and
one per registration (``work``, keyed by the moving Series Instance UID: the fixed series, state, attempts,
reason). States of a registration: ``pending`` (to register), ``registered`` (results in the outbox, to store),
``stored`` (done), ``failed`` (given up: the reason says why). A node restarted at any point goes on from the
journal: pending work is registered, registered work is stored, and stored work is never redone. The results'
UIDs derive from the source UIDs (:mod:`lumireg.client.dicom_out`), so even work redone after a crash between
storing and journalling stores the same instances again, which a PACS keeps once.

Files: ``<root>/journal.sqlite``, ``<root>/spool/<series UID>/<SOP instance UID>.dcm`` (received and fetched
instances) and ``<root>/outbox/<moving series UID>/`` (results waiting to be stored). Nothing patient-identifying
goes into a log line; the journal holds UIDs, dates, Patient ID (to find a patient's earlier series) and the
attributes the rules match on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
create table if not exists series (
    uid text primary key, study text not null, attributes text not null, updated real not null,
    state text not null default 'receiving');
create table if not exists work (
    moving text primary key, fixed text, rule text, state text not null, attempts integer not null default 0,
    reason text, started real not null, next_try real not null default 0);
"""


class Journal:
    """Thread-safe access to the journal under ``root`` (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.spool, self.outbox = self.root / "spool", self.root / "outbox"
        for folder in (self.spool, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.root / "journal.sqlite"), check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, *args) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- series ---
    def seen(self, uid: str, study: str, attributes: dict, touch: bool = True) -> bool:
        """Record an instance (``touch``: it restarts the series' settling time) or a poll's sight (the settling
        time restarts only when ``attributes``, e.g. the instance count, changed) of series ``uid``; True when the
        series is new."""
        text = json.dumps(attributes, sort_keys=True)
        with self._lock:
            row = self._db.execute("select state, attributes from series where uid = ?", (uid,)).fetchone()
            if row is None:
                self._db.execute(
                    "insert into series (uid, study, attributes, updated) values (?, ?, ?, ?)",
                    (uid, study, text, time.time()),
                )
                return True
            if row[0] == "receiving" and (touch or row[1] != text):
                self._db.execute(
                    "update series set updated = ?, attributes = ? where uid = ?", (time.time(), text, uid)
                )
            return False

    def study_known(self, study: str) -> bool:
        return bool(self._query("select 1 from series where study = ?", study))

    def series_in_study(self, study: str) -> list[tuple[str, dict]]:
        """(uid, attributes) of every series of ``study`` seen."""
        rows = self._query("select uid, attributes from series where study = ?", study)
        return [(uid, json.loads(attributes)) for uid, attributes in rows]

    def attributes(self, uid: str) -> dict | None:
        rows = self._query("select attributes from series where uid = ?", uid)
        return json.loads(rows[0][0]) if rows else None

    def known(self, uid: str) -> bool:
        return bool(self._query("select 1 from series where uid = ?", uid))

    def settled(self, seconds: float) -> list[tuple[str, str, dict]]:
        """Series still receiving whose last instance came more than ``seconds`` ago: (uid, study, attributes)."""
        rows = self._query(
            "select uid, study, attributes from series where state = 'receiving' and updated < ?",
            time.time() - seconds,
        )
        return [(uid, study, json.loads(attributes)) for uid, study, attributes in rows]

    def set_series_state(self, uid: str, state: str) -> None:
        self._query("update series set state = ? where uid = ?", state, uid)

    def series_folder(self, uid: str) -> Path:
        return self.spool / uid

    # --- registrations ---
    def add_work(self, moving: str, rule: str) -> bool:
        """A registration of series ``moving`` to do; False when it is already journalled (in any state)."""
        with self._lock:
            try:
                self._db.execute(
                    "insert into work (moving, rule, state, started) values (?, ?, 'pending', ?)",
                    (moving, rule, time.time()),
                )
            except sqlite3.IntegrityError:
                return False
            return True

    def work(self, state: str) -> list[dict]:
        """Registrations in ``state`` that are due (their next try has come), oldest first."""
        rows = self._query(
            "select moving, fixed, rule, attempts, reason, started from work where state = ? and next_try <= ? "
            "order by started",
            state,
            time.time(),
        )
        keys = ("moving", "fixed", "rule", "attempts", "reason", "started")
        return [dict(zip(keys, row)) for row in rows]

    def update_work(self, moving: str, **changes) -> None:
        """Set columns (state, fixed, attempts, reason, next_try) of one registration."""
        names = sorted(changes)
        self._query(
            f"update work set {', '.join(f'{n} = ?' for n in names)} where moving = ?",
            *[changes[n] for n in names],
            moving,
        )

    def due_now(self) -> None:
        """Every unfinished registration is due at once (a node starting retries what it left)."""
        self._query("update work set next_try = 0, attempts = 0 where state in ('pending', 'registered')")

    def state_of(self, moving: str) -> str | None:
        rows = self._query("select state from work where moving = ?", moving)
        return rows[0][0] if rows else None
