"""The real PasFhirAdapter against the real `demo` payer simulator over HTTP (127.0.0.1 only).

Each simulator runs on a free port in a thread; settings that change its behaviour (faults,
latency) get their own instance. No database or broker is needed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from standardwebhooks import Webhook, WebhookVerificationError

from authsvc.adapters.payers.pas_fhir import PasFhirAdapter
from authsvc.adapters.payers.registry import PayerConfig, webhook_key_from_secret
from authsvc.domain.payer import (
    Attachment,
    ClaimLine,
    ClaimRequest,
    CoverageInfo,
    DenialReason,
    EligibilityRequest,
    ExchangeRecord,
    Party,
    PatientInfo,
    PayerOutcomeUnknown,
    PayerRejected,
    PayerUnavailable,
)
from authsvc.payer_sim import SimServer

SECRET = "sim-test-secret"
PATIENT = PatientInfo("MRN-0001", "Ana", "Diaz", dt.date(1984, 3, 2), "female")


def make_claim(member_id: str, case_id: str, **changes) -> ClaimRequest:
    claim = ClaimRequest(
        claim_identifier=case_id,
        certification_type="I",
        urgency="standard",
        patient=PATIENT,
        coverage=CoverageInfo("demo", member_id, "G-100"),
        requester=Party("1234567893", "Dr. Rivera"),
        performer=Party("1003000126", "Valley Imaging"),
        diagnoses=("M54.50",),
        place_of_service="22",
        lines=(
            ClaimLine(1, "CPT", "72148", 5, dt.date(2026, 12, 1), dt.date(2026, 12, 31)),
            ClaimLine(2, "HCPCS", "E0424", 1, dt.date(2026, 12, 1)),
        ),
        created_at=dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC),
    )
    return dataclasses.replace(claim, **changes)


def eligibility(member_id: str) -> EligibilityRequest:
    return EligibilityRequest("elig_1", PATIENT, CoverageInfo("demo", member_id),
                              Party("1234567893"), dt.date(2026, 12, 1), (("CPT", "72148"),))


class Payer:
    """A simulator plus an adapter pointed at it, and the exchanges the adapter recorded."""

    def __init__(self, sim: SimServer, timeout: float = 5.0):
        self.sim = sim
        self.records: list[ExchangeRecord] = []
        self.config = PayerConfig(id="demo", name="Demo Health Plan", protocol="pas-fhir",
                                  base_url=sim.fhir_base, secret_env="AUTHSVC_PAYER_DEMO_SECRET",
                                  timeout_seconds=timeout)
        self.adapter = PasFhirAdapter(self.config, self.records.append)

    def ledger(self, **filters: str) -> list[dict]:
        with requests.get(f"{self.sim.url}/sim/submissions", params=filters, timeout=5) as r:
            r.raise_for_status()
            return r.json()["items"]


@pytest.fixture(scope="module")
def payer() -> Iterator[Payer]:
    with SimServer(settings={"AUTHSVC_SIM_PEND_SECONDS": "0.5",
                             "AUTHSVC_PAYER_DEMO_SECRET": SECRET,
                             "AUTHSVC_SIM_SLOW_SECONDS": "0.3",
                             "AUTHSVC_SIM_FAULT": "", "AUTHSVC_SIM_LATENCY_MS": "0"}) as sim:
        yield Payer(sim)


def faulty(**settings: str) -> SimServer:
    """A simulator of its own for one fault or latency setting."""
    return SimServer(settings={"AUTHSVC_SIM_FAULT": "", "AUTHSVC_SIM_LATENCY_MS": "0",
                               **settings})


class Receiver:
    """A tiny HTTP endpoint that stores what it receives (callbacks, redirect traps)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class FakePayer(Receiver):
    """An endpoint that answers every request with one canned response."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]):
        super().__init__()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.received.put(({}, b""))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server.RequestHandlerClass = Handler


# ---------------------------------------------------------------- decisions


def test_approve(payer):
    before = len(payer.records)
    answer = payer.adapter.submit(make_claim("SIM-APPROVE-0001", "case_approve"))
    assert answer.outcome == "complete" and not answer.rejected
    assert answer.claim_identifier == "case_approve"
    first, second = answer.lines
    assert (first.sequence, first.review_action, first.authorized_quantity) == (1, "A1", 5)
    assert (first.valid_from, first.valid_to) == (dt.date(2026, 12, 1), dt.date(2026, 12, 31))
    assert second.review_action == "A1"
    assert (second.valid_from, second.valid_to) == (dt.date(2026, 12, 1), dt.date(2027, 3, 1))
    assert first.auth_number and second.auth_number and first.auth_number != second.auth_number
    ledger = payer.ledger(member_id="SIM-APPROVE-0001")
    assert [(e["kind"], e["claim_id"], e["accepted"], e["http_status"]) for e in ledger] == \
        [("submit", "case_approve", True, 200)]
    (record,) = payer.records[before:]
    assert (record.kind, record.direction, record.http_status, record.error) == \
        ("submit", "out", 200, None)
    assert record.url.endswith("/fhir/Claim/$submit")
    assert "case_approve" in record.request_body and "case_approve" in record.response_body
    assert record.finished_at >= record.started_at


def test_deny(payer):
    answer = payer.adapter.submit(make_claim("SIM-DENY-0001", "case_deny"))
    assert [ln.review_action for ln in answer.lines] == ["A3", "A3"]
    reason = answer.lines[0].denial_reason
    assert isinstance(reason, DenialReason) and reason.code == "0F"
    assert reason.text and "Not Medically Necessary" in reason.text
    assert answer.lines[0].auth_number is None


def test_partial(payer):
    answer = payer.adapter.submit(make_claim("SIM-PARTIAL-0001", "case_partial"))
    assert [ln.review_action for ln in answer.lines] == ["A1", "A3"]


def test_modify_halves_the_quantity(payer):
    answer = payer.adapter.submit(make_claim("SIM-MODIFY-0001", "case_modify"))
    first, second = answer.lines
    assert (first.review_action, first.authorized_quantity) == ("A6", 2)
    assert (second.review_action, second.authorized_quantity) == ("A6", 1)  # at least 1
    assert first.auth_number


def test_reject_is_an_answer_not_an_exception(payer):
    answer = payer.adapter.submit(make_claim("SIM-REJECT-0001", "case_reject"))
    assert answer.rejected and answer.outcome == "error"
    assert [(e.code, e.followup) for e in answer.errors] == [("15", "C")]
    assert [e["accepted"] for e in payer.ledger(member_id="SIM-REJECT-0001")] == [False]
    assert payer.adapter.inquire(make_claim("SIM-REJECT-0001", "case_reject")) is None


def test_slow_payer_within_the_timeout(payer):
    started = time.monotonic()
    answer = payer.adapter.submit(make_claim("SIM-SLOW-0001", "case_slow"))
    assert answer.lines[0].review_action == "A1"
    assert time.monotonic() - started >= 0.3


def test_pend_then_signed_notification(payer):
    with Receiver() as receiver:
        sub_id = payer.adapter.register_subscription(f"{receiver.url}/v1/payer-callbacks/demo")
        assert sub_id == payer.adapter.register_subscription(
            f"{receiver.url}/v1/payer-callbacks/demo")  # one subscription per endpoint
        claim = make_claim("SIM-PEND-0001", "case_pend")
        answer = payer.adapter.submit(claim)
        assert answer.outcome == "complete"
        assert [ln.review_action for ln in answer.lines] == ["A4", "A4"]
        assert all(ln.administration_ref for ln in answer.lines)

        headers, body = receiver.received.get(timeout=5)
    assert headers["content-type"] == "application/fhir+json"
    key = webhook_key_from_secret(SECRET)
    Webhook(key).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_key_from_secret("another-secret")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body.replace(b"A1", b"A3"), headers)

    note = payer.adapter.parse_notification(body)
    assert note.claim_identifier == "case_pend"
    assert note.event_number == 1
    assert [ln.review_action for ln in note.lines] == ["A1", "A1"]
    assert note.lines[0].auth_number and note.last_updated is not None

    inquired = payer.adapter.inquire(claim)
    assert [ln.review_action for ln in inquired.lines] == ["A1", "A1"]
    kinds = [(e["kind"], e["accepted"]) for e in payer.ledger(claim_id="case_pend")]
    assert kinds == [("submit", True), ("inquire", True)]


def test_silent_stays_pended(payer):
    claim = make_claim("SIM-SILENT-0001", "case_silent")
    assert payer.adapter.submit(claim).lines[0].review_action == "A4"
    assert payer.adapter.inquire(claim).lines[0].review_action == "A4"


def test_info_request_then_update_with_attachment(payer):
    claim = make_claim("SIM-INFO-0001", "case_info")
    answer = payer.adapter.submit(claim)
    assert answer.lines[0].review_action == "A4"
    assert answer.info_request is not None and answer.info_request.codes == ("18748-4",)
    update = dataclasses.replace(
        claim, related_claim_identifier="case_info",
        attachments=(Attachment("att_1", "application/pdf", "MRI", b"%PDF-1.4", "18748-4"),))
    updated = payer.adapter.update(update)
    assert [ln.review_action for ln in updated.lines] == ["A1", "A1"]
    assert updated.info_request is None
    again = payer.adapter.update(update)  # a retried update is answered, not applied twice
    assert again == updated
    kinds = [(e["kind"], e["accepted"]) for e in payer.ledger(member_id="SIM-INFO-0001")]
    assert kinds == [("submit", True), ("update", True), ("update", False)]


def test_a_resubmission_relating_to_a_rejected_case_is_a_new_request(payer):
    rejected = make_claim("SIM-APPROVE-0006", "case_first")
    resubmission = dataclasses.replace(rejected, claim_identifier="case_resubmission",
                                       related_claim_identifier="case_first")
    answer = payer.adapter.submit(resubmission)
    assert answer.claim_identifier == "case_resubmission"
    assert answer.lines[0].review_action == "A1"
    assert [e["kind"] for e in payer.ledger(member_id="SIM-APPROVE-0006")] == ["submit"]


def test_cancel(payer):
    claim = make_claim("SIM-APPROVE-0002", "case_cancel")
    payer.adapter.submit(claim)
    answer = payer.adapter.cancel(claim)
    assert [ln.review_action for ln in answer.lines] == ["C", "C"]
    assert payer.ledger(member_id="SIM-APPROVE-0002")[-1]["kind"] == "cancel"


def test_cancelling_an_extension_leaves_the_approval(payer):
    approved = make_claim("SIM-APPROVE-0007", "case_approved")
    payer.adapter.submit(approved)
    extension = dataclasses.replace(approved, claim_identifier="case_extension",
                                    certification_type="4",
                                    related_claim_identifier="case_approved")
    assert payer.adapter.submit(extension).lines[0].review_action == "A1"
    cancel = dataclasses.replace(extension, certification_type="3", lines=())
    assert {ln.review_action for ln in payer.adapter.cancel(cancel).lines} == {"C"}
    assert {ln.review_action for ln in payer.adapter.inquire(approved).lines} == {"A1"}
    assert {ln.review_action for ln in payer.adapter.inquire(extension).lines} == {"C"}


def test_update_of_an_unknown_claim_is_a_4xx_rejection(payer):
    claim = make_claim("SIM-APPROVE-0003", "case_unknown_update",
                       related_claim_identifier="case_never_sent")
    with pytest.raises(PayerRejected) as err:
        payer.adapter.update(claim)
    assert err.value.http_status == 404
    assert err.value.errors[0].code == "not-found"


def test_idempotent_resubmit(payer):
    claim = make_claim("SIM-APPROVE-0004", "case_twice")
    first = payer.adapter.submit(claim)
    assert payer.adapter.submit(claim) == first
    assert [e["accepted"] for e in payer.ledger(claim_id="case_twice")] == [True, False]


def test_inquire(payer):
    assert payer.adapter.inquire(make_claim("SIM-APPROVE-0005", "case_never_sent")) is None
    claim = make_claim("SIM-APPROVE-0005", "case_inquire")
    submitted = payer.adapter.submit(claim)
    assert payer.adapter.inquire(claim).lines == submitted.lines
    assert [(e["kind"], e["http_status"]) for e in payer.ledger(member_id="SIM-APPROVE-0005")] \
        == [("inquire", 404), ("submit", 200), ("inquire", 200)]


def test_flaky_payer(payer):
    claim = make_claim("SIM-FLAKY-0001", "case_flaky")
    for _ in range(2):
        with pytest.raises(PayerUnavailable) as err:
            payer.adapter.submit(claim)
        assert err.value.http_status == 503 and err.value.retry_after == 1.0
    assert payer.adapter.submit(claim).lines[0].review_action == "A1"
    ledger = payer.ledger(claim_id="case_flaky")
    assert [(e["http_status"], e["accepted"]) for e in ledger] == \
        [(503, False), (503, False), (200, True)]
    assert sum(e["accepted"] for e in ledger if e["kind"] == "submit") == 1


# ---------------------------------------------------------------- eligibility


@pytest.mark.parametrize("member_id, status", [
    ("SIM-APPROVE-0001", "active"),
    ("SIM-INACTIVE-0001", "inactive"),
    ("SIM-NOTFOUND-0001", "member_not_found"),
])
def test_eligibility(payer, member_id, status):
    answer = payer.adapter.check_eligibility(eligibility(member_id))
    assert answer.status == status
    if status == "member_not_found":
        assert [(e.code, e.followup) for e in answer.errors] == [("75", "C")]
    if status == "active":
        assert answer.auth_required is True and answer.plan_name
    entry = payer.ledger(member_id=member_id, kind="eligibility")[-1]
    assert entry["accepted"] and entry["claim_id"] is None


# ---------------------------------------------------------------- transport faults


def test_timeout_is_outcome_unknown_and_the_payer_got_it():
    sim = faulty(AUTHSVC_SIM_LATENCY_MS="1500")
    with sim:
        p = Payer(sim, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(PayerOutcomeUnknown):
            p.adapter.submit(make_claim("SIM-APPROVE-0100", "case_timeout"))
        assert time.monotonic() - started < 1.2
        assert p.records[-1].error == "read timeout"
        # the request did reach the payer: the caller must $inquire before resending
        assert [e["accepted"] for e in p.ledger(claim_id="case_timeout")] == [True]


@pytest.mark.parametrize("mode", ["html", "truncated", "huge"])
def test_garbage_answers_are_outcome_unknown(mode):
    sim = faulty(AUTHSVC_SIM_FAULT=mode)
    with sim:
        p = Payer(sim)
        started = time.monotonic()
        with pytest.raises(PayerOutcomeUnknown):
            p.adapter.submit(make_claim("SIM-APPROVE-0101", f"case_{mode}"))
        assert time.monotonic() - started < 3
        assert p.records[-1].http_status == 200 and p.records[-1].error
        assert [e["accepted"] for e in p.ledger(claim_id=f"case_{mode}")] == [False]


def test_slowdrip_hits_the_total_deadline():
    sim = faulty(AUTHSVC_SIM_FAULT="slowdrip")
    with sim:
        p = Payer(sim, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(PayerOutcomeUnknown):
            p.adapter.submit(make_claim("SIM-APPROVE-0102", "case_drip"))
        assert time.monotonic() - started < 1.5
        assert "deadline" in p.records[-1].error


def test_redirect_is_not_followed():
    with Receiver() as trap:
        sim = faulty(AUTHSVC_SIM_FAULT=f"redirect={trap.url}/steal")
        with sim:
            p = Payer(sim)
            with pytest.raises(PayerOutcomeUnknown):
                p.adapter.submit(make_claim("SIM-APPROVE-0103", "case_redirect"))
            assert p.records[-1].http_status == 302
        assert trap.received.empty()


@pytest.mark.parametrize("mode, status, retry_after", [
    ("503", 503, None), ("500", 500, None), ("429", 429, 30.0)])
def test_5xx_and_429_are_unavailable(mode, status, retry_after):
    sim = faulty(AUTHSVC_SIM_FAULT=mode)
    with sim:
        p = Payer(sim)
        with pytest.raises(PayerUnavailable) as err:
            p.adapter.submit(make_claim("SIM-APPROVE-0104", "case_5xx"))
        assert (err.value.http_status, err.value.retry_after) == (status, retry_after)
        # faults hit PAS calls only: eligibility keeps answering
        assert p.adapter.check_eligibility(eligibility("SIM-APPROVE-0104")).status == "active"


def test_hanging_payer_is_outcome_unknown():
    sim = faulty(AUTHSVC_SIM_FAULT="hang")
    with sim:
        p = Payer(sim, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(PayerOutcomeUnknown):
            p.adapter.inquire(make_claim("SIM-APPROVE-0106", "case_hang"))
        assert time.monotonic() - started < 1.2
        assert [(e["kind"], e["http_status"]) for e in p.ledger(claim_id="case_hang")] == \
            [("inquire", None)]


def test_connection_reset_after_sending_is_outcome_unknown():
    """The payer read the request and hung up: it may have acted on it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
        listener.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    config = PayerConfig(id="demo", name="Demo", protocol="pas-fhir", timeout_seconds=2,
                         base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/fhir")
    records: list[ExchangeRecord] = []
    with pytest.raises(PayerOutcomeUnknown):
        PasFhirAdapter(config, records.append).submit(make_claim("SIM-APPROVE-0107", "case_y"))
    thread.join(timeout=5)
    assert records[0].error == "connection lost"


FHIR = {"Content-Type": "application/fhir+json"}
OUTCOME = json.dumps({"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "invalid", "expression": ["Bundle.entry[0]"],
     "details": {"text": "The input request is not of the desired format."}}]}).encode()


