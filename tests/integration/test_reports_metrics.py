"""GET /v1/reports/prior-auth-metrics on a known data set, as JSON and as CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid

import pytest

from authsvc.api.auth import create_token
from tests.conftest import auth
from tests.integration.test_cases_factory import insert_case, new_order, two_lines

pytestmark = pytest.mark.integration


def at(day: int, hour: float = 0, month: int = 10) -> dt.datetime:
    return dt.datetime(2026, month, day, tzinfo=dt.UTC) + dt.timedelta(hours=hour)


@pytest.fixture(scope="module")
def org(app, services) -> dict:
    """A fresh organization holding exactly the data set below."""
    name = f"org-report-{uuid.uuid4().hex[:6]}"
    with services.engine.begin() as conn:
        tokens = {role: create_token(conn, name, role, name=f"{name}-{role}")[1]
                  for role in ("clinician", "coordinator", "billing", "admin")}
    client = app.test_client()
    one = new_order(client, tokens["coordinator"], "R-1")["id"]
    two = new_order(client, tokens["coordinator"], "R-2", lines=two_lines())["id"]

    def case(order_id, actions, received, decided, **kw):  # type: ignore[no-untyped-def]
        state = kw.pop("state", "approved")
        return insert_case(services, order_id, state, actions=actions, received=received,
                           decided=decided, **kw)

    # demo / standard: four initial requests, an appeal, two extensions, noise
    case(one, {1: "A1"}, at(5), at(5, 10))                                      # 10 h
    case(one, {1: "A3"}, at(6), at(6, 20), state="denied")                      # 20 h
    case(two, {1: "A1", 2: "A3"}, at(7), at(8, 6), state="partially_approved")  # 30 h
    case(one, {1: "A3"}, at(12), at(12, 4), state="superseded")                 # 4 h
    case(one, {1: "A1"}, at(13), at(13, 5), kind="appeal_standard")
    case(one, {1: "A1"}, at(14), at(14, 5), kind="extension")
    case(one, {1: "A3"}, at(14), at(14, 6), kind="extension", state="denied")
    case(one, {}, at(15), at(15, 1), state="cancelled")                         # undecided
    case(one, {1: "A1"}, at(1, 0, 11), at(2, 0, 11))                            # outside
    # demo / expedited
    case(one, {1: "A1"}, at(3), at(3, 2.5), urgency="expedited")
    # acme / standard: a modification counts as approved
    case(one, {1: "A6"}, at(4), at(4, 1), payer_id="acme", state="modified")
    return tokens


def report(client, token, query="from=2026-10-01&to=2026-10-31", **headers):
    return client.get(f"/v1/reports/prior-auth-metrics?{query}", headers=auth(token, **headers))


EXPECTED = [
    {"payer_id": "acme", "urgency": "standard", "requests": 1, "approved": 1,
     "approved_pct": 100.0, "denied": 0, "denied_pct": 0.0, "approved_after_appeal": 0,
     "approved_after_appeal_pct": 0.0, "extended": 0, "extended_pct": 0.0,
     "avg_decision_hours": 1.0, "median_decision_hours": 1.0},
    {"payer_id": "demo", "urgency": "expedited", "requests": 1, "approved": 1,
     "approved_pct": 100.0, "denied": 0, "denied_pct": 0.0, "approved_after_appeal": 0,
     "approved_after_appeal_pct": 0.0, "extended": 0, "extended_pct": 0.0,
     "avg_decision_hours": 2.5, "median_decision_hours": 2.5},
    {"payer_id": "demo", "urgency": "standard", "requests": 4, "approved": 2,
     "approved_pct": 50.0, "denied": 2, "denied_pct": 50.0, "approved_after_appeal": 1,
     "approved_after_appeal_pct": 25.0, "extended": 1, "extended_pct": 25.0,
     "avg_decision_hours": 16.0, "median_decision_hours": 15.0},
]


def test_report_numbers_json(client, org):
    resp = report(client, org["coordinator"])
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["from"] == "2026-10-01" and body["to"] == "2026-10-31"
    assert body["payer_id"] is None
    assert body["groups"] == EXPECTED
    only = report(client, org["admin"], "from=2026-10-01&to=2026-10-31&payer_id=acme")
    assert only.get_json()["groups"] == EXPECTED[:1]
    november = report(client, org["admin"], "from=2026-11-02&to=2026-11-02").get_json()
    assert [g["requests"] for g in november["groups"]] == [1]
    one_day = report(client, org["admin"], "from=2026-10-06&to=2026-10-06").get_json()
    assert one_day["groups"][0]["denied"] == 1 and one_day["groups"][0]["approved_pct"] == 0.0


def test_report_numbers_csv(client, org):
    resp = report(client, org["coordinator"], Accept="text/csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert list(rows[0]) == list(EXPECTED[0])
    assert rows == [{k: str(v) for k, v in g.items()} for g in EXPECTED]


def test_report_rules_roles_and_tenancy(client, org, tokens):
    for role in ("clinician", "billing"):
        assert report(client, org[role]).status_code == 403
    for org_name in ("org-a", "org-b"):  # their cases were decided today, not in October
        other = report(client, tokens[org_name]["admin"]).get_json()
        assert other["groups"] == []
    for query in ("from=2026-13-01", "from=yesterday", "from=2026-10-31&to=2026-10-01",
                  "from=2020-01-01&to=2026-01-01"):
        resp = report(client, org["admin"], query)
        assert resp.status_code == 422, query
        assert resp.mimetype == "application/problem+json"


@pytest.mark.parametrize("query", ["to=0001-01-05", "from=0001-01-01&to=0001-01-02",
                                   "to=9999-12-31", "from=1999-12-31", "to=2200-01-01"])
def test_dates_outside_the_supported_range_are_a_problem_naming_the_field(
        client, org, query):
    resp = report(client, org["admin"], query)
    assert resp.status_code == 422, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == "application/problem+json"
    fields = {e["field"] for e in resp.get_json()["errors"]}
    assert fields == {name.split("=")[0] for name in query.split("&")}
    assert {e["code"] for e in resp.get_json()["errors"]} == {"out_of_range"}
    csv_resp = report(client, org["admin"], query, Accept="text/csv")
    assert csv_resp.status_code == 422


def test_the_earliest_and_latest_dates_are_accepted(client, org):
    assert report(client, org["admin"], "from=2000-01-01&to=2000-01-02").status_code == 200
    assert report(client, org["admin"], "to=2000-01-05").status_code == 200  # default from
    assert report(client, org["admin"], "from=2199-12-01&to=2199-12-31").status_code == 200


def test_csv_cells_a_spreadsheet_would_run_as_formulas_stay_text():
    from authsvc.service_layer import reports

    group = dict.fromkeys(reports.COLUMNS)
    rows = []
    for payer in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx",
                  "demo"):
        rows.append({**group, "payer_id": payer, "urgency": "standard", "requests": -1,
                     "approved_pct": 50.0})
    out = reports.to_csv({"groups": rows})
    cells = [row[0] for row in csv.reader(io.StringIO(out))][1:]
    assert cells == ["'=HYPERLINK(\"http://x\")", "'+1+1", "'-2+3", "'@SUM(A1)", "'\tx",
                     "'\rx", "demo"]
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert parsed[0]["requests"] == "-1" and parsed[0]["approved_pct"] == "50.0"  # numbers
