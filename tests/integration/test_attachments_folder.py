"""Attachments stored in AUTHSVC_ATTACHMENTS_DIR: content-addressed files written atomically
(never named after the upload), read back only through the authorized route and checked
against their SHA-256, no file left behind by a transaction that failed, a sweep for what a
crash leaves, and the database default unchanged."""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.adapters import attachment_files
from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.service_layer import case_actions, payer_work
from tests.conftest import auth
from tests.integration.test_cases_actions import PDF, PNG, upload
from tests.integration.test_cases_factory import insert_case, new_order

_PDF, _PNG = PDF, PNG

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_content():  # type: ignore[no-untyped-def]
    """Bytes no other test stored: a file is referred to by any attachment row of its
    organization with its SHA-256, and the session's database keeps every test's rows."""
    tail = f"\n%{uuid.uuid4().hex}\n".encode()
    with pytest.MonkeyPatch.context() as mp:  # not `monkeypatch`: tests undo that one
        mp.setitem(globals(), "PDF", _PDF + tail)
        mp.setitem(globals(), "PNG", _PNG + tail)
        yield


@pytest.fixture()
def coord(tokens) -> str:
    return tokens["org-a"]["coordinator"]


@pytest.fixture()
def folder(tmp_path, monkeypatch, services) -> Path:
    root = tmp_path / "attachments"
    monkeypatch.setattr(services, "settings", services.settings.replace(attachments_dir=root))
    return root


@pytest.fixture()
def case_id(client, coord, services) -> str:
    order = new_order(client, coord, f"ATT-{uuid.uuid4().hex[:8]}")
    return insert_case(services, order["id"], "needs_input")


def row_of(services, attachment_id) -> dict:
    a = t.attachments
    with services.engine.connect() as conn:
        return dict(conn.execute(sa.select(a).where(a.c.id == attachment_id)).mappings().one())


def case_of(services, case_id) -> dict:
    with services.engine.connect() as conn:
        row = repo.case_row(conn, case_id)
    assert row is not None
    return row


def stored_file(folder: Path, row: dict) -> Path:
    """The file an attachment row names (its storage_path is relative to the folder)."""
    return attachment_files.stored_path(folder, row["storage_path"])


class HeldUpload:
    """An upload whose transaction has written its file but not yet committed (PostgreSQL):
    `release()` lets it commit; `ids` then holds the new attachment's id."""

    def __init__(self, services, folder: Path, org_id: str, case_id: str, data: bytes):
        import threading

        from authsvc.service_layer.context import Actor

        self.ids: list[str] = []
        written, self._release = threading.Event(), threading.Event()

        def in_flight() -> None:
            with services.engine.begin() as conn:
                self.ids.append(case_actions.add_attachment(
                    Actor(org_id=org_id, role="coordinator"), conn, case_id,
                    filename="a.pdf", data=data, folder=folder))
                written.set()
                self._release.wait(10)

        self._thread = threading.Thread(target=in_flight)
        self._thread.start()
        assert written.wait(10)

    def waits_for_commit(self, cleanup) -> list:  # type: ignore[no-untyped-def]
        """Run `cleanup()` beside the open upload: it must wait for the commit; its result."""
        import threading

        result: list = []
        worker = threading.Thread(target=lambda: result.append(cleanup()))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()  # waits for the upload's commit
        self._release.set()
        self._thread.join(10)
        worker.join(10)
        return result


def files_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_goes_to_a_content_addressed_file_and_back_only_with_auth(
        client, coord, tokens, services, folder, case_id):
    resp = upload(client, coord, case_id, PDF, name="../../../etc/passwd")
    assert resp.status_code == 201, resp.get_json()
    att = resp.get_json()["attachments"][0]
    row = row_of(services, att["id"])
    sha = hashlib.sha256(PDF).hexdigest()
    assert row["data"] is None and row["sha256"] == sha
    # stored relative to the folder: hosts may mount it at other paths
    assert row["storage_path"] == f"org-a/{sha[:2]}/{sha}"
    stored = folder / row["storage_path"]
    assert files_in(folder) == [stored]  # no temporary file left
    assert stored.read_bytes() == PDF
    assert "passwd" not in row["storage_path"] and row["filename"] == "passwd"
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600
    got = client.get(att["links"]["content"], headers=auth(tokens["org-a"]["clinician"]))
    assert got.status_code == 200 and got.data == PDF and got.mimetype == "application/pdf"
    assert got.headers["X-Attachment-Sha256"] == sha
    assert client.get(att["links"]["content"]).status_code == 401
    assert client.get(att["links"]["content"],
                      headers=auth(tokens["org-b"]["admin"])).status_code == 404
    assert client.get(att["links"]["content"],
                      headers=auth(tokens["org-a"]["billing"])).status_code == 403
    # The worker builds the payer's Claim from the same file.
    case = case_of(services, case_id)
    with services.engine.connect() as conn:
        claim = payer_work.build_claim(conn, case, attachments_dir=folder)
    assert [a.data for a in claim.attachments] == [PDF]


