"""Per-line determinations: a policy index feeding a small durable-rules decision ruleset.

This is the only module that imports durable_rules (checked by import-linter). The measured
limits of durable-rules 2.0.28 shape it (architecture.md › durable-rules):

* Policies are never compiled one rule per policy (the engine aborts at ~90 rules and hangs
  at 512 rules on one field). :mod:`authsvc.adapters.policies` indexes them; each line becomes
  one *flat* fact (does a policy apply, the most restrictive ``pa_required``, is the code
  named at all, does a gold card match, the payer's default) and the same dozen rules per
  ruleset version turn that fact into the CRD answer, whatever the number of policies.
* Cross-line ``with_any_of`` tests are multi-fact joins: a ``need`` fact per (line, pending
  policy) and a ``has`` fact per (line, code set containing its code); a join rule fires for
  every ``need`` with a ``has`` of the same set, and its action keeps the pairs on *another*
  line (a ``$neq`` between the two facts' properties segfaults durable-rules 2.0.28 in about
  half of the runs, measured here; equality joins are stable).
* Hygiene: ``assert_facts`` (``post`` fires only the first match); one fresh, uniquely named
  session per evaluation, deleted afterwards (live sessions keep ~4.7 KB per fact); one
  process-wide lock around the engine (its C core is not thread-safe); a host without the
  background dispatch threads (all actions run synchronously inside ``assert_facts``, so a
  timer thread can never steal an action); rule dicts built fresh for each ruleset (the
  engine mutates them); one-parameter actions (two parameters make an action asynchronous
  and stall it); a catch-all rule (a fact that matches no rule raises
  MessageNotHandledException); a ruleset named after its version (``demo@2026-11-20.1``).
* Determinations are memoized per (ruleset version, fact signature) in a bounded LRU; the
  signature does not contain the code, so every code of one policy shares one entry.

A :class:`RulesEngine` is immutable: a new policy version is a new engine (the caller swaps
them atomically); its memo dies with it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import durable_rules_engine
from durable import engine as _durable

from authsvc.adapters.policies import (
    LineContext,
    Policy,
    PolicyError,
    PolicyIndex,
    RuleSet,
    load_ruleset,
)
from authsvc.domain.determination import Determination, Reason
from authsvc.domain.orders import LineFacts, OrderFacts, age_on
from authsvc.domain.policy import DOC_ORDER, normalize_dx

__all__ = ["PolicyError", "RulesEngine", "UnknownPayer", "DECISION_RULES"]

log = logging.getLogger(__name__)

#: Serializes every call into durable-rules' C core, across all engines of the process.
_HOST_LOCK = threading.Lock()
#: C ruleset handles of garbage-collected engines; deleted under the lock by the next user.
_RETIRED: list[int] = []

_OTH = ("OTH",)


class UnknownPayer(LookupError):
    """No policy file names this payer."""


class _QuietHost(_durable.Host):
    """A durable-rules host without its background dispatch and timer threads.

    Every action this module defines runs synchronously inside ``assert_facts``; the
    background threads would only race the caller for pending actions.
    """

    def _run(self) -> None:  # overrides Host._run, which starts threading.Timer loops
        return None


class _Sink:
    """What the rules fired during the current evaluation (only touched under the lock)."""

    def __init__(self) -> None:
        self.decisions: list[tuple[int, str]] = []
        self.pairs: set[tuple[int, int]] = set()

    def reset(self) -> None:
        self.decisions.clear()
        self.pairs.clear()


# --------------------------------------------------------------------------------------------
# The decision ruleset: a dozen rules over flat attributes. Mutually exclusive by construction
# (every decision rule tests `applies`, `named`, `gold`, `pa` or `dflt` so that exactly one
# matches any line fact); the reference evaluator in the tests states the same table.

_LINE = {"t": "line"}
_SENT = {"$or": [{"pa": "auth-needed"}, {"pa": "conditional"}]}

#: decision rule name → its conditions on a line fact.
DECISION_RULES: dict[str, list[dict[str, Any]]] = {
    "policy-auth-needed": [{"applies": True}, {"pa": "auth-needed"}, {"gold": False}],
    "policy-conditional": [{"applies": True}, {"pa": "conditional"}, {"gold": False}],
    "policy-no-auth": [{"applies": True}, {"pa": "no-auth"}],
    "policy-gold-card": [{"applies": True}, _SENT, {"gold": True}],
    "conditions-not-met": [{"applies": False}, {"named": True}],
    "no-policy": [{"named": False}, {"dflt": "conditional"}, {"gold": False}],
    "no-policy-gold-card": [{"named": False}, {"dflt": "conditional"}, {"gold": True}],
    "no-policy-default-no-auth": [{"named": False}, {"dflt": "no-auth"}],
}
_CROSS_LINE_RULE = "cross-line-with-any-of"
_CATCH_ALL = "catch-all"


def _decision_action(sink: _Sink, name: str) -> Callable[[Any], None]:
    def action(c: Any) -> None:  # exactly one parameter: two would make it asynchronous
        sink.decisions.append((c.m.i, name))

    return action


def _pair_action(sink: _Sink) -> Callable[[Any], None]:
    def action(c: Any) -> None:
        if c.n.i != c.h.i:  # the partner code must be on another line of the order
            sink.pairs.add((c.n.i, c.n.pol))

    return action


def _ignore(c: Any) -> None:
    return None


class NotHandled(Exception):
    """A fact matched no rule (durable-rules' MessageNotHandledException)."""


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _assert_facts(handle: int, facts: list[dict[str, Any]], sink: _Sink) -> None:
    """Assert facts into the C core and run the fired rules' effects in Python, directly.

    Why not ``Host.assert_facts``: its per-action machinery (a Closure, a Promise, the
    session state re-serialized to JSON after every action, two clock reads) cost more than
    the engine's own matching (measured: 12.2 → 5.3 µs per fact on 3-fact sessions). The
    loop below is the host's own protocol (``start_action_for_state`` then
    ``complete_and_start_action`` until no action is left) minus the state write-back, which
    these rules never change. The rule bodies registered in the definition are the same
    effects, kept so a plain Host can run the ruleset too (tests compare both).
    """
    result = durable_rules_engine.assert_facts(handle, _dumps(facts))
    if result[0] == 1:
        raise NotHandled
    state = result[1]
    started = durable_rules_engine.start_action_for_state(handle, state)
    message = started[1] if started else None
    decisions, pairs = sink.decisions, sink.pairs
    while message:
        for name, match in json.loads(message).items():
            if name == _CROSS_LINE_RULE:
                need, has = match["n"], match["h"]
                if need["i"] != has["i"]:  # the partner must be on another line
                    pairs.add((need["i"], need["pol"]))
            elif name != _CATCH_ALL:
                decisions.append((match["m"]["i"], name))
            break  # one action per message
        message = durable_rules_engine.complete_and_start_action(handle, state)


def _ruleset_definition(sink: _Sink) -> dict[str, Any]:
    """A fresh definition (the engine mutates it: it pops each rule's ``run``)."""
    definition: dict[str, Any] = {
        name: {
            "all": [{"m": {"$and": [dict(_LINE), *[dict(c) for c in conditions]]}}],
            "run": _decision_action(sink, name),
        }
        for name, conditions in DECISION_RULES.items()
    }
    definition[_CROSS_LINE_RULE] = {
        "all": [
            {"n": {"t": "need"}},
            # "on another line" is checked in the action: a `$neq` between two facts'
            # properties makes durable-rules 2.0.28 segfault (measured: ~half of the runs).
            {"h": {"$and": [{"t": "has"}, {"set": {"n": "set"}}]}},
        ],
        "run": _pair_action(sink),
    }
    # Join facts may find no partner: the catch-all keeps them from raising
    # MessageNotHandledException. Line facts always match exactly one decision rule (the
    # table is exhaustive), so they are left out: a catch-all firing on every line fact
    # doubled the Python action callbacks per line (measured: ~45 % of the cold path).
    definition[_CATCH_ALL] = {
        "all": [{"m": {"$or": [{"t": "need"}, {"t": "has"}]}}], "run": _ignore}
    return definition


def _retire(handles: list[int]) -> None:
    """weakref.finalize hook: only queue the handles; the lock holder deletes them."""
    _RETIRED.extend(handles)


def _drain_retired() -> None:
    """Free the C rulesets of collected engines (caller holds _HOST_LOCK)."""
    while _RETIRED:
        handle = _RETIRED.pop()
        try:
            durable_rules_engine.delete_ruleset(handle)
        except Exception:  # a leak of ~50 KB is better than a failed determination
            log.warning("could not delete a retired durable-rules ruleset", exc_info=True)


class _Session:
    """One evaluation: a fresh uniquely named session, opened lazily, deleted at exit."""

    def __init__(self, engine: RulesEngine, ruleset_name: str):
        self._engine = engine
        self._name = ruleset_name
        self._sid: str | None = None

    def __enter__(self) -> _Session:
        return self

    def assert_facts(self, facts: list[dict[str, Any]]) -> _Sink:
        if self._sid is None:
            _HOST_LOCK.acquire()
            try:
                _drain_retired()
                self._sid = f"{self._engine._tag}-{next(self._engine._sessions)}"
                self._engine._sink.reset()
            except BaseException:
                _HOST_LOCK.release()
                raise
        for fact in facts:
            fact["sid"] = self._sid
        try:
            self._engine._assert(self._engine._handles[self._name], facts, self._engine._sink)
        except NotHandled:
            # cannot happen with an exhaustive table; answer indeterminate, never crash
            log.error("a fact matched no decision rule in %s", self._name)
            self._engine._sink.reset()
        return self._engine._sink

    def __exit__(self, *exc: object) -> None:
        if self._sid is None:
            return
        try:
            durable_rules_engine.delete_state(self._engine._handles[self._name], self._sid)
        finally:
            self._sid = None
            _HOST_LOCK.release()


class _LRU:
    """A small thread-safe LRU; size 0 disables it."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        if not self.size:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if not self.size:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class RulesEngine:
    """Determines every line of an order with coverage presumed active (api.md › Orders).

    Immutable and thread-safe: build a new engine for a new policy version.
    """

    def __init__(self, ruleset: RuleSet, *, memo_size: int = 65_536):
        self._ruleset = ruleset
        self._payers: dict[str, PolicyIndex] = dict(ruleset.payers)
        self._memo = _LRU(memo_size)
        # (line cache, context ids): swapped as a pair, never cleared in place, so a thread
        # still holding the old pair can never file an answer under a reused context id
        self._fast: tuple[dict[tuple, Any], dict[tuple, int]] | None = (
            ({}, {}) if memo_size else None)
        self._fast_size = memo_size * 4
        self._sink = _Sink()
        self._tag = f"s{os.getpid()}x{id(self):x}"
        self._sessions = itertools.count(1)
        self._host = _QuietHost()
        with _HOST_LOCK:
            _drain_retired()
            self._host.register_rulesets(
                {
                    idx.ruleset_version: _ruleset_definition(self._sink)
                    for idx in self._payers.values()
                }
            )
            self._handles = {
                idx.ruleset_version: self._host.get_ruleset(idx.ruleset_version)._handle
                for idx in self._payers.values()
            }
        self._explained = {idx.ruleset_version: tuple(_explained(p) for p in idx.policies)
                           for idx in self._payers.values()}
        self._assert = _assert_facts  # one seam: the benchmark counts facts through it
        weakref.finalize(self, _retire, list(self._handles.values()))

    @classmethod
    def from_directory(
        cls, path: str | os.PathLike[str], *, memo_size: int = 65_536
    ) -> RulesEngine:
        """Load, validate and compile ``path``/*.yaml; raises PolicyError when invalid."""
        return cls(load_ruleset(path), memo_size=memo_size)

    # ---------------------------------------------------------------- introspection

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def payer_ids(self) -> set[str]:
        return set(self._payers)

    def version(self, payer_id: str) -> str:
        """The ruleset version a determination for this payer records, e.g. demo@2026-11-20.1."""
        return self._index(payer_id).ruleset_version

    def versions(self) -> dict[str, dict[str, Any]]:
        """Per payer: version, policy_version, digest of its files, per-file sha256."""
        return self._ruleset.versions()

    def ruleset_size(self, payer_id: str) -> int:
        """Number of durable-rules rules behind this payer: stays a dozen at any policy count."""
        name = self._index(payer_id).ruleset_version
        return len(self._host.get_ruleset(name).get_definition())

    def memo_entries(self) -> int:
        return len(self._memo)

    def _index(self, payer_id: str) -> PolicyIndex:
        try:
            return self._payers[payer_id]
        except KeyError:
            raise UnknownPayer(payer_id) from None

    # ---------------------------------------------------------------- determination

    def determine(self, order: OrderFacts) -> list[Determination]:
        """One determination per line, in the order of ``order.lines``.

        Warm path first: a line whose answer cannot depend on the order's other lines (none
        of its applicable policies has ``with_any_of``) is cached under its raw inputs and
        the order's context, so a repeated line costs one dict lookup; any miss takes the
        full path (index → fact → durable-rules, memoized by fact signature).
        """
        state = self._fast
        if state is not None:
            fast, contexts = state
            context = (order.payer_id, order.diagnoses, order.place_of_service,
                       order.requester_npi, order.patient_birth_date, order.patient_sex,
                       order.as_of)
            # A small int stands for the order's context in every line key: keys stay flat
            # and compact, so a lookup touches little memory (measured: nested context
            # tuples made the warm path 1.3x slower once the process held 10,000 policies).
            cid = contexts.get(context)
            if cid is None:
                cid = contexts.setdefault(context, len(contexts))
            hits = []
            for line in order.lines:
                hit = fast.get((cid, line.code_system, line.code, line.quantity,
                                line.service_start))
                if hit is None:
                    break
                hits.append(hit)
            else:
                return hits
            whole = (cid, tuple((ln.code_system, ln.code, ln.quantity, ln.service_start)
                                for ln in order.lines))
            cached = fast.get(whole)  # an order with cross-line pairs, seen before
            if cached is not None:
                return list(cached)
        results, cross_line = self._determine(order)
        if state is not None:
            if len(fast) > self._fast_size or len(contexts) > self._fast_size:
                self._fast = ({}, {})  # bounded; a fresh pair is cheaper than LRU upkeep
            for i, line in enumerate(order.lines):
                if i not in cross_line:
                    fast[(cid, line.code_system, line.code, line.quantity,
                          line.service_start)] = results[i]
            if cross_line:
                fast[whole] = tuple(results)
        return results

    def _determine(self, order: OrderFacts) -> tuple[list[Determination], frozenset[int]]:
        """(determinations, the lines whose answer depends on other lines of the order)."""
        idx = self._index(order.payer_id)
        version = idx.ruleset_version
        diagnoses = tuple(normalize_dx(d) for d in order.diagnoses)
        applying: list[list[int]] = []
        pending: list[list[Policy]] = []
        named: list[tuple[int, ...]] = []
        cards: list[int | None] = []
        policies = idx.policies
        for line in order.lines:
            indexes = idx.candidate_indexes(line.code_system, line.code)
            static: list[int] = []
            paired: list[Policy] = []
            if indexes:
                ctx = _context(order, line, diagnoses)
                for k in indexes:
                    policy = policies[k]
                    if policy.tests_hold(ctx):
                        if policy.pair_set is None:
                            static.append(k)
                        else:
                            paired.append(policy)
            applying.append(static)
            pending.append(paired)
            named.append(indexes)
            card = idx.gold_card(
                order.requester_npi, line.code_system, line.code, line.service_start
            )
            cards.append(card.index if card else None)

        with _Session(self, version) as session:
            crossed = False
            if any(pending):
                for i, pol in self._cross_line(session, idx, order.lines, pending):
                    applying[i].append(pol)
                    crossed = True
            signatures = []
            for i, static in enumerate(applying):
                # candidate indexes come sorted and unique; only a cross-line pair adds one
                applies = tuple(sorted(set(static))) if crossed else tuple(static)
                signatures.append((applies, () if applies else named[i], cards[i]))
            memo = self._memo
            results: list[Determination | None] = (
                [memo.get((version, sig)) for sig in signatures] if memo.size
                else [None] * len(signatures))
            missing = {sig: i for i, sig in enumerate(signatures) if results[i] is None}
            if missing:
                decided = self._decide(session, idx, missing)
                for i, sig in enumerate(signatures):
                    if results[i] is None:
                        results[i] = decided[sig]
        cross_line = frozenset(i for i, ps in enumerate(pending) if ps)
        return [r for r in results if r is not None], cross_line

    def _cross_line(
        self,
        session: _Session,
        idx: PolicyIndex,
        lines: tuple[LineFacts, ...],
        pending: list[list[Policy]],
    ) -> frozenset[tuple[int, int]]:
        """Resolve ``with_any_of`` by joins: (line, policy) pairs whose partner line exists."""
        needs = tuple((i, p.index, p.pair_set) for i, ps in enumerate(pending) for p in ps)
        wanted = {s for _, _, s in needs}
        has = tuple(
            (j, s)
            for j, line in enumerate(lines)
            for s in idx.pair_sets_of(line.code_system, line.code)
            if s in wanted
        )
        key = (idx.ruleset_version, "with_any_of", needs, has)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        facts = [
            {"id": f"n{k}", "t": "need", "i": i, "pol": pol, "set": s}
            for k, (i, pol, s) in enumerate(needs)
        ] + [{"id": f"h{k}", "t": "has", "i": j, "set": s} for k, (j, s) in enumerate(has)]
        pairs = frozenset(session.assert_facts(facts).pairs)
        self._memo.put(key, pairs)
        return pairs

    def _decide(
        self, session: _Session, idx: PolicyIndex, missing: dict[tuple, int]
    ) -> dict[tuple, Determination]:
        """Run the decision rules on one flat fact per distinct signature."""
        facts = []
        by_fact: dict[int, tuple] = {}
        for k, sig in enumerate(missing):
            applies, candidates, card = sig
            if len(applies) == 1:
                pa = idx.policies[applies[0]].pa
            else:
                pa = max((idx.policies[p].pa for p in applies), key=_PA_RANK.__getitem__,
                         default="")
            facts.append(
                {
                    "id": k,  # unique in the session (the join facts' ids are strings)
                    "t": "line",
                    "i": k,
                    "applies": bool(applies),
                    "named": bool(applies or candidates),
                    "pa": pa,
                    "gold": card is not None,
                    "dflt": idx.default,
                }
            )
            by_fact[k] = sig
        sink = session.assert_facts(facts)
        fired: dict[int, list[str]] = {}
        for k, name in sink.decisions:
            fired.setdefault(k, []).append(name)
        out: dict[tuple, Determination] = {}
        explained = self._explained[idx.ruleset_version]
        memo = self._memo if self._memo.size else None
        for k, sig in by_fact.items():
            names = fired.get(k, [])
            if len(names) != 1:
                log.error(
                    "decision rules fired %r for one line fact of %s", names, idx.ruleset_version
                )
                determination = _indeterminate()
            else:
                determination = _build(names[0], idx, sig, explained)
            if memo is not None:
                memo.put((idx.ruleset_version, sig), determination)
            out[sig] = determination
        return out


_PA_RANK = {"no-auth": 0, "conditional": 1, "auth-needed": 2}


def _context(order: OrderFacts, line: LineFacts, diagnoses: tuple[str, ...]) -> LineContext:
    age = None
    if order.patient_birth_date is not None:
        age = age_on(order.patient_birth_date, order.as_of or line.service_start)
    return LineContext(
        code_system=line.code_system,
        code=line.code,
        quantity=line.quantity,
        service_start=line.service_start,
        place_of_service=order.place_of_service,
        age=age,
        sex=order.patient_sex,
        diagnoses=diagnoses,
    )


def _indeterminate() -> Determination:
    return Determination(
        covered="indeterminate",
        pa_needed="indeterminate",
        reasons=(Reason("technical", "The rules could not determine this line"),),
    )


def _build(outcome: str, idx: PolicyIndex, sig: tuple,
           explained: tuple[tuple, ...]) -> Determination:
    """The CRD answer for a fired decision rule, with its explanation."""
    applies, candidates, card_index = sig
    if len(applies) == 1:  # the usual case: one policy's precompiled explanation
        docs, links, rules, reasons, eligibility, hold = explained[applies[0]]
    else:
        parts = [explained[p] for p in applies]
        wanted = {d for part in parts for d in part[0]}
        docs = tuple(d for d in DOC_ORDER if d in wanted)
        links = tuple(dict.fromkeys(link for part in parts for link in part[1]))
        rules = tuple(part[2][0] for part in parts)
        reasons = tuple(part[3][0] for part in parts)
        eligibility = any(part[4] for part in parts)
        hold = any(part[5] for part in parts)
    # Positional arguments, in Determination's field order (covered, pa_needed, doc_needed,
    # info_needed, eligibility_check, reasons, rules, policy_links, satisfied_pa_id,
    # expiry_date, hold_for_documentation): this runs for every line the memo has not seen.
    if outcome == "policy-auth-needed":
        return Determination("conditional", "auth-needed", docs, _OTH, eligibility, reasons,
                             rules, links, None, None, hold)
    if outcome == "policy-conditional":
        return Determination("conditional", "conditional", docs, _OTH, eligibility, reasons,
                             rules, links, None, None, hold)
    if outcome == "policy-no-auth":
        return Determination("covered", "no-auth", docs, (), eligibility, reasons, rules, links)
    card = idx.gold_cards[card_index] if card_index is not None else None
    if outcome in ("policy-gold-card", "no-policy-gold-card") and card is not None:
        before = reasons if outcome == "policy-gold-card" else (_no_policy(idx),)
        return Determination("conditional", "satisfied", docs, _OTH, eligibility,
                             (*before, _gold_reason(card.id)), rules, links, card.id,
                             card.end.isoformat())
    if outcome == "conditions-not-met":
        ids = ", ".join(idx.policies[p].id for p in candidates)
        return Determination(
            "covered", "no-auth",
            reasons=(Reason("conditions-not-met", f"Conditions of {ids} are not met"),))
    if outcome == "no-policy":
        return Determination("conditional", "conditional", info_needed=_OTH,
                             reasons=(_no_policy(idx),))
    if outcome == "no-policy-default-no-auth":
        return Determination(
            "covered", "no-auth",
            reasons=(Reason("no-policy", f"No policy of payer {idx.payer_id} names this code; "
                            "the payer's default is no-auth"),))
    log.error("unknown decision outcome %r", outcome)
    return _indeterminate()


def _explained(policy: Policy) -> tuple:
    """(docs, links, rules, reasons, eligibility, hold) of one policy alone: a property of
    the compiled policy, computed once when the engine is built (not a per-order memo)."""
    return (tuple(d for d in DOC_ORDER if d in policy.doc_required),
            (policy.link,) if policy.link else (), (policy.id,),
            (Reason("policy", policy.title),), policy.eligibility_check,
            policy.hold_for_documentation)


def _no_policy(idx: PolicyIndex) -> Reason:
    return Reason("no-policy", f"No policy of payer {idx.payer_id} names this code")


def _gold_reason(card_id: str) -> Reason:
    return Reason("gold-card", f"Prior authorization waived: gold card {card_id}")
