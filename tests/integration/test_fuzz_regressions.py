"""Inputs the schemathesis run (reliability.md B14) found mishandled, kept as regressions."""

from __future__ import annotations

import pytest

from tests.conftest import auth
from tests.integration.test_cases_factory import insert_case, new_order

pytestmark = pytest.mark.integration


def test_appeal_kind_of_the_wrong_type_is_422_not_500(client, tokens, services):
    token = tokens["org-a"]["coordinator"]
    order = new_order(client, token, "FUZZ-APPEAL")
    case_id = insert_case(services, order["id"], "denied", actions={1: "A3"})
    for kind in ({}, [], 3, None):
        resp = client.post(f"/v1/cases/{case_id}/appeal", json={"kind": kind},
                           headers=auth(token))
        assert resp.status_code == 422, kind
        assert resp.mimetype == "application/problem+json"


@pytest.mark.parametrize("url", [
    "/v1/orders?mrn=" + "M" * 65,
    "/v1/orders?mrn=",
    "/v1/cases?urgency=",
    "/v1/reports/prior-auth-metrics?to=",
])
def test_empty_or_overlong_query_values_are_422(client, tokens, url):
    resp = client.get(url, headers=auth(tokens["org-a"]["coordinator"]))
    assert resp.status_code == 422