def test_the_same_content_twice_is_one_file_two_documents(client, coord, services, folder,
                                                           case_id):
    first = upload(client, coord, case_id, PNG, name="a.png").get_json()
    second = upload(client, coord, case_id, PNG, name="b.png")
    assert second.status_code == 201
    ids = [a["id"] for a in second.get_json()["attachments"]]
    assert len(ids) == 2 and first["attachments"][0]["id"] in ids
    paths = {row_of(services, i)["storage_path"] for i in ids}
    assert len(paths) == 1 and files_in(folder) == [folder / paths.pop()]


def test_a_failed_transaction_leaves_no_file(client, coord, services, folder, case_id,
                                             monkeypatch):
    def db_fails(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))

    written: list[Path] = []
    real_put = attachment_files.put

    def put(*args, **kwargs):
        written.append(real_put(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(attachment_files, "put", put)
    monkeypatch.setattr(case_actions, "_audit", db_fails)  # after the file is written
    try:
        resp = upload(client, coord, case_id, PDF)
        assert resp.status_code >= 500
    except sa.exc.OperationalError:
        pass  # the test app may propagate it; either way nothing committed
    assert len(written) == 1 and not written[0].exists()  # written, then removed
    assert files_in(folder) == []
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.attachments).where(
            t.attachments.c.case_id == case_id)).scalar() == 0
    assert case_of(services, case_id)["state"] == "needs_input"


def test_a_failed_upload_keeps_a_file_another_document_refers_to(
        client, coord, services, folder, case_id, monkeypatch):
    ok = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    path = stored_file(folder, row_of(services, ok["id"]))
    other = insert_case(services, case_of(services, case_id)["order_id"],
                        "needs_input")

    def db_fails(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))

    real_audit = case_actions._audit
    monkeypatch.setattr(case_actions, "_audit", db_fails)
    try:
        assert upload(client, coord, other, PDF).status_code >= 500
    except sa.exc.OperationalError:
        pass
    assert path.read_bytes() == PDF  # the first document's file is still there
    monkeypatch.setattr(case_actions, "_audit", real_audit)  # (the folder setting stays)
    got = client.get(ok["links"]["content"], headers=auth(coord))
    assert got.status_code == 200 and got.data == PDF


def test_refusals_write_nothing(client, coord, services, folder, case_id):
    final = insert_case(services, case_of(services, case_id)["order_id"],
                        "approved", actions={1: "A1"})
    resp = upload(client, coord, final, PDF)
    assert resp.status_code == 409 and resp.get_json()["current_state"] == "approved"
    assert upload(client, coord, case_id, b"plain text, not a document").status_code == 415
    assert upload(client, coord, case_id, b"").status_code == 422
    assert files_in(folder) == []


def test_sweep_removes_what_a_crash_leaves_and_nothing_else(client, coord, services, folder,
                                                            case_id):
    kept = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    kept_path = stored_file(folder, row_of(services, kept["id"]))
    orphan = attachment_files.put(folder, "org-a", PNG)  # written, then the process died
    stray = attachment_files.put(folder, "org-gone", b"%PDF-1.4 stray")
    old = time.time() - 7200
    os.utime(stray, (old, old))
    tmp = orphan.parent / (attachment_files.TMP_PREFIX + "dead")
    tmp.write_bytes(b"half")
    os.utime(tmp, (old, old))
    young_tmp = orphan.parent / (attachment_files.TMP_PREFIX + "writing")
    young_tmp.write_bytes(b"in progress")
    removed = case_actions.sweep_attachment_files(services.engine, folder)
    assert removed == {"files": 2, "temporaries": 1}
    assert files_in(folder) == sorted([kept_path, young_tmp])
    got = client.get(kept["links"]["content"], headers=auth(coord))
    assert got.status_code == 200 and got.data == PDF


