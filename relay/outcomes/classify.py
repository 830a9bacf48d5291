"""Bounce classification: every failure gets one of Momentum's bounce classes.

The classes are Momentum's published bounce classification codes (``BOUNCE_CLASSES``:
1 Undetermined, 10 Invalid Recipient, 20 Soft Bounce, 21 DNS Failure, 22 Mailbox Full,
... 100 Challenge-Response), so reports and webhooks speak the same language as
Momentum/SparkPost tooling. A ``Classifier`` is compiled once from ordered rules and is
pure: ``classify(code, enhanced, text, scope)`` -> ``Classification(bounce_class, rule)``.

Rules (TOML; the shipped defaults are ``relay/outcomes/bounce_rules.toml``)::

    [[rules]]
    id = "gmail-no-such-user"      # unique in its file; events carry it as bounce_rule
    class = 10                     # a class code, or its name ("Invalid Recipient")
    code = "550"                   # optional: "550", "55x", "5xx", "4xx", "none" (an
                                   # out-of-band text without a reply code), or a list
    enhanced = "5.1.1"             # optional: "5.1.1", "5.7.*", "*.2.2", "none", or a list
    regex = 'does not exist'       # optional: searched in the reply text, ignoring case
    provider = "google"            # optional: only for these providers/domains (a name as
                                   # in [outbound.providers.NAME], or a recipient domain)

A rule matches when every condition it has holds; the first matching rule wins. The
operator's file (``[bounces] rules``) is read before the defaults (``defaults = false``
at its top drops them). The defaults are ordered: providers' documented replies, the
relay's own local failures, strong text signals, then RFC 3463's enhanced codes, weak
text signals, and a last fallback by reply code. Nothing matching at all gives 70
(Transient Failure) for a 4xx and 1 (Undetermined) otherwise, with ``rule`` None.

Speed (``bench_classify``; measured over tests/data/bounce_corpus.toml: about 4-5 us per
classification of a reply never seen before, 0.3 us for a repeated one). Per (reply
code, enhanced code, scope) the rules that can apply are selected once and cached; a
rule without a regex ends that list. Each rule's regex is compiled twice: ignoring case
(for any text), and folded to lower case, split into its top-level alternatives, each
searched in the lower-cased text (ASCII text: the same matches, several times cheaper,
and a literal start the regex engine finds by substring search). From each alternative
the words any match must contain are read off the pattern; a text is split into its
words once, and one set intersection picks the few alternatives worth searching, in
rule order (a pattern whose words cannot be known is always searched). Results of
recent texts are memoised.

Choices: an expiration is 24 (Timeout), as Momentum logs it ("554 5.4.7 [internal]
exceeded max time without delivery"); a local failure of the relay's own TLS policy is
25 (Admin Failure); connection refused is 70, a timeout 24, a DNS failure (NXDOMAIN,
lookup errors, no usable MX address) 21, a null MX 10.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "BOUNCE_CLASSES",
    "EXPIRED",
    "Classification",
    "Classifier",
    "Rule",
    "RulesError",
    "bench_classify",
    "class_name",
    "compile_rules",
    "default_classifier",
    "load_classifier",
    "parse_reply_line",
    "parse_rules",
    "scope_of",
]

#: Momentum's bounce classification codes and names
#: (https://support.sparkpost.com/momentum/3/3-reference/3-reference-bounce-logger-classification-codes).
BOUNCE_CLASSES: dict[int, str] = {
    1: "Undetermined",
    10: "Invalid Recipient",
    20: "Soft Bounce",
    21: "DNS Failure",
    22: "Mailbox Full",
    23: "Too Large",
    24: "Timeout",
    25: "Admin Failure",
    30: "No RCPT",
    40: "Generic Bounce",
    50: "Mail Block",
    51: "Spam Block",
    52: "Spam Content",
    53: "Prohibited Attachment",
    54: "Relaying Denied",
    60: "Auto-Reply",
    70: "Transient Failure",
    80: "Subscribe",
    90: "Unsubscribe",
    100: "Challenge-Response",
}

#: Accepted spellings of class names in rule files (lower case, letters and digits only).
_CLASS_ALIASES: dict[str, int] = {
    **{re.sub(r"[^a-z0-9]", "", name.lower()): code for code, name in BOUNCE_CLASSES.items()},
    "soft": 20, "generic": 40, "genericbounce": 40, "genericbouncenorcpt": 30,
    "relaydenied": 54, "transient": 70, "autoreply": 60, "challengeresponse": 100,
}


def class_name(bounce_class: int) -> str:
    """``10`` -> ``"Invalid Recipient"`` ("Unknown" for a code that is not a class)."""
    return BOUNCE_CLASSES.get(bounce_class, "Unknown")


class Classification(NamedTuple):
    """The verdict: a class of ``BOUNCE_CLASSES`` and the id of the rule that decided it
    (None: no rule matched, the built-in last resort did)."""

    bounce_class: int
    rule: str | None

    @property
    def name(self) -> str:
        return class_name(self.bounce_class)

    def __str__(self) -> str:
        rule = f"rule {self.rule}" if self.rule else "no rule matched"
        return f"{self.bounce_class} {self.name} ({rule})"


#: The verdict on an expiration (Momentum logs expired messages as 24, Timeout).
EXPIRED = Classification(24, "expired")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, the rule (index and
    id) and the key, e.g. ``my-rules.toml: rules[2] (id "acme"): regex: ...``."""


