"""Standard Webhooks signing and verification, including the spec's known-answer vector."""

from __future__ import annotations

import pytest

from authsvc.adapters import webhooks

# The Standard Webhooks specification's example (spec/standard-webhooks.md).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_known_answer_vector() -> None:
    assert webhooks.sign(SECRET, MSG_ID, TIMESTAMP, BODY) == EXPECTED


def test_genuine_message_verifies_and_returns_its_id() -> None:
    hdrs = webhooks.headers(SECRET, MSG_ID, BODY, TIMESTAMP)
    assert webhooks.verify(SECRET, hdrs, BODY, now=TIMESTAMP + 10) == MSG_ID


@pytest.mark.parametrize("skew", [-301, 301, -360, 360])
def test_timestamps_outside_five_minutes_fail_in_both_directions(skew: int) -> None:
    hdrs = webhooks.headers(SECRET, MSG_ID, BODY, TIMESTAMP)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(SECRET, hdrs, BODY, now=TIMESTAMP + skew)


def test_tampering_and_missing_parts_fail() -> None:
    hdrs = webhooks.headers(SECRET, MSG_ID, BODY, TIMESTAMP)
    for body in (BODY.replace(b"2", b"3"), b'{"test":2432232314}'):
        with pytest.raises(webhooks.WebhookVerificationError):
            webhooks.verify(SECRET, hdrs, body, now=TIMESTAMP)
    for drop in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        with pytest.raises(webhooks.WebhookVerificationError):
            webhooks.verify(SECRET, {k: v for k, v in hdrs.items() if k != drop}, BODY,
                            now=TIMESTAMP)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(SECRET, {**hdrs, "webhook-signature": "v1,"}, BODY, now=TIMESTAMP)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify("whsec_" + "A" * 32, hdrs, BODY, now=TIMESTAMP)


def test_rotation_accepts_any_listed_valid_signature() -> None:
    hdrs = webhooks.headers(SECRET, MSG_ID, BODY, TIMESTAMP)
    rotated = f"v1,AAAA v1,BBBB {hdrs['webhook-signature']}"
    assert webhooks.verify(SECRET, {**hdrs, "webhook-signature": rotated}, BODY,
                           now=TIMESTAMP) == MSG_ID
