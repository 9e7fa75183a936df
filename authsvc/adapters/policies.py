"""Payer policy files (``rules/*.yaml``): load, validate, compile into a per-payer index.

Policies are data (api.md › Policy files). They are *not* compiled one durable-rules rule per
policy: durable-rules 2.0.28 aborts at ~90 rules and hangs at 512 rules on one field
(architecture.md). Instead each payer's files become a :class:`PolicyIndex`:

* exact codes in a dict and ranges as sorted, disjoint segments searched with ``bisect``, so
  a line's candidate policies are found in O(1)/O(log n) whatever the number of policies;
* every ``when`` test precompiled into a small Python predicate;
* gold cards indexed by NPI, then by code; ``with_any_of`` code sets indexed by code.

Semantics of ``when`` tests (the reference evaluator in the tests mirrors them):
``place_of_service``, ``age`` and ``sex`` hold when the order does not state the value (an
unknown value never makes a policy silently drop out); ``quantity_over: n`` holds for
quantity > n; ``diagnoses_none_of`` holds when no diagnosis matches, ``diagnoses_any_of``
when one does (patterns ending in ``*`` are prefixes; dots are ignored); ``service_date``
holds when the line's ``service_start`` is inside the window (inclusive); ``with_any_of``
holds when *another* line of the order has one of the codes (resolved by the rules engine).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import yaml

from authsvc.domain.codes import npi_valid
from authsvc.domain.policy import (
    CodeSpecError,
    code_key,
    dx_pattern_matcher,
    normalize_dx,
    parse_code_spec,
)

#: pa_required in the file → the CRD pa-needed value it asks for.
PA_VALUES = {True: "auth-needed", "conditional": "conditional", False: "no-auth"}


class PolicyError(Exception):
    """The policy files are invalid; ``errors`` holds ``file:line: message`` strings."""

    def __init__(self, errors: list[str]):
        super().__init__(f"{len(errors)} policy error(s):\n" + "\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# Code index


class CodeIndex:
    """Codes and code ranges → values, with O(1) exact and O(log n) range lookups.

    Ranges are cut into disjoint segments at every range boundary, each holding the values of
    the ranges that cover it, so a lookup is one ``bisect`` whatever the number of ranges.
    Build cost and memory grow with the sum of overlaps (ranges in real policies are few and
    shallowly nested).
    """

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._ranges: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        self._starts: dict[str, list[int]] = {}
        self._segments: dict[str, list[tuple[int, ...]]] = {}
        self._frozen_exact: dict[tuple[str, str], tuple[int, ...]] = {}

    def add(self, system: str, spec: str, value: int) -> None:
        parsed = parse_code_spec(system, spec)
        if isinstance(parsed, str):
            self._exact[(system, parsed)].append(value)
        else:
            klass, start, end = parsed
            self._ranges[klass].append((start, end, value))

    def freeze(self) -> CodeIndex:
        """Build the lookup structures once all codes are added."""
        self._frozen_exact = {k: tuple(sorted(set(v))) for k, v in self._exact.items()}
        interned: dict[tuple[int, ...], tuple[int, ...]] = {}
        for klass, ranges in self._ranges.items():
            events: list[tuple[int, int, int]] = []  # (position, +1/-1, value)
            for start, end, value in ranges:
                events.append((start, 1, value))
                events.append((end + 1, -1, value))
            events.sort()
            active: dict[int, int] = {}
            starts: list[int] = []
            segments: list[tuple[int, ...]] = []
            i = 0
            while i < len(events):
                position = events[i][0]
                while i < len(events) and events[i][0] == position:
                    _, delta, value = events[i]
                    count = active.get(value, 0) + delta
                    if count:
                        active[value] = count
                    else:
                        active.pop(value, None)
                    i += 1
                values = tuple(sorted(active))
                values = interned.setdefault(values, values)
                if segments and segments[-1] == values:
                    continue
                starts.append(position)
                segments.append(values)
            self._starts[klass] = starts
            self._segments[klass] = segments
        return self

    def lookup(self, system: str, code: str) -> tuple[int, ...]:
        """Values of every entry naming ``code`` (sorted, no duplicates)."""
        exact = self._frozen_exact.get((system, code), ())
        key = code_key(system, code)
        if key is None or key[0] not in self._starts:
            return exact
        starts = self._starts[key[0]]
        position = bisect.bisect_right(starts, key[1]) - 1
        ranged = self._segments[key[0]][position] if position >= 0 else ()
        if not ranged:
            return exact
        if not exact:
            return ranged
        return tuple(sorted(set(exact) | set(ranged)))


# --------------------------------------------------------------------------------------------
# Compiled policies


class LineContext(NamedTuple):
    """What a policy's ``when`` tests look at for one line (built by the rules engine)."""

    code_system: str
    code: str
    quantity: int
    service_start: dt.date
    place_of_service: str | None
    age: int | None
    sex: str | None
    diagnoses: tuple[str, ...]  # normalized: no dots, upper case