# --------------------------------------------------------------------------- rules


class _RuleSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    class_: int | str = msgspec.field(name="class")
    code: int | str | list[int | str] | None = None
    enhanced: str | list[str] | None = None
    regex: str | None = None
    provider: str | list[str] | None = None
    #: Free text for people (where the reply is documented); ignored.
    note: str = ""


class _RulesFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: In an operator's file: false drops the shipped defaults.
    defaults: bool = True
    rules: list[_RuleSpec] = msgspec.field(default_factory=list)


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """One compiled rule (see the module docstring for the file format).

    ``codes``: (low, high) reply code ranges, 0 meaning "no reply code"; ``enhanced``:
    (class, subject, detail) patterns with None as a wildcard, or ``None`` for "no
    enhanced code"; ``providers``: lower-case scope names. An empty ``codes``,
    ``enhanced`` or ``providers`` is a condition not checked."""

    id: str
    bounce_class: int
    codes: tuple[tuple[int, int], ...] = ()
    enhanced: tuple[tuple[int, int, int] | tuple[int | None, int | None, int | None] | None,
                    ...] = ()
    regex: str | None = None
    providers: frozenset[str] = frozenset()
    #: Where it came from ("bounce_rules.toml rules[12]"), for people.
    origin: str = ""

    def applies(self, code: int, enhanced: tuple[int, int, int] | None,
                scope: frozenset[str]) -> bool:
        """Whether the rule's code, enhanced-code and provider conditions hold (the regex
        is checked by the ``Classifier``)."""
        if self.codes and not any(lo <= code <= hi for lo, hi in self.codes):
            return False
        if self.enhanced and not any(_enhanced_matches(p, enhanced) for p in self.enhanced):
            return False
        return not self.providers or bool(self.providers & scope)


def _enhanced_matches(pattern: tuple[int | None, int | None, int | None] | None,
                      enhanced: tuple[int, int, int] | None) -> bool:
    if pattern is None or enhanced is None:
        return pattern is None and enhanced is None
    return all(p is None or p == e for p, e in zip(pattern, enhanced, strict=True))


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")
_CODE_RE = re.compile(r"^([245])([0-9x])([0-9x])$", re.IGNORECASE)
_ENHANCED_PART = r"(\*|[0-9]{1,3})"
_ENHANCED_RE = re.compile(rf"^(\*|[245])\.{_ENHANCED_PART}\.{_ENHANCED_PART}$")
_BACKREF_RE = re.compile(r"\\[1-9]|\(\?P=")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _parse_class(value: int | str) -> int:
    if isinstance(value, int):
        if value not in BOUNCE_CLASSES:
            raise ValueError(f"unknown bounce class {value} (one of "
                             f"{', '.join(str(c) for c in BOUNCE_CLASSES)})")
        return value
    code = _CLASS_ALIASES.get(re.sub(r"[^a-z0-9]", "", value.lower()))
    if code is None:
        raise ValueError(f"unknown bounce class {_quote(value)} (a code such as 10, or a "
                         f"name such as \"Invalid Recipient\")")
    return code


def _parse_code(value: int | str) -> tuple[int, int]:
    text = str(value).strip().lower()
    if text == "none":
        return (0, 0)
    m = _CODE_RE.match(text)
    if not m:
        raise ValueError(f"{_quote(str(value))} is not a reply code (\"550\", \"55x\", "
                         f"\"5xx\", \"none\")")
    if m.group(2) == "x" and m.group(3) != "x":
        raise ValueError(f"{_quote(str(value))}: only trailing digits may be x")
    lo = int(text.replace("x", "0"))
    hi = int(text.replace("x", "9"))
    return (lo, hi)


