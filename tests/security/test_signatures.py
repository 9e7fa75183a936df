"""S5 (replayed webhook) and S6 (tampered signature or body) on the payer callback route, plus
the Standard Webhooks known-answer vector and an independent implementation's agreement."""

from __future__ import annotations

import inspect
import json
import time
import uuid

import pytest

from authsvc.adapters import webhooks
from tests.conftest import DEMO_SECRET, FIXTURES
from tests.security.conftest import assert_problem, audit_rows

pytestmark = pytest.mark.integration
URL = "/v1/payer-callbacks/demo"
NOTIFICATION = (FIXTURES / "pas-2.2.1" / "Bundle-PASSubscriptionNotification.json").read_bytes()
OTHER_SECRET = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"


def signed(body: bytes = NOTIFICATION, msg_id: str | None = None, ts: int | None = None,
           secret: str = DEMO_SECRET) -> dict[str, str]:
    return {**webhooks.headers(secret, msg_id or f"msg_{uuid.uuid4().hex}", body, ts),
            "Content-Type": "application/fhir+json", "X-Request-Id": uuid.uuid4().hex}


def test_S5_same_webhook_id_is_200_without_a_second_effect(client):
    hdrs = signed()
    first = client.post(URL, data=NOTIFICATION, headers=hdrs)
    assert first.status_code == 200
    again = client.post(URL, data=NOTIFICATION, headers={**hdrs, "X-Request-Id": "r2"})
    assert again.status_code == 200 and again.get_json()["result"] == "duplicate"


@pytest.mark.parametrize("skew", [-360, 360, -10**6])
def test_S5_stale_and_future_timestamps_are_401_and_audited(client, services, skew):
    hdrs = signed(ts=int(time.time()) + skew)
    resp = client.post(URL, data=NOTIFICATION, headers=hdrs)
    assert_problem(resp, 401)
    rows = audit_rows(services, hdrs["X-Request-Id"])
    assert rows and rows[0]["outcome"] == "denied" and rows[0]["entity_type"] == "payer_callback"


@pytest.mark.parametrize("skew", [-240, 240])
def test_S5_four_minutes_either_way_is_inside_the_window(client, skew):
    resp = client.post(URL, data=NOTIFICATION, headers=signed(ts=int(time.time()) + skew))
    assert resp.status_code == 200


def _variants() -> dict[str, tuple[bytes, dict[str, str]]]:
    good = signed()
    pretty = json.dumps(json.loads(NOTIFICATION), indent=2).encode()
    flipped = bytearray(NOTIFICATION)
    flipped[len(flipped) // 2] ^= 0x01
    out = {
        "flipped_byte": (bytes(flipped), good),
        "pretty_printed": (pretty, good),
        "wrong_secret": (NOTIFICATION, signed(secret=OTHER_SECRET)),
        "empty_v1": (NOTIFICATION, {**good, "webhook-signature": "v1,"}),
        "v2_scheme": (NOTIFICATION, {**good, "webhook-signature": good[
            "webhook-signature"].replace("v1,", "v2,")}),
        "other_msg_id": (NOTIFICATION, {**good, "webhook-id": "msg_other"}),
        "timestamp_text": (NOTIFICATION, {**good, "webhook-timestamp": "１２３"}),
    }
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        out[f"no_{header}"] = (NOTIFICATION, {k: v for k, v in good.items() if k != header})
    return out


@pytest.mark.parametrize("variant", sorted(_variants()))
def test_S6_tampered_or_incomplete_signatures_are_401(client, variant):
    body, hdrs = _variants()[variant]
    assert_problem(client.post(URL, data=body, headers=hdrs), 401)


def test_S6_rotation_only_the_third_signature_valid(client):
    good = signed()
    bad1 = webhooks.sign(OTHER_SECRET, good["webhook-id"], int(good["webhook-timestamp"]),
                         NOTIFICATION)
    hdrs = {**good, "webhook-signature": f"{bad1} v1,AAAA {good['webhook-signature']}"}
    assert client.post(URL, data=NOTIFICATION, headers=hdrs).status_code == 200


def test_S6_standard_webhooks_known_answer_vector():
    # The Standard Webhooks specification's example.
    secret, msg_id, ts = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", \
        1614265330
    body = b'{"test": 2432232314}'
    assert webhooks.sign(secret, msg_id, ts, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_S6_outbound_signatures_verify_with_the_reference_library():
    from standardwebhooks.webhooks import Webhook

    body = b'{"type": "outcome.created", "data": {"id": "out_1"}}'
    hdrs = webhooks.headers(DEMO_SECRET, "msg_1", body)
    Webhook(DEMO_SECRET).verify(body, hdrs)  # raises when it disagrees
    with pytest.raises(Exception):  # noqa: B017 - the reference raises its own type
        Webhook(DEMO_SECRET).verify(body + b" ", hdrs)


def test_S6_signature_comparison_is_constant_time():
    source = inspect.getsource(webhooks.verify)
    assert "hmac.compare_digest" in source and "== expected" not in source