def test_an_altered_or_missing_file_is_never_served(client, coord, services, folder, case_id):
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    path = stored_file(folder, row_of(services, att["id"]))
    path.write_bytes(b"%PDF-1.7 something else")
    resp = client.get(att["links"]["content"], headers=auth(coord))
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert b"something else" not in resp.data
    path.unlink()
    resp = client.get(att["links"]["content"], headers=auth(coord))
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"


def test_without_a_folder_the_database_keeps_the_bytes(client, coord, services, case_id,
                                                       tmp_path):
    assert services.settings.attachments_dir is None
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    row = row_of(services, att["id"])
    assert bytes(row["data"]) == PDF and row["storage_path"] is None
    got = client.get(att["links"]["content"], headers=auth(coord))
    assert got.status_code == 200 and got.data == PDF


def test_paths_are_made_of_hashes_and_safe_organization_names(tmp_path):
    sha = hashlib.sha256(b"x").hexdigest()
    assert attachment_files.path_for(tmp_path, "org-a", sha) == tmp_path / "org-a" / sha[:2] / sha
    for org in ("../../etc", ".", "..", "a/b", "org a", "x" * 65, ""):
        name = attachment_files.org_dir(org)
        assert name.startswith("h-") and "/" not in name and "." not in name
    for bad in ("../" + sha[3:], sha.upper(), sha[:63], "", "a" * 64 + "/x"):
        with pytest.raises(ValueError):
            attachment_files.path_for(tmp_path, "org-a", bad)
    with pytest.raises(attachment_files.Unreadable):
        attachment_files.read(str(tmp_path / "other-name"), sha)