def _parse_enhanced(value: str) -> tuple[int | None, int | None, int | None] | None:
    text = value.strip().lower()
    if text == "none":
        return None
    m = _ENHANCED_RE.match(text)
    if not m:
        raise ValueError(f"{_quote(value)} is not an enhanced status code pattern "
                         f"(\"5.1.1\", \"5.7.*\", \"*.2.2\", \"none\")")
    parts = tuple(None if g == "*" else int(g) for g in m.groups())
    return parts  # type: ignore[return-value]


def _check_regex(pattern: str) -> None:
    if _BACKREF_RE.search(pattern):
        raise ValueError("backreferences are not supported")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    try:
        re.compile(f"(?:{pattern})", re.IGNORECASE)  # as the classifier embeds it
    except re.error:
        raise ValueError("global flags such as (?i) are not supported (rules ignore case; "
                         "use a scoped group like (?-i:...))") from None
    if compiled.groupindex:
        raise ValueError("named groups are not supported (use (...) or (?:...))")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_rules(data: bytes | str, source: str) -> tuple[list[Rule], bool]:
    """Validate a rules file's text: its rules in order, and whether the defaults still
    apply after them (``defaults``). Raises ``RulesError`` naming ``source``, the rule
    (index and id) and the key."""
    try:
        raw = tomllib.loads(data.decode() if isinstance(data, bytes) else data)
    except UnicodeDecodeError:
        raise RulesError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None
    try:
        spec = msgspec.convert(raw, type=_RulesFile)
    except msgspec.ValidationError as e:
        raise RulesError(f"{source}: {_explain(raw, str(e))}") from None
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(spec.rules):
        where = f"rules[{i}] (id {_quote(r.id)})"

        def fail(key: str, reason: str, where: str = where) -> RulesError:
            return RulesError(f"{source}: {where}: {key}: {reason}")

        if not _ID_RE.match(r.id):
            raise fail("id", "must be 1 to 100 letters, digits or ._:/- (starting with a "
                             "letter or digit)")
        if r.id in seen:
            raise fail("id", f"the same id as rules[{seen[r.id]}]")
        seen[r.id] = i
        try:
            bounce_class = _parse_class(r.class_)
        except ValueError as e:
            raise fail("class", str(e)) from None
        try:
            codes = tuple(_parse_code(c) for c in _as_list(r.code))
        except ValueError as e:
            raise fail("code", str(e)) from None
        try:
            enhanced = tuple(_parse_enhanced(p) for p in _as_list(r.enhanced))
        except ValueError as e:
            raise fail("enhanced", str(e)) from None
        if r.regex is not None:
            try:
                _check_regex(r.regex)
            except ValueError as e:
                raise fail("regex", str(e)) from None
        providers = []
        for p in _as_list(r.provider):
            name = p.strip().lower().removeprefix("provider:").rstrip(".")
            if not name:
                raise fail("provider", "must not be empty")
            providers.append(name)
        rules.append(Rule(id=r.id, bounce_class=bounce_class, codes=codes, enhanced=enhanced,
                          regex=r.regex or None, providers=frozenset(providers),
                          origin=f"{source} rules[{i}]"))
    return rules, spec.defaults


def _explain(raw: Any, message: str) -> str:
    """msgspec's ``Expected `int | str`, got `float` - at `$.rules[3].class``` in the
    words of the other config errors: ``rules[3] (id "x"): class: expected ...``."""
    text, _, path = message.partition(" - at `")
    path = path.rstrip("`").removeprefix("$.").removeprefix("$")
    m = re.match(r"^rules\[(\d+)\]\.?(.*)$", path)
    text = text[:1].lower() + text[1:]
    text = text.replace("`", "")
    if m:
        i = int(m.group(1))
        rid = ""
        with contextlib.suppress(KeyError, IndexError, TypeError):
            rid = f" (id {_quote(str(raw['rules'][i]['id']))})"
        key = m.group(2) or "rule"
        if text.startswith("object contains unknown field"):
            return f"rules[{i}]{rid}: {text.split('field ')[-1].strip(' `')}: unknown key"
        return f"rules[{i}]{rid}: {key}: {text}"
    if text.startswith("object contains unknown field"):
        return f"{text.split('field ')[-1].strip(' `')}: unknown key"
    return f"{path or 'file'}: {text}"