@pytest.mark.parametrize("status, body, headers, failure, error", [
    (200, b'{"resourceType":"Patient"}', FHIR, PayerOutcomeUnknown, "unusable answer"),
    (200, b"[1, 2]", FHIR, PayerOutcomeUnknown, "unparseable body"),
    (200, b'{"resourceType":"ClaimResponse","outcome":NaN}', FHIR, PayerOutcomeUnknown,
     "unparseable body"),
    (200, b'{"resourceType":"Bundle"}', {"Content-Type": "text/plain"}, PayerOutcomeUnknown,
     "unexpected content type"),
    (308, b"", {"Location": "http://127.0.0.1:9/elsewhere"}, PayerOutcomeUnknown,
     "redirect 308 not followed"),
    (400, OUTCOME, FHIR, PayerRejected, "http 400"),
    (503, b"", {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, PayerUnavailable, "http 503"),
])
def test_fake_payer_answers(status, body, headers, failure, error):
    with FakePayer(status, body, headers) as fake:
        records: list[ExchangeRecord] = []
        config = PayerConfig(id="demo", name="Demo", protocol="pas-fhir",
                             base_url=f"{fake.url}/fhir", timeout_seconds=2)
        with pytest.raises(failure) as err:
            PasFhirAdapter(config, records.append).submit(make_claim("SIM-X", "case_fake"))
    assert fake.received.qsize() == 1
    (record,) = records
    assert record.http_status == status and record.error.startswith(error)
    if failure is PayerRejected:
        assert err.value.errors[0].message == "The input request is not of the desired format."
        assert err.value.errors[0].path == "Bundle.entry[0]"
    if failure is PayerUnavailable:
        assert err.value.retry_after > 0


def test_connection_refused_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    records: list[ExchangeRecord] = []
    config = PayerConfig(id="demo", name="Demo", protocol="pas-fhir",
                         base_url=f"http://127.0.0.1:{port}/fhir", timeout_seconds=2)
    with pytest.raises(PayerUnavailable):
        PasFhirAdapter(config, records.append).submit(make_claim("SIM-APPROVE-0105", "case_x"))
    assert records[0].error == "connection refused" and records[0].http_status is None


def test_ledger_never_logs_query_strings(payer, caplog):
    caplog.set_level("INFO")
    payer.ledger(member_id="SIM-CANARY-000123")
    assert "SIM-CANARY" not in caplog.text


def test_sim_rejects_non_fhir_bodies(payer):
    with requests.post(f"{payer.sim.fhir_base}/Claim/$submit", data=b"{bad",
                       headers={"Content-Type": "application/fhir+json"}, timeout=5) as r:
        assert r.status_code == 400
        assert r.json()["resourceType"] == "OperationOutcome"
    with requests.post(f"{payer.sim.fhir_base}/Claim/$submit",
                       data=json.dumps({"resourceType": "Bundle", "type": "nonsense"}),
                       headers={"Content-Type": "application/fhir+json"}, timeout=5) as r:
        assert r.status_code == 400


def test_run_sim_serves_until_interrupted(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_file = tmp_path / "sim.log"
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            f"from authsvc.payer_sim import run_sim; run_sim('127.0.0.1', {port})")
    with log_file.open("wb") as log, subprocess.Popen(
            [sys.executable, "-c", code], stderr=log,
            env={**os.environ, "AUTHSVC_SIM_PEND_SECONDS": "0.2"}) as proc:
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    with requests.get(f"{base}/healthz", timeout=1) as r:
                        if r.ok:
                            break
                except requests.ConnectionError:
                    time.sleep(0.05)
            config = PayerConfig(id="demo", name="Demo", protocol="pas-fhir",
                                 base_url=f"{base}/fhir", timeout_seconds=5)
            adapter = PasFhirAdapter(config, lambda record: None)
            adapter.submit(make_claim("SIM-PEND-CANARY-000123", "case_proc"))
            with requests.get(f"{base}/sim/submissions",
                              params={"member_id": "SIM-PEND-CANARY-000123"}, timeout=5) as r:
                assert [e["accepted"] for e in r.json()["items"]] == [True]
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
    logged = log_file.read_text()
    assert "POST /fhir/Claim/$submit 200" in logged
    assert "GET /sim/submissions 200" in logged
    for phi in ("CANARY", "Diaz", "1984-03-02"):
        assert phi not in logged
