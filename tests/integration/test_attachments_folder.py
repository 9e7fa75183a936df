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

pytestmark = pytest.mark.integration


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
    assert row["storage_path"] == str(folder / "org-a" / sha[:2] / sha)
    assert files_in(folder) == [Path(row["storage_path"])]  # no temporary file left
    assert Path(row["storage_path"]).read_bytes() == PDF
    assert "passwd" not in row["storage_path"] and row["filename"] == "passwd"
    assert stat.S_IMODE(os.stat(row["storage_path"]).st_mode) == 0o600
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
        claim = payer_work.build_claim(conn, case)
    assert [a.data for a in claim.attachments] == [PDF]


def test_the_same_content_twice_is_one_file_two_documents(client, coord, services, folder,
                                                           case_id):
    first = upload(client, coord, case_id, PNG, name="a.png").get_json()
    second = upload(client, coord, case_id, PNG, name="b.png")
    assert second.status_code == 201
    ids = [a["id"] for a in second.get_json()["attachments"]]
    assert len(ids) == 2 and first["attachments"][0]["id"] in ids
    paths = {row_of(services, i)["storage_path"] for i in ids}
    assert len(paths) == 1 and files_in(folder) == [Path(paths.pop())]


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
    path = Path(row_of(services, ok["id"])["storage_path"])
    other = insert_case(services, case_of(services, case_id)["order_id"],
                        "needs_input")

    def db_fails(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))

    monkeypatch.setattr(case_actions, "_audit", db_fails)
    try:
        assert upload(client, coord, other, PDF).status_code >= 500
    except sa.exc.OperationalError:
        pass
    assert path.read_bytes() == PDF  # the first document's file is still there
    monkeypatch.undo()
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
    kept_path = Path(row_of(services, kept["id"])["storage_path"])
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
    path = Path(row_of(services, att["id"])["storage_path"])
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
    import threading

    from authsvc.service_layer.context import Actor

    if services.engine.dialect.name != "postgresql":
        pytest.skip("two concurrent write transactions need PostgreSQL")
    written, release = threading.Event(), threading.Event()
    ids: list[str] = []

    def in_flight() -> None:
        with services.engine.begin() as conn:
            ids.append(case_actions.add_attachment(
                Actor(org_id="org-a", role="coordinator"), conn, case_id, filename="a.pdf",
                data=PDF, folder=folder))
            written.set()
            release.wait(10)

    upload_thread = threading.Thread(target=in_flight)
    upload_thread.start()
    assert written.wait(10)
    path = attachment_files.path_for(folder, "org-a", hashlib.sha256(PDF).hexdigest())
    assert path.exists()
    result: list[bool] = []
    cleanup = threading.Thread(target=lambda: result.append(case_actions.discard_unreferenced(
        services.engine, folder, "org-a", hashlib.sha256(PDF).hexdigest())))
    cleanup.start()
    cleanup.join(0.5)
    assert cleanup.is_alive()  # waits for the upload's commit
    release.set()
    upload_thread.join(10)
    cleanup.join(10)
    assert result == [False] and path.read_bytes() == PDF
    assert row_of(services, ids[0])["storage_path"] == str(path)


def test_the_scheduler_sweeps_orphaned_files_when_a_folder_is_set(client, coord, services,
                                                                  folder, case_id):
    """The scheduler runs the sweep (at start, then hourly): a file a crash left behind does
    not stay on disk, a committed attachment does."""
    from workers.scheduler import Scheduler

    kept = upload(client, coord, case_id, PDF).get_json()["attachments"][0]
    kept_path = Path(row_of(services, kept["id"])["storage_path"])
    orphan = attachment_files.put(folder, "org-a", PNG)
    assert Scheduler(services, broker=None).attachment_files_once() == {
        "files": 1, "temporaries": 0}
    assert not orphan.exists() and kept_path.exists()