# --------------------------------------------------------------------------- classifier


#: ASCII text -> its tokens: letters lower-cased, everything but [a-z0-9] a separator.
_TOKEN_TABLE = bytes(
    c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32
    for c in range(256))


class _Compiled:
    """A rule's regex, compiled for both paths. ``slow`` ignores case (any text).
    ``parts``: for ASCII text, each top-level alternative of the regex folded to lower
    case (searched in the lower-cased text: the same matches, several times cheaper),
    with its triggers: tokens (bytes) and substrings (str) of which the text must
    contain one for that alternative to match, or None (always try it). ``parts`` is
    None when folding is not safe (the slow pattern is used for every text)."""

    __slots__ = ("parts", "slow")

    def __init__(self, regex: str) -> None:
        self.slow = re.compile(f"(?:{regex})", re.IGNORECASE)
        self.parts: list[tuple[re.Pattern[str], list[_Clause]]] | None = None
        folded = _fold_pattern(regex)
        if folded is None:
            return
        parts = []
        for branch in _split_branches(folded):
            parts.append((re.compile(f"(?:{_prefix_first(branch)})"),
                          _analyze(branch, False, False)))
        self.parts = parts


_LEADING_WORD_RE = re.compile(r"\\b([a-z0-9_][a-z0-9_ ,:;'\"<>=@/%&!~`-]*)")


def _prefix_first(branch: str) -> str:
    """``\\bfoo bar...`` -> ``foo bar(?<!\\w[\\s\\S]{7})...``: the same matches, but the
    pattern starts with its literal text, which the regex engine finds with a fast
    substring search (a leading ``\\b`` makes it try every position)."""
    m = _LEADING_WORD_RE.match(branch)
    if not m:
        return branch
    run = m.group(1)
    rest = branch[m.end():]
    if rest[:1] in ("?", "*", "+", "{"):  # the last character is quantified
        run, rest = run[:-1], run[-1] + rest
    if not run:
        return branch
    return f"{run}(?<!\\w[\\s\\S]{{{len(run)}}}){rest}"


def _split_branches(pattern: str) -> list[str]:
    """``a|b(c|d)|[|]`` -> ``["a", "b(c|d)", "[|]"]``: the top-level alternatives."""
    branches: list[str] = []
    depth = 0
    in_class = False
    start = i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":
                i += 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return branches


def _fold_pattern(pattern: str) -> str | None:
    """``pattern`` with its literal letters lower-cased, for a case-sensitive search of
    lower-cased ASCII text; None where that could change what matches (non-ASCII, an
    escape that names a character, inline flags, an upper-case letter in a class)."""
    if not pattern.isascii():
        return None
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1:i + 2]
            if nxt in ("x", "u", "U", "N") or nxt.isdigit():
                return None
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            elif ch.isupper():
                return None
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            out.append(ch)
            i += 1
            # A "]" right after "[" or "[^" is a literal member.
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i:i + 1] == "]":
                out.append("]")
                i += 1
            continue
        if ch == "(" and pattern[i + 1:i + 2] == "?":
            nxt = pattern[i + 2:i + 3]
            if (nxt.isalpha() and nxt != "P") or nxt == "-":
                return None  # inline flags, e.g. (?-i:...)
            out.append("(?")
            i += 2
            continue
        out.append(ch.lower())
        i += 1
    return "".join(out)


_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
#: Markers in a sequence's sketch: a character (or edge) that is surely not a letter or
#: digit, and one that may be anything.
_SEP, _ANY = "\x00", "\x01"
#: Words in most replies: poor triggers (a rule's rarer word or substring is preferred).
_COMMON_WORDS = frozenset({
    "a", "an", "the", "is", "are", "be", "been", "has", "have", "was", "to", "of", "for", "in",
    "on", "at", "or", "and", "not", "no", "by", "this", "that", "with", "from", "as", "it",
    "your", "you", "our", "we", "please", "mail", "email", "message", "address", "recipient",
    "sender", "server", "smtp", "user", "domain", "rejected", "denied", "error", "ip",
    "blocked", "access", "sending", "policy", "messages", "host", "system", "exceeded",
    "visit", "client", "because", "mx", "again", "connection", "temporarily", "rate",
    "detected", "accepted", "record", "account", "delivery", "more", "information", "see",
    "protect", "users", "try", "later", "http", "https", "www", "com", "net", "org", "service",
    "unavailable", "limited", "requires", "failed", "found", "does", "can", "will", "all",
    "only",
})
_ENCLOSED_RE = re.compile(r"(?<=[^a-z0-9\x01])[a-z0-9]+(?=[^a-z0-9\x01])")
_RUN_RE = re.compile(r"[^\x00\x01]+")