Predicate = Callable[[LineContext], bool]


@dataclasses.dataclass(frozen=True)
class Policy:
    """One compiled policy; ``index`` is its position in the payer's (sorted) files."""

    index: int
    id: str
    title: str
    pa: str  # auth-needed | conditional | no-auth
    doc_required: tuple[str, ...]
    hold_for_documentation: bool
    eligibility_check: bool
    link: str | None
    tests: tuple[Predicate, ...]
    pair_set: int | None  # with_any_of: index of the payer's code set, or None
    source: str  # file:line

    def tests_hold(self, ctx: LineContext) -> bool:
        """Every ``when`` test except ``with_any_of`` (a cross-line test) holds."""
        for test in self.tests:
            if not test(ctx):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class GoldCard:
    index: int
    id: str
    npi: str
    start: dt.date
    end: dt.date  # inclusive
    source: str


@dataclasses.dataclass(frozen=True)
class PolicyIndex:
    """A payer's compiled policies for one version; immutable and safe to share."""

    payer_id: str
    version: str
    default: str  # conditional | no-auth
    policies: tuple[Policy, ...]
    gold_cards: tuple[GoldCard, ...]
    files: Mapping[str, str]  # file name → sha256 of its bytes
    digest: str  # sha256 over the payer's files (names and contents)
    _codes: CodeIndex
    _pair_sets: CodeIndex
    _pair_set_count: int
    _cards_by_npi: Mapping[str, CodeIndex]

    @functools.cached_property
    def ruleset_version(self) -> str:
        return f"{self.payer_id}@{self.version}"

    @property
    def pair_set_count(self) -> int:
        return self._pair_set_count

    def candidate_indexes(self, code_system: str, code: str) -> tuple[int, ...]:
        """Indexes of the policies naming the code, sorted (file order)."""
        return self._codes.lookup(code_system, code)

    def candidates(self, code_system: str, code: str) -> tuple[Policy, ...]:
        """Policies naming the code, in file order."""
        return tuple(self.policies[i] for i in self._codes.lookup(code_system, code))

    def pair_sets_of(self, code_system: str, code: str) -> tuple[int, ...]:
        """The ``with_any_of`` code sets that contain this code."""
        return self._pair_sets.lookup(code_system, code)

    def gold_card(
        self, npi: str | None, code_system: str, code: str, on: dt.date
    ) -> GoldCard | None:
        """The requester's card for this code valid on ``on`` (latest expiry, then file order)."""
        if not npi or npi not in self._cards_by_npi:
            return None
        best: GoldCard | None = None
        for i in self._cards_by_npi[npi].lookup(code_system, code):
            card = self.gold_cards[i]
            if card.start <= on <= card.end and (best is None or card.end > best.end):
                best = card
        return best


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Every payer's compiled policies from one directory; one immutable version."""

    payers: Mapping[str, PolicyIndex]
    directory: str | None = None

    def versions(self) -> dict[str, dict[str, Any]]:
        return {
            p.payer_id: {
                "version": p.ruleset_version,
                "policy_version": p.version,
                "digest": p.digest,
                "files": dict(p.files),
                "policies": len(p.policies),
                "gold_cards": len(p.gold_cards),
            }
            for p in self.payers.values()
        }


