"""A user's data on request: all of it as a ZIP (export), or none of it any more (forget).

The database side is db.privacy; this is where the files are: result artifacts (by key in the
artifact store, or, for rows older than the store, by absolute path) and kept selfie crops.
Blocking calls; channels run them in a thread.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

from chitrakar.artifacts import ArtifactMissing, ArtifactStore
from chitrakar.media import MediaStore
from chitrakar.quota import quota_day
from db import privacy
from db.privacy import UserRecord
from db.session import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgetReport:
    """What `forget` deleted. All zero when nothing was stored about the user."""

    jobs: int = 0
    ledger_entries: int = 0
    # Result files that existed and were deleted (ones already gone are not counted).
    artifacts: int = 0
    # Selfie crops that existed and were deleted.
    inputs: int = 0


def _is_local_path(value: str) -> bool:
    # Rows from before the artifact store hold absolute paths of local files, not keys.
    return value.startswith("/")


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8")


class PrivacyService:
    def __init__(
        self, store: Store, artifacts: ArtifactStore, media: MediaStore, zone: ZoneInfo
    ) -> None:
        """`zone`: the deployment's, whose midnight starts a quota day."""
        self._store = store
        self._artifacts = artifacts
        self._media = media
        self._zone = zone

    def export_zip(self, channel: str, external_id: str, readme: str) -> bytes | None:
        """Everything stored about a user as a ZIP, or None when nothing is:

        - profile.json, jobs.json (every job with its events; results listed whether or not
          their files still exist, and a job's marked "results_withheld" when the content
          check blocked it), ledger.json (credit movements), reports.json (the reports they
          filed), moderation_log.json (the audit log's records that concern them);
        - results/<key> for each result file that still exists (a legacy local path goes
          under results/<its folder>/<its file name>), except the images the content check
          withheld: those stay for the admins' review, and the user was told they are held
          back;
        - inputs/<file name> for each kept selfie crop that still exists;
        - README.txt: `readme`, the description of these files in the user's language.
        """
        with self._store.unit_of_work() as uow:
            record = privacy.collect(uow.session, channel, external_id)
        if record is None:
            return None
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("README.txt", readme.encode("utf-8"))
            archive.writestr("profile.json", _json(record.profile))
            archive.writestr("jobs.json", _json(record.jobs))
            archive.writestr("ledger.json", _json(record.ledger))
            archive.writestr("reports.json", _json(record.reports))
            archive.writestr("moderation_log.json", _json(record.moderation))
            names = {
                "README.txt",
                "profile.json",
                "jobs.json",
                "ledger.json",
                "reports.json",
                "moderation_log.json",
            }
            if record.messages:
                archive.writestr("messages.json", _json(record.messages))
                names.add("messages.json")
            for key, data in self._results(record):
                name = f"results/{key}"
                if name not in names:
                    names.add(name)
                    # PNGs are compressed already.
                    archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)
            for path in record.input_paths:
                name = f"inputs/{Path(path).name}"
                selfie = self._read_local(path)
                if selfie is not None and name not in names:
                    names.add(name)
                    archive.writestr(name, selfie, compress_type=zipfile.ZIP_STORED)
        return buffer.getvalue()

    def _results(self, record: UserRecord) -> Iterator[tuple[str, bytes]]:
        """(name under results/, bytes) for each result file that still exists and is not
        withheld, one at a time."""
        for value in record.exported_keys:
            data: bytes | None
            if _is_local_path(value):
                data = self._read_local(value)
                # Legacy files lay at <results folder>/<job id>/<file>, as keys do.
                name = "/".join(PurePosixPath(value).parts[-2:])
            else:
                try:
                    data = self._artifacts.get(value)
                except ArtifactMissing:
                    data = None
                name = value
            if data is not None:
                yield name, data

    @staticmethod
    def _read_local(path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def forget(self, channel: str, external_id: str) -> ForgetReport:
        """Delete everything stored about a user: their rows in one unit of work, committed,
        and then their files (results and kept selfie crops).

        The files go after the commit, so that no row ever names a deleted file as present.
        If deleting a file fails, the rows are gone already: the failure is logged and the
        rest are still deleted; the retention sweep removes such orphans later. Rows of other
        users are left alone (a job of theirs made from this user's result keeps no parent).
        A limit an admin set on them, and what they used today, stay (`privacy.delete`).
        """
        today = quota_day(datetime.now(UTC), self._zone)
        with self._store.unit_of_work() as uow:
            record = privacy.delete(uow.session, channel, external_id, today)
            uow.commit()
        if record is None:
            return ForgetReport()
        artifacts = sum(self._delete_result(value) for value in record.artifact_keys)
        inputs = sum(self._delete_input(path) for path in record.input_paths)
        log.info(
            "forgot %s user %s: %d job(s), %d ledger entries, %d result file(s), %d selfie(s)",
            channel,
            external_id,
            len(record.jobs),
            len(record.ledger),
            artifacts,
            inputs,
        )
        return ForgetReport(
            jobs=len(record.jobs),
            ledger_entries=len(record.ledger),
            artifacts=artifacts,
            inputs=inputs,
        )

    def _delete_result(self, value: str) -> bool:
        """Delete one result file; whether it existed (and is gone now)."""
        try:
            if _is_local_path(value):
                path = Path(value)
                existed = path.is_file()
                path.unlink(missing_ok=True)
                return existed
            existed = self._artifacts.exists(value)
            self._artifacts.delete(value)
            return existed
        except Exception:
            log.exception(
                "could not delete result %s of a forgotten user; left for the sweep", value
            )
            return False

    def _delete_input(self, path: str) -> bool:
        """Delete one selfie crop; whether it existed (and is gone now)."""
        try:
            existed = Path(path).is_file()
            self._media.forget_input(path)
            return existed
        except Exception:
            log.exception(
                "could not delete selfie %s of a forgotten user; left for the sweep", path
            )
            return False