def _atoms(branch: str) -> list[tuple[str, str, int | None]]:
    """A branch (no top-level ``|``) as (kind, value, least repeat count or None when
    not quantified). Kinds: "lit" (a character), "sep" (surely not [a-z0-9], or a
    boundary), "any" (anything, or something this sketch does not model), "group"
    (value: the group's inside)."""
    atoms: list[tuple[str, str, int | None]] = []
    i, n = 0, len(branch)
    while i < n:
        ch = branch[i]
        if ch == "\\":
            e = branch[i + 1:i + 2]
            i += 2
            if e in ("b", "A", "Z", "s", "W"):
                atom = ("sep", e)
            elif e.isalnum() and e not in "ntrfva":
                atom = ("any", e)
            else:
                atom = ("lit", {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v",
                                "a": "\a"}.get(e, e))
        elif ch == "[":
            j = i + 1
            negated = branch[j:j + 1] == "^"
            j += negated
            if branch[j:j + 1] == "]":
                j += 1
            members = []
            while j < n and branch[j] != "]":
                if branch[j] == "\\":
                    members.append(branch[j:j + 2])
                    j += 2
                else:
                    members.append(branch[j])
                    j += 1
            i = j + 1
            plain = all((len(m) == 1 and m not in _WORD_CHARS and m != "-")
                        or m in ("\\s", "\\W") or (len(m) == 2 and not m[1].isalnum())
                        for m in members)
            atom = ("sep" if plain and not negated and members else "any", "")
        elif ch == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                c = branch[j]
                if c == "\\":
                    j += 1
                elif c == "[":
                    j += 1
                    if branch[j:j + 1] == "^":
                        j += 1
                    if branch[j:j + 1] == "]":
                        j += 1
                    while j < n and branch[j] != "]":
                        j += 2 if branch[j] == "\\" else 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                j += 1
            inner = branch[i + 1:j - 1]
            i = j
            if inner.startswith("?:"):
                atom = ("group", inner[2:])
            elif inner.startswith("?"):
                atom = ("any", "")  # a lookaround or extension: not modelled
            else:
                atom = ("group", inner)
        elif ch in "^$":
            atom = ("sep", ch)
            i += 1
        elif ch == ".":
            atom = ("any", ".")
            i += 1
        else:
            atom = ("lit", ch)
            i += 1
        least: int | None = None
        if i < n and branch[i] in "?*+{":
            q = branch[i]
            if q == "{":
                close = branch.find("}", i)
                m = re.match(r"\{(\d*)(,\d*)?\}", branch[i:close + 1]) if close > 0 else None
                if m is None:  # a literal "{"
                    atoms.append((atom[0], atom[1], None))
                    atoms.append(("lit", "{", None))
                    i += 1
                    continue
                least = int(m.group(1) or 0)
                i = close + 1
            else:
                least = 1 if q == "+" else 0
                i += 1
            if i < n and branch[i] in "?+":  # lazy or possessive
                i += 1
        atoms.append((atom[0], atom[1], least))
    return atoms


_Clause = frozenset[bytes | str]