# --------------------------------------------------------------------------------------------
# Loading


@cache
def policy_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file format, shipped inside the package."""
    text = resources.files("authsvc").joinpath("policy_schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = policy_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc,valid-type]
    """Safe YAML without timestamps: dates stay strings, as the schema expects."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Doc(NamedTuple):
    name: str
    data: Any
    root: yaml.Node | None
    sha256: str


def _line_of(node: yaml.Node | None, path: Iterable[Any]) -> int:
    """1-based line of the node at ``path`` (or of its deepest existing ancestor)."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == step:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if step >= len(node.value):
                return line
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _path_str(path: Iterable[Any]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _duplicate_keys(node: yaml.Node | None) -> list[tuple[int, str]]:
    """PyYAML keeps the last of two equal keys silently; a policy file must not."""
    found: list[tuple[int, str]] = []
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        found.append((key.start_mark.line + 1, key.value))
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return found


def _parse(name: str, raw: bytes, errors: list[str]) -> _Doc | None:
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        errors.append(f"{name}:1: not UTF-8 ({exc.reason})")
        return None
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(f"{name}:{line}: invalid YAML: {problem}")
        return None
    for line, key in _duplicate_keys(root):
        errors.append(f"{name}:{line}: duplicate key {key!r}")
    return _Doc(name, data, root, sha)


def _schema_errors(doc: _Doc) -> list[str]:
    out = []
    for error in sorted(_validator().iter_errors(doc.data), key=lambda e: list(map(str, e.path))):
        path = list(error.absolute_path)
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            extra = sorted(k for k in error.instance if k not in allowed)
            if extra:
                path = [*path, extra[0]]
                message = f"unknown field {extra[0]!r}"
                if path[-2:-1] in (["codes"], ["with_any_of"]):
                    message = (f"unknown code system {extra[0]!r} "
                               f"(one of {', '.join(sorted(allowed))})")
        elif error.validator == "pattern" and error.schema.get("description"):
            message = f"{error.instance!r} is not valid here: {error.schema['description']}"
        elif (
            error.validator == "type"
            and isinstance(error.instance, int | float)
            and error.validator_value == "string"
        ):
            message += " (quote it in YAML: codes, NPIs, dates and versions are strings)"
        where = _path_str(path) or "(file)"
        out.append(f"{doc.name}:{_line_of(doc.root, path)}: {where}: {message}")
    return out


def _date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


class _FileChecker:
    """Semantic checks the schema cannot express, with file:line messages."""

    def __init__(self, doc: _Doc, errors: list[str]):
        self.doc = doc
        self.errors = errors

    def error(self, path: list[Any], message: str) -> None:
        line = _line_of(self.doc.root, path)
        self.errors.append(f"{self.doc.name}:{line}: {_path_str(path)}: {message}")

    def codes(self, codes: Mapping[str, list[str]], path: list[Any]) -> None:
        for system, specs in codes.items():
            for i, spec in enumerate(specs):
                try:
                    parse_code_spec(system, spec)
                except CodeSpecError as exc:
                    self.error([*path, system, i], str(exc))

    def window(self, obj: Mapping[str, str], path: list[Any]) -> None:
        start = end = None
        for key in ("from", "to"):
            if key in obj:
                parsed = _date(obj[key])
                if parsed is None:
                    self.error([*path, key], f"{obj[key]!r} is not a valid date")
                elif key == "from":
                    start = parsed
                else:
                    end = parsed
        if start and end and start > end:
            self.error([*path, "from"], f"window starts ({start}) after it ends ({end})")

    def check(self) -> None:
        data = self.doc.data
        for p, policy in enumerate(data.get("policies", [])):
            base = ["policies", p]
            self.codes(policy["codes"], [*base, "codes"])
            when = policy.get("when", {})
            if "with_any_of" in when:
                self.codes(when["with_any_of"], [*base, "when", "with_any_of"])
            if "service_date" in when:
                self.window(when["service_date"], [*base, "when", "service_date"])
            age = when.get("age", {})
            if "min" in age and "max" in age and age["min"] > age["max"]:
                self.error([*base, "when", "age"], "age min is above max")
            for key in ("diagnoses_none_of", "diagnoses_any_of"):
                for i, pattern in enumerate(when.get(key, ())):
                    problem = _dx_pattern_problem(pattern)
                    if problem:
                        self.error([*base, "when", key, i], problem)
        for g, card in enumerate(data.get("gold_cards", [])):
            base = ["gold_cards", g]
            self.codes(card["codes"], [*base, "codes"])
            self.window(card, base)
            if not npi_valid(card["npi"]):
                self.error([*base, "npi"], f"{card['npi']!r} fails the NPI check digit")


def _dx_pattern_problem(pattern: str) -> str | None:
    """An ICD-10-CM pattern that can never match a billable code is an authoring error."""
    from authsvc.adapters import codesets

    if pattern.endswith("*"):
        prefix = normalize_dx(pattern[:-1])
        codes = _sorted_icd_codes(codesets.table_for(None).version)
        i = bisect.bisect_left(codes, prefix)
        if i == len(codes) or not codes[i].startswith(prefix):
            return f"{pattern!r}: no ICD-10-CM code starts with {pattern[:-1]!r}"
        return None
    status = codesets.icd10cm_status(pattern)
    if status == "unknown_code":
        return f"{pattern!r} is not an ICD-10-CM code"
    if status == "not_billable":
        return (f"{pattern!r} is a category, never a diagnosis on an order; write "
                f"'{pattern}*' to match the codes under it")
    return None


@cache
def _sorted_icd_codes(version: str) -> list[str]:
    from authsvc.adapters import codesets

    return sorted(codesets.table_for(None).codes)


def _ordered_files(directory: Path) -> list[Path]:
    """``*.yaml`` at the top level only: subfolders (golden tests) are not policies."""
    return sorted(p for p in directory.glob("*.yaml") if p.is_file())


def load_ruleset(directory: str | os.PathLike[str]) -> RuleSet:
    """Load, validate and compile every payer's policy files in ``directory``.

    Raises PolicyError listing every problem found (not only the first), so that
    ``authsvc rules validate`` shows an author everything to fix in one run.
    """
    path = Path(directory)
    if not path.is_dir():
        raise PolicyError([f"{path}:0: not a directory"])
    files = _ordered_files(path)
    if not files:
        raise PolicyError([f"{path}:0: no *.yaml policy files at the top level"])
    ruleset = load_documents({str(f): f.read_bytes() for f in files}, strict=True)
    return dataclasses.replace(ruleset, directory=str(path))


def load_documents(documents: Mapping[str, bytes | str], *, strict: bool = False) -> RuleSet:
    """Compile policy documents given as ``{file name: YAML}`` (files sorted by name).

    ``strict`` adds the checks across policies that only an author can resolve
    (contradicting overlaps); policy files in a directory are always loaded strictly.
    """
    errors: list[str] = []
    docs: list[_Doc] = []
    for name in sorted(documents):
        raw = documents[name]
        parsed = _parse(name, raw.encode("utf-8") if isinstance(raw, str) else raw, errors)
        if parsed is None:
            continue
        schema_errors = _schema_errors(parsed)
        if schema_errors:
            errors.extend(schema_errors)
            continue
        before = len(errors)
        _FileChecker(parsed, errors).check()
        if len(errors) == before:
            docs.append(parsed)
    by_payer: dict[str, list[_Doc]] = defaultdict(list)
    for doc in docs:
        by_payer[doc.data["payer_id"]].append(doc)
    payers: dict[str, PolicyIndex] = {}
    for payer_id, payer_docs in sorted(by_payer.items()):
        index = _compile_payer(payer_id, payer_docs, errors)
        if index is not None:
            payers[payer_id] = index
        if strict:
            errors.extend(contradictions(payer_docs))
    if errors:
        raise PolicyError(errors)
    return RuleSet(payers=payers)


def _agree(docs: list[_Doc], key: str, default: str | None, errors: list[str]) -> str:
    first = docs[0]
    value = first.data.get(key, default)
    for doc in docs[1:]:
        other = doc.data.get(key, default)
        if other != value:
            line = _line_of(doc.root, [key])
            errors.append(
                f"{doc.name}:{line}: {key}: {other!r} disagrees with {value!r} in "
                f"{first.name}:{_line_of(first.root, [key])} (a payer's files must agree"
                + ("; an omitted default means conditional)" if key == "default" else ")")
            )
    return str(value)


def _compile_payer(payer_id: str, docs: list[_Doc], errors: list[str]) -> PolicyIndex | None:
    before = len(errors)
    version = _agree(docs, "version", None, errors)
    default = _agree(docs, "default", "conditional", errors)
    codes = CodeIndex()
    pair_sets = CodeIndex()
    pair_set_ids: dict[tuple[tuple[str, tuple[str, ...]], ...], int] = {}
    cards_by_npi: dict[str, CodeIndex] = defaultdict(CodeIndex)
    policies: list[Policy] = []
    cards: list[GoldCard] = []
    seen_ids: dict[str, str] = {}
    seen_cards: dict[str, str] = {}
    for doc in docs:
        for p, raw in enumerate(doc.data.get("policies", [])):
            source = f"{doc.name}:{_line_of(doc.root, ['policies', p])}"
            if raw["id"] in seen_ids:
                errors.append(
                    f"{source}: policies[{p}].id: duplicate policy id {raw['id']!r} "
                    f"(first at {seen_ids[raw['id']]})"
                )
                continue
            seen_ids[raw["id"]] = source
            index = len(policies)
            for system, specs in raw["codes"].items():
                for spec in specs:
                    codes.add(system, spec, index)
            when = raw.get("when", {})
            pair_set = None
            if "with_any_of" in when:
                key = tuple(sorted((s, tuple(sorted(c))) for s, c in when["with_any_of"].items()))
                if key not in pair_set_ids:
                    pair_set_ids[key] = len(pair_set_ids)
                    for system, specs in key:
                        for spec in specs:
                            pair_sets.add(system, spec, pair_set_ids[key])
                pair_set = pair_set_ids[key]
            policies.append(
                Policy(
                    index=index,
                    id=raw["id"],
                    title=raw["title"],
                    pa=PA_VALUES[raw["pa_required"]],
                    doc_required=tuple(raw.get("doc_required", ())),
                    hold_for_documentation=bool(raw.get("hold_for_documentation", False)),
                    eligibility_check=bool(raw.get("eligibility_check", False)),
                    link=raw.get("link"),
                    tests=_compile_tests(when),
                    pair_set=pair_set,
                    source=source,
                )
            )
        for g, raw in enumerate(doc.data.get("gold_cards", [])):
            source = f"{doc.name}:{_line_of(doc.root, ['gold_cards', g])}"
            card_id = raw.get("id") or f"gc-{raw['npi']}-{raw['from']}"
            if card_id in seen_cards:
                errors.append(
                    f"{source}: gold_cards[{g}]: duplicate gold card id {card_id!r} "
                    f"(first at {seen_cards[card_id]})"
                )
                continue
            seen_cards[card_id] = source
            index = len(cards)
            for system, specs in raw["codes"].items():
                for spec in specs:
                    cards_by_npi[raw["npi"]].add(system, spec, index)
            cards.append(
                GoldCard(
                    index=index,
                    id=card_id,
                    npi=raw["npi"],
                    start=dt.date.fromisoformat(raw["from"]),
                    end=dt.date.fromisoformat(raw["to"]),
                    source=source,
                )
            )
    if len(errors) > before:
        return None
    names = {Path(doc.name).name: doc.sha256 for doc in docs}
    digest = hashlib.sha256(
        "".join(f"{name}\0{sha}\n" for name, sha in sorted(names.items())).encode()
    ).hexdigest()
    return PolicyIndex(
        payer_id=payer_id,
        version=version,
        default=default,
        policies=tuple(policies),
        gold_cards=tuple(cards),
        files=names,
        digest=digest,
        _codes=codes.freeze(),
        _pair_sets=pair_sets.freeze(),
        _pair_set_count=len(pair_set_ids),
        _cards_by_npi={npi: index.freeze() for npi, index in cards_by_npi.items()},
    )


def _compile_tests(when: Mapping[str, Any]) -> tuple[Predicate, ...]:
    """Turn a ``when`` block into predicates, cheapest first (``with_any_of`` excluded)."""
    tests: list[Predicate] = []
    if "quantity_over" in when:
        limit = when["quantity_over"]
        tests.append(lambda ctx: ctx.quantity > limit)
    if "place_of_service" in when:
        places = frozenset(when["place_of_service"])
        tests.append(lambda ctx: ctx.place_of_service is None or ctx.place_of_service in places)
    if "sex" in when:
        sexes = frozenset(when["sex"])
        tests.append(lambda ctx: ctx.sex is None or ctx.sex in sexes)
    if "age" in when:
        low = when["age"].get("min", 0)
        high = when["age"].get("max", 10_000)
        tests.append(lambda ctx: ctx.age is None or low <= ctx.age <= high)
    if "service_date" in when:
        start = dt.date.fromisoformat(when["service_date"].get("from", "0001-01-01"))
        end = dt.date.fromisoformat(when["service_date"].get("to", "9999-12-31"))
        tests.append(lambda ctx: start <= ctx.service_start <= end)
    if "diagnoses_none_of" in when:
        excluded = dx_pattern_matcher(when["diagnoses_none_of"])
        tests.append(lambda ctx: not excluded(ctx.diagnoses))
    if "diagnoses_any_of" in when:
        required = dx_pattern_matcher(when["diagnoses_any_of"])
        tests.append(lambda ctx: required(ctx.diagnoses))
    return tuple(tests)


def contradictions(docs: list[_Doc]) -> list[str]:
    """Policies of one payer that name the same codes under the same ``when`` but disagree.

    Most restrictive wins, so such a pair is decided; but an author who lists ``72148`` as
    ``pa_required: true`` in one policy and ``false`` in another, under identical tests, meant
    one of them. Overlaps by *nesting* (a code or narrower range inside a wider range) are
    refinements and stay allowed; identical entries and partly overlapping ranges are errors.
    Found by a sweep over sorted intervals per (code class, ``when``): O(n log n) in entries.
    """
    entries: dict[tuple[str, str], list[tuple[int, int, str, str, str]]] = defaultdict(list)
    for doc in docs:
        for p, raw in enumerate(doc.data.get("policies", [])):
            when = json.dumps(raw.get("when", {}), sort_keys=True)
            where = f"{doc.name}:{_line_of(doc.root, ['policies', p])}"
            pa = PA_VALUES[raw["pa_required"]]
            for system, specs in raw["codes"].items():
                for spec in specs:
                    parsed = parse_code_spec(system, spec)
                    if isinstance(parsed, str):
                        key = code_key(system, parsed)
                        if key is None:
                            continue
                        klass, start, end = key[0], key[1], key[1]
                    else:
                        klass, start, end = parsed
                    entries[(klass, when)].append((start, end, pa, raw["id"], f"{where}|{spec}"))
    out: list[str] = []
    for group in entries.values():
        group.sort()
        open_: list[tuple[int, int, str, str, str]] = []
        for entry in group:
            start, end, pa, pid, tag = entry
            open_ = [e for e in open_ if e[1] >= start]
            for other in open_:
                o_start, o_end, o_pa, o_id, o_tag = other
                if o_pa == pa or o_id == pid:
                    continue
                nested = (o_start <= start and end <= o_end) or (start <= o_start and o_end <= end)
                if nested and (o_start, o_end) != (start, end):
                    continue
                where, spec = tag.split("|")
                o_where, o_spec = o_tag.split("|")
                out.append(
                    f"{where}: policy {pid!r} ({spec}, {pa}) contradicts {o_id!r} at {o_where} "
                    f"({o_spec}, {o_pa}): same codes under the same `when`; split the codes "
                    "or add a `when` test"
                )
            open_.append(entry)
    return out