def test_cleanup_waits_for_an_upload_of_the_same_bytes_still_in_flight(services, folder,
                                                                        case_id):
    """The content lock: a failed upload's cleanup cannot delete the file a concurrent upload
    of the same bytes has written but not yet committed (PostgreSQL; SQLite serializes)."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("two concurrent write transactions need PostgreSQL")
    held = HeldUpload(services, folder, "org-a", case_id, PDF)
    path = attachment_files.path_for(folder, "org-a", hashlib.sha256(PDF).hexdigest())
    assert path.exists()
    result = held.waits_for_commit(lambda: case_actions.discard_unreferenced(
        services.engine, folder, "org-a", hashlib.sha256(PDF).hexdigest()))
    assert result == [False] and path.read_bytes() == PDF
    assert stored_file(folder, row_of(services, held.ids[0])) == path


def test_the_scheduler_sweeps_orphaned_files_when_a_folder_is_set(client, coord, services,
                                                                  folder, case_id):
    """The scheduler runs the sweep (at start, then hourly): a file a crash left behind does
    not stay on disk, a committed attachment does."""
    from workers.scheduler import Scheduler

    kept = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    kept_path = stored_file(folder, row_of(services, kept["id"]))
    orphan = attachment_files.put(folder, "org-a", PNG)
    assert Scheduler(services, broker=None).attachment_files_once() == {
        "files": 1, "temporaries": 0}
    assert not orphan.exists() and kept_path.exists()


# ------------------------------------------------------------------ review fixes


def download(client, coord, att):
    return client.get(att["links"]["content"], headers=auth(coord))


def test_a_sweep_through_another_name_of_the_folder_keeps_referenced_documents(
        client, coord, services, folder, case_id, tmp_path, monkeypatch):
    """The same folder reached through a symlink or a relative AUTHSVC_ATTACHMENTS_DIR: a
    document an attachment refers to is still there afterwards and downloads."""
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    orphan = attachment_files.put(folder, "org-a", PNG)
    alias = tmp_path / "alias"
    alias.symlink_to(folder)
    assert case_actions.sweep_attachment_files(services.engine, alias) == {
        "files": 1, "temporaries": 0}
    monkeypatch.chdir(tmp_path)
    assert case_actions.sweep_attachment_files(services.engine, Path("attachments")) == {
        "files": 0, "temporaries": 0}
    assert not orphan.exists()
    got = download(client, coord, att)
    assert got.status_code == 200 and got.data == PDF


def test_a_relative_storage_path_is_read_under_the_configured_folder(
        client, coord, services, folder, case_id):
    """Rows may hold the path relative to the folder (read under the configured root) or, as
    written earlier, absolute (read as is): both download."""
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    sha = hashlib.sha256(PDF).hexdigest()
    assert download(client, coord, att).data == PDF  # absolute, as stored
    with services.engine.begin() as conn:
        conn.execute(sa.update(t.attachments).where(t.attachments.c.id == att["id"])
                     .values(storage_path=f"org-a/{sha[:2]}/{sha}"))
    got = download(client, coord, att)
    assert got.status_code == 200 and got.data == PDF


def test_sweep_waits_for_the_first_upload_of_an_organization_with_no_document_yet(
        client, tokens, services, folder):
    """An old orphan of an organization that has no attachment row, and an upload of the
    same bytes in flight: the sweep waits for the upload's commit and the document stays
    downloadable."""
    coord_b = tokens["org-b"]["coordinator"]
    order = new_order(client, coord_b, f"ATB-{uuid.uuid4().hex[:8]}")
    case_b = insert_case(services, order["id"], "needs_input")
    orphan = attachment_files.put(folder, "org-b", PDF)  # left by a crash two hours ago
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    held = HeldUpload(services, folder, "org-b", case_b, PDF)
    assert orphan.stat().st_mtime > old + 3600  # reused, and its age refreshed
    result = held.waits_for_commit(
        lambda: case_actions.sweep_attachment_files(services.engine, folder))
    assert result == [{"files": 0, "temporaries": 0}]
    got = client.get(f"/v1/cases/{case_b}/attachments/{held.ids[0]}",
                     headers=auth(coord_b))
    assert got.status_code == 200 and got.data == PDF


def test_a_damaged_stored_copy_is_replaced_by_the_next_upload_of_the_same_bytes(
        client, coord, services, folder, case_id):
    first = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    path = stored_file(folder, row_of(services, first["id"]))
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1  # same size, one bit off
    path.write_bytes(bytes(damaged))
    assert download(client, coord, first).status_code == 503
    again = upload(client, coord, case_id, PDF)
    assert again.status_code == 201
    for att in again.get_json()["attachments"]:
        got = download(client, coord, att)
        assert got.status_code == 200 and got.data == PDF


def test_every_directory_created_for_documents_is_private(client, coord, services, tmp_path,
                                                         monkeypatch, case_id):
    root = tmp_path / "new" / "attachments"
    monkeypatch.setattr(services, "settings", services.settings.replace(attachments_dir=root))
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    path = stored_file(root, row_of(services, att["id"]))
    for d in (path.parent, path.parent.parent, root, root.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_a_full_disk_is_a_503_with_retry_after_and_nothing_written(
        client, coord, services, folder, case_id, monkeypatch):
    import errno

    real_put = attachment_files.put
    written: list[Path] = []

    def put_then_disk_full(*args, **kwargs):
        written.append(real_put(*args, **kwargs))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attachment_files, "put", put_then_disk_full)
    resp = upload(client, coord, case_id, PDF)
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert int(resp.headers["Retry-After"]) > 0
    assert written and files_in(folder) == []  # the cleanup ran
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.attachments).where(
            t.attachments.c.case_id == case_id)).scalar() == 0
    assert case_of(services, case_id)["state"] == "needs_input"


def test_a_download_is_audited_with_the_patient_and_its_real_outcome(
        client, coord, services, folder, case_id):
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    with services.engine.connect() as conn:
        patient_id = repo.order_row(conn, case_of(services, case_id)["order_id"])["patient_id"]

    def audits() -> list[tuple]:
        ae = t.audit_events
        with services.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                sa.select(ae.c.patient_id, ae.c.outcome).where(
                    ae.c.entity_type == "attachment", ae.c.entity_id == att["id"])
                .order_by(ae.c.id))]

    assert download(client, coord, att).status_code == 200
    assert audits() == [(patient_id, "success")]
    stored_file(folder, row_of(services, att["id"])).unlink()
    assert download(client, coord, att).status_code == 503
    assert audits() == [(patient_id, "success"), (patient_id, "error")]


def test_a_document_gone_before_submission_stops_the_case_for_a_coordinator(
        client, coord, services, folder, case_id):
    """The payer never gets other bytes than the ones uploaded: a document whose file went
    missing puts the case in `error` with needs_attention `attachment_unreadable`, and
    nothing is sent."""
    att = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    assert case_of(services, case_id)["state"] == "ready_to_submit"
    stored_file(folder, row_of(services, att["id"])).unlink()
    payer_work.submit_case(services, case_id)
    case = case_of(services, case_id)
    assert case["state"] == "error" and case["attention_reason"] == "attachment_unreadable"
    with services.engine.connect() as conn:
        assert repo.exchanges_of_case(conn, case_id) == []