def _analyze(branch: str, left_sep: bool, right_sep: bool) -> list[_Clause]:
    """What every text a pattern (folded to lower case) matches must contain, as clauses,
    best first: each clause is a set of tokens (bytes: words enclosed by separators,
    found with one set lookup per text) or substrings (str: literal runs, an ``in`` test
    each), one of which is present; every clause holds. [] = nothing known.
    ``left_sep``/``right_sep``: what surrounds it is surely not [a-z0-9]."""
    branches = _split_branches(branch)
    if len(branches) > 1:
        union = _union([_analyze(b, left_sep, right_sep) for b in branches])
        return [union] if union is not None else []
    atoms = _atoms(branch)
    sketch = [_SEP if left_sep else _ANY]
    clauses: list[_Clause] = []
    for j, (kind, value, least) in enumerate(atoms):
        if kind == "lit":
            if least is None:
                sketch.append(value)
            else:
                sketch.append(_SEP if least >= 1 and value not in _WORD_CHARS else _ANY)
        elif kind == "sep":
            sketch.append(_SEP if least is None or (least >= 1 and value in "sW") else _ANY)
        elif kind == "group":
            sketch.append(_ANY)
            inner: list[_Clause] = []
            if least is None:
                left = sketch[-2] not in _WORD_CHARS and sketch[-2] != _ANY
                if j + 1 < len(atoms):
                    nk, nv, nq = atoms[j + 1]
                    right = ((nk == "sep" and (nq is None or (nq >= 1 and nv in "sW")))
                             or (nk == "lit" and nv not in _WORD_CHARS
                                 and (nq is None or nq >= 1)))
                else:
                    right = right_sep
                inner = _analyze(value, left, right)
            elif least >= 1:
                inner = _analyze(value, False, False)
            clauses.extend(inner)
        else:
            sketch.append(_ANY)
    sketch.append(_SEP if right_sep else _ANY)
    text = "".join(sketch)
    clauses.extend(frozenset([w.encode()]) for w in set(_ENCLOSED_RE.findall(text)))
    runs = [r for r in _RUN_RE.findall(text) if len(r) >= 4]
    if runs:
        clauses.append(frozenset([max(runs, key=len)]))
    return sorted(set(clauses), key=_clause_rank)


def _clause_rank(clause: _Clause) -> tuple[int, int, str]:
    """Rarer first: one uncommon word, a set of words (smaller first), one common word,
    a substring (longer first), a mixed set."""
    words = [t for t in clause if isinstance(t, bytes)]
    key = ",".join(sorted(str(t) for t in clause))
    if len(words) == len(clause):
        if len(clause) == 1:
            w = words[0]
            return (0 if w.decode() not in _COMMON_WORDS else 2, -len(w), key)
        return (1, len(clause), key)
    if not words and len(clause) == 1:
        return (3, -len(next(iter(clause))), key)
    return (4, len(clause), key)


def _union(parts: list[list[_Clause]]) -> _Clause | None:
    """The one clause an alternation of parts guarantees: the union of each part's best
    clause (None if some part guarantees nothing)."""
    if not parts or any(not p for p in parts):
        return None
    return frozenset().union(*(p[0] for p in parts))


class _Group:
    """The rules that can apply to one (code, enhanced, scope), in order, and the verdict
    when none matches. For ASCII text the rules' alternatives are tried in order among
    the candidates only: those whose triggers the text contains (bit i = part i)."""

    __slots__ = ("always", "parts", "rules", "slow", "substrings", "terminal", "tokens")

    def __init__(self, rules: list[Rule], compiled: list[_Compiled],
                 terminal: Classification) -> None:
        self.rules = rules
        self.terminal = terminal
        self.slow = [c.slow for c in compiled]
        #: (pattern searched in the lower-cased text, or None: the slow one in the text;
        #: the rule's index in ``rules``)
        self.parts: list[tuple[re.Pattern[str] | None, int]] = []
        self.always = 0
        # A token's bits: parts for which it satisfies the first clause, the second.
        tokens: dict[bytes, list[int]] = {}
        substrings: dict[str, int] = {}
        for r, comp in enumerate(compiled):
            for pattern, clauses in comp.parts or [(None, [])]:
                bit = 1 << len(self.parts)
                self.parts.append((pattern, r))
                if not clauses:
                    self.always |= bit
                    continue
                first = clauses[0]
                second = clauses[1] if len(clauses) > 1 else None
                if second is not None and all(isinstance(t, bytes) for t in first | second):
                    for t in first:
                        tokens.setdefault(t, [0, 0])[0] |= bit  # type: ignore[index]
                    for t in second:
                        tokens.setdefault(t, [0, 0])[1] |= bit  # type: ignore[index]
                    continue
                for t in first:
                    if isinstance(t, bytes):
                        pair = tokens.setdefault(t, [0, 0])
                        pair[0] |= bit
                        pair[1] |= bit
                    else:
                        substrings[t] = substrings.get(t, 0) | bit
        self.tokens = {t: (a, b) for t, (a, b) in tokens.items()}
        self.substrings = tuple(substrings.items())

    def match(self, text: str) -> Classification:
        """The first rule, in order, whose regex is found in ``text``."""
        if not text.isascii():
            for r, pattern in enumerate(self.slow):
                if pattern.search(text):
                    return self._verdict(r)
            return self.terminal
        lowered = text.lower()
        candidates = self.always
        tokens = self.tokens
        if tokens:
            first = second = 0
            for t in tokens.keys() & lowered.encode().translate(_TOKEN_TABLE).split():
                a, b = tokens[t]
                first |= a
                second |= b
            candidates |= first & second
        for s, bits in self.substrings:
            if s in lowered:
                candidates |= bits
        parts = self.parts
        while candidates:
            low = candidates & -candidates
            pattern, r = parts[low.bit_length() - 1]
            if (pattern.search(lowered) if pattern is not None
                    else self.slow[r].search(text)):
                return self._verdict(r)
            candidates ^= low
        return self.terminal

    def _verdict(self, r: int) -> Classification:
        rule = self.rules[r]
        return Classification(rule.bounce_class, rule.id)


class Classifier:
    """Rules compiled once (see the module docstring); pure and deterministic (its caches
    only save work). ``classify`` costs a few microseconds (``bench_classify``)."""

    def __init__(self, rules: Sequence[Rule], *, cache_size: int = 4096) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        #: Every provider/domain name some rule is scoped to (others never matter).
        self._scope_names = frozenset().union(*(r.providers for r in self.rules))
        #: (code, enhanced, scope) -> the rules that can apply (built when first met).
        self._groups: dict[tuple[int, str | None, frozenset[str]], _Group] = {}
        self._results: dict[tuple[int, str | None, str, frozenset[str]], Classification] = {}
        self._cache_size = cache_size
        #: Each rule's regex compiled once (shared by every group it is in).
        self._compiled: dict[int, _Compiled] = {
            i: _Compiled(r.regex) for i, r in enumerate(self.rules) if r.regex is not None}

    def __len__(self) -> int:
        return len(self.rules)

    def classify(self, code: int, enhanced: str | None, text: str,
                 scope: Iterable[str] = ()) -> Classification:
        """The class of a failure: reply ``code`` (0: none, e.g. an out-of-band message),
        ``enhanced`` status ("5.1.1" or None), the reply ``text`` without them, and the
        ``scope`` names it was delivered under (a provider name, the recipient domain:
        ``scope_of``)."""
        names = self._scope_names
        relevant = frozenset(s for s in scope if s in names) if names else _NO_SCOPE
        key = (code, enhanced, text, relevant)
        results = self._results
        hit = results.get(key)
        if hit is not None:
            return hit
        gkey = (code, enhanced, relevant)
        group = self._groups.get(gkey)
        if group is None:
            if len(self._groups) >= 4096:  # odd enhanced codes from odd servers: bounded
                self._groups.clear()
            group = self._groups[gkey] = self._group(code, _enhanced_parts(enhanced),
                                                     relevant)
        verdict = group.match(text) if group.rules else group.terminal
        if len(results) >= self._cache_size:
            results.clear()
        results[key] = verdict
        return verdict

    def classify_line(self, line: str, scope: Iterable[str] = ()) -> Classification:
        """The class of a reply as one line (``"550 5.1.1 <x@y>: user unknown"``, a DSN's
        ``"smtp; 550-5.1.1 ..."``); a line without a reply code is an out-of-band text
        (an auto-reply's subject, ...), classified with code 0."""
        code, enhanced, text = parse_reply_line(line)
        return self.classify(code, enhanced, text, scope)

    def classify_outcome(self, code: int, enhanced: str | None, text: str,
                         scope: Iterable[str] = ()) -> Classification:
        """As ``classify``, but a local reason that quotes the server's reply (``host
        mx[ip] refused to talk to me: 554 5.7.1 ...``) is classified by that reply."""
        if "refused to talk to me: " in text:
            inner = text.split("refused to talk to me: ", 1)[1]
            icode, ienhanced, itext = parse_reply_line(inner)
            if icode:
                return self.classify(icode, ienhanced, itext, scope)
        return self.classify(code, enhanced, text, scope)

    def _group(self, code: int, enhanced: tuple[int, int, int] | None,
               scope: frozenset[str]) -> _Group:
        alternatives: list[Rule] = []
        compiled: list[_Compiled] = []
        terminal = _last_resort(code)
        for i, rule in enumerate(self.rules):
            if not rule.applies(code, enhanced, scope):
                continue
            if rule.regex is None:
                terminal = Classification(rule.bounce_class, rule.id)
                break
            alternatives.append(rule)
            compiled.append(self._compiled[i])
        return _Group(alternatives, compiled, terminal)


_NO_SCOPE: frozenset[str] = frozenset()


def _enhanced_parts(enhanced: str | None) -> tuple[int, int, int] | None:
    """``"5.1.1"`` -> ``(5, 1, 1)``; None for None or something else."""
    parts = enhanced.split(".") if enhanced else []
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        return None
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def _last_resort(code: int) -> Classification:
    return Classification(70 if 400 <= code < 500 else 1, None)


# --------------------------------------------------------------------------- parsing

_LINE_RE = re.compile(
    r"^\s*(?:smtp\s*;\s*)?([2-5][0-9][0-9])(?:[ -]+|$)(?:#?([245])\.([0-9]{1,3})\.([0-9]{1,3})"
    r"(?:\s+|$))?(.*)$",
    re.IGNORECASE | re.DOTALL,
)


def parse_reply_line(line: str) -> tuple[int, str | None, str]:
    """``"550-5.1.1 The email ... 550-5.1.1 double-checking ..."`` -> ``(550, "5.1.1",
    "The email ... double-checking ...")``: continuation prefixes repeated inside a
    pasted multi-line reply are removed. No reply code: ``(0, None, line)``."""
    m = _LINE_RE.match(line)
    if not m:
        return 0, None, line.strip()
    code = int(m.group(1))
    enhanced = f"{m.group(2)}.{m.group(3)}.{m.group(4)}" if m.group(2) else None
    text = m.group(5)
    prefix = rf"\s{code}[ -]" + (rf"(?:{re.escape(enhanced)}\s)?" if enhanced else "")
    text = re.sub(prefix, " ", " " + text).strip()
    return code, enhanced, " ".join(text.split())


def scope_of(destination: str, domain: str = "") -> tuple[str, ...]:
    """The scope names of a delivery: its provider's name (destination ``provider:NAME``)
    or destination domain, and the recipient's domain."""
    dest = destination.lower().removeprefix("provider:")
    domain = domain.lower().rstrip(".")
    return (dest,) if not domain or domain == dest else (dest, domain)


# --------------------------------------------------------------------------- loading

#: The shipped defaults, package data next to this module.
DEFAULT_RULES = "bounce_rules.toml"


@functools.lru_cache(maxsize=1)
def _default_rules() -> tuple[Rule, ...]:
    data = resources.files(__package__).joinpath(DEFAULT_RULES).read_bytes()
    rules, _ = parse_rules(data, DEFAULT_RULES)
    return tuple(rules)


def compile_rules(operator: Sequence[Rule] = (), *, defaults: bool = True) -> Classifier:
    """A classifier of ``operator`` rules followed by the shipped defaults."""
    return Classifier([*operator, *(_default_rules() if defaults else ())])


@functools.lru_cache(maxsize=1)
def default_classifier() -> Classifier:
    """The shipped defaults alone (compiled once per process)."""
    return compile_rules()


_loaded: dict[str, tuple[bytes, Classifier]] = {}


def load_classifier(path: str | os.PathLike[str] | None) -> Classifier:
    """The classifier of an operator's rules file before the defaults ("" or None: the
    defaults alone). A file whose bytes did not change since the last call gives the
    same compiled classifier (a config check and the engine then compile it once).
    Raises ``RulesError`` (the file named) if it cannot be read or is invalid."""
    if not path:
        return default_classifier()
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RulesError(f"{name}: cannot read bounce rules: {e.strerror or e}") from None
    cached = _loaded.get(name)
    if cached is not None and cached[0] == data:
        return cached[1]
    rules, defaults = parse_rules(data, name)
    classifier = compile_rules(rules, defaults=defaults)
    if len(_loaded) >= 16:
        _loaded.clear()
    _loaded[name] = (data, classifier)
    return classifier


def bench_classify(classifier: Classifier, cases: Sequence[tuple[int, str | None, str,
                                                                 tuple[str, ...]]],
                   *, rounds: int = 20, cached: bool = False) -> float:
    """Mean microseconds per ``classify`` over ``cases`` (code, enhanced, text, scope).
    ``cached=False`` clears the result memo before every call (the cost of a reply never
    seen before); the compiled rule groups stay, as in a running relay."""
    for c in cases:  # warm the groups
        classifier.classify(*c)
    results = classifier._results
    start = time.perf_counter()
    for _ in range(rounds):
        for c in cases:
            if not cached:
                results.clear()
            classifier.classify(*c)
    elapsed = time.perf_counter() - start
    return elapsed / (rounds * len(cases)) * 1e6
