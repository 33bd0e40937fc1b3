"""Content safety rules: the prompt block lists, and what happens to an image the worker's
classifier flagged. Pure Python: the only I/O is reading the block list TOML files.

The block lists are data, `blocklists.toml` next to this module (its header describes the
shape). An operator's override file of the same shape adds terms and categories, and its
`[allow] terms` take false positives off. `PromptPolicy.load` reads and checks both once, at
start-up; a mistake raises `BlocklistError` with one line naming the file and the list.

Matching is on whole words and phrases, after the prompt and every list entry are normalised
the same way (`_fold`, `_Tokens`):

- Unicode NFKC (fullwidth and styled letters become plain), casefold, Latin diacritics
  stripped (nùdé = nude), invisible format characters dropped (zero-width space, ZWJ, ZWNJ,
  soft hyphen, bidi marks), common Cyrillic and Greek look-alike letters mapped to Latin,
  Devanagari nukta dropped and chandrabindu read as anusvara (कपड़े = कपडे, गाँधी = गांधी).
- Words are runs of letters, marks (Devanagari vowel signs and virama are part of the word)
  and digits; everything else, underscores and dots included, separates words.
- Leetspeak, in a word that has at least one letter: 0→o 1→i 3→e 4→a 5→s 7→t @→a $→s (s3x,
  n@ked, p0rn). A number alone ("5 star", "13 year old") stays a number.
- Letters spelled out one by one ("n.u.d.e", "n u d e", "s-e-x") are joined and searched for
  any entry; a word broken by punctuation ("nu.de", "child-porn") is also read joined up.
- A word with some letter written three or more times in a row ("seeexxxy", "naaaked") is
  compared with every run of a letter squeezed to one ("sexy", "naked"); other words must
  match exactly, so "bobs" is not "boobs" and "xx" is not "xxx".
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from chitrakar.domain import CommandError

# safety.py -> blocklists.toml, the package data file beside this module.
BUILTIN_BLOCKLISTS = Path(__file__).with_name("blocklists.toml")

PROMPT_BLOCKED_KEY = "safety.prompt_blocked"

# When a prompt matches several categories, the audit log gets the most serious one.
CATEGORY_ORDER = ("minors", "sexual", "violence_gore", "self_harm", "hate", "denylist")

ALLOW = "allow"
TOGETHER = "together"
_CATEGORY_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,8}")
MAX_TERM_CHARS = 100
# Spelled-out letters are searched for entries at least this long (joined up): shorter ones
# would turn up by chance in a run of initials.
_MIN_SPELLED_CHARS = 3


class BlocklistError(ValueError):
    """A block list file that cannot be used. The message is one line for a start-up log."""


@dataclass(frozen=True)
class PromptVerdict:
    blocked: bool
    category: str | None = None
    # The list entry that matched, for the audit log; never shown to the user.
    term: str | None = None


ALLOWED = PromptVerdict(blocked=False)


class PromptBlocked(CommandError):
    """A prompt the block lists refuse. The user is told only that the request is not
    allowed: the text key has no parameters, and the verdict rides along for the audit log."""

    def __init__(self, verdict: PromptVerdict | None = None) -> None:
        super().__init__(PROMPT_BLOCKED_KEY)
        self.verdict = verdict


class ContentPolicy(StrEnum):
    """What a deployment does with an image the output classifier flagged."""

    BLOCK = "block"
    SPOILER = "spoiler"
    ALLOW = "allow"


class ImageAction(StrEnum):
    SEND = "send"
    SPOILER = "spoiler"
    BLOCK = "block"


_ACTIONS: Mapping[ContentPolicy, ImageAction] = {
    ContentPolicy.BLOCK: ImageAction.BLOCK,
    ContentPolicy.SPOILER: ImageAction.SPOILER,
    ContentPolicy.ALLOW: ImageAction.SEND,
}


def decide(flagged: bool, policy: ContentPolicy) -> ImageAction:
    """An image that was not flagged is sent; a flagged one as the deployment's policy says."""
    if not flagged:
        return ImageAction.SEND
    return _ACTIONS[policy]


# --- normalisation -------------------------------------------------------------------------

_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_LEET_SYMBOLS = frozenset("@$")
_NUKTA = "\u093c"
_CHANDRABINDU, _ANUSVARA = "\u0901", "\u0902"
# Letters that look Latin in most fonts.
_LOOKALIKES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "χ": "x",
    }
)  # fmt: skip
# The generic combining diacritics (accents on Latin letters); Indic vowel signs are not here.
_DIACRITIC_BLOCKS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF),
                     (0xFE20, 0xFE2F))  # fmt: skip
_STRETCHED = re.compile(r"(.)\1\1")
_RUNS = re.compile(r"(.)\1+")


def _is_diacritic(char: str) -> bool:
    point = ord(char)
    return any(low <= point <= high for low, high in _DIACRITIC_BLOCKS)


def _fold(text: str) -> str:
    """Case, compatibility forms, accents and invisible characters folded away."""
    if text.isascii():
        # Most prompts: no compatibility forms, accents, invisible or look-alike characters.
        return text.lower()
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    kept = [
        _ANUSVARA if char == _CHANDRABINDU else char
        for char in unicodedata.normalize("NFD", text)
        if char != _NUKTA and unicodedata.category(char) != "Cf" and not _is_diacritic(char)
    ]
    return unicodedata.normalize("NFC", "".join(kept)).translate(_LOOKALIKES)


def _is_word_char(char: str) -> bool:
    return unicodedata.category(char)[0] in "LMN" or char in _LEET_SYMBOLS


def _has_letter(text: str) -> bool:
    return any(unicodedata.category(char).startswith("L") for char in text)


def _deleet(raw: str) -> str:
    """Leetspeak read as letters in a word that has letters; a bare number stays a number."""
    if _has_letter(raw):
        return raw.translate(_LEET)
    return "".join(char for char in raw if char not in _LEET_SYMBOLS)


def _squeeze(token: str) -> str:
    return _RUNS.sub(r"\1", token)


@lru_cache(maxsize=64)
def _squeezed(words: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The words squeezed, and which of them are stretched (a letter three times or more):
    a check looks each reading of a prompt up in several indexes."""
    return tuple(map(_squeeze, words)), tuple(bool(_STRETCHED.search(word)) for word in words)


@dataclass(frozen=True)
class _Tokens:
    """A folded text cut into words, with the other readings of it that matching tries."""

    words: tuple[str, ...]
    # Each run of letters spelled out one by one, joined: "n.u.d.e" -> "nude".
    spelled: tuple[str, ...]
    # The words with spelled runs joined, and words broken by punctuation joined: "nu.de".
    # Empty where they would be the same as `words`.
    readings: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, text: str) -> _Tokens:
        folded = _fold(text)
        # (raw word, whether whitespace came before it)
        raw: list[tuple[str, bool]] = []
        start: int | None = None
        end = 0
        for index, char in enumerate([*folded, " "]):
            if _is_word_char(char):
                if start is None:
                    start = index
            elif start is not None:
                spaced = not raw or any(gap.isspace() for gap in folded[end:start])
                raw.append((folded[start:index], spaced))
                start, end = None, index
        words = tuple(token for token in (_deleet(word) for word, _ in raw) if token)

        spelled: list[str] = []
        with_spelled: list[str] = []
        run: list[str] = []
        for word, _ in [*raw, ("", True)]:
            if len(word) == 1:
                run.append(word)
                continue
            if len(run) >= 2:
                joined = _deleet("".join(run))
                spelled.append(joined)
                with_spelled.append(joined)
            else:
                with_spelled.extend(token for token in map(_deleet, run) if token)
            run = []
            if word and (token := _deleet(word)):
                with_spelled.append(token)

        # Words joined across punctuation with no space: "nu.de" -> "nude".
        chunks: list[str] = []
        for word, spaced in raw:
            if spaced or not chunks:
                chunks.append(word)
            else:
                chunks[-1] += word
        joined_chunks = tuple(token for token in map(_deleet, chunks) if token)

        readings = tuple(
            dict.fromkeys(
                reading for reading in (tuple(with_spelled), joined_chunks) if reading != words
            )
        )
        return cls(words, tuple(spelled), readings)

    def all_readings(self) -> Iterator[tuple[str, ...]]:
        yield self.words
        yield from self.readings


def _term_tokens(term: str) -> tuple[str, ...]:
    return _Tokens.of(term).words


# --- matching -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    category: str
    term: str  # as written in the file
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class _Hit:
    entry: _Entry
    start: int
    end: int


class _Index:
    """Entries by their squeezed words, for n-gram look-ups over a prompt's words."""

    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._by_key: dict[tuple[str, ...], list[_Entry]] = {}
        self._compact: dict[str, _Entry] = {}
        for entry in entries:
            key = tuple(_squeeze(token) for token in entry.tokens)
            self._by_key.setdefault(key, []).append(entry)
            compact = "".join(entry.tokens)
            if len(compact) >= _MIN_SPELLED_CHARS:
                self._compact.setdefault(compact, entry)
        self._longest = max((len(key) for key in self._by_key), default=0)
        alternatives = sorted(self._compact, key=len, reverse=True)
        self._spelled = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def hits(self, words: tuple[str, ...], masked: frozenset[int] = frozenset()) -> Iterator[_Hit]:
        squeezed, stretched = _squeezed(words)
        for start in range(len(words)):
            for end in range(start + 1, min(start + self._longest, len(words)) + 1):
                if masked and any(index in masked for index in range(start, end)):
                    break
                for entry in self._by_key.get(tuple(squeezed[start:end]), ()):
                    if all(
                        stretched[index] or words[index] == entry.tokens[index - start]
                        for index in range(start, end)
                    ):
                        yield _Hit(entry, start, end)

    def spelled_hits(self, spelled: Iterable[str]) -> Iterator[_Entry]:
        if self._spelled is None:
            return
        for letters in spelled:
            for candidate in (letters, _squeeze(letters)):
                if found := self._spelled.search(candidate):
                    yield self._compact[found.group(0)]
                    break


# Ages written out: "15 year old", "15-yr-old", "15yo", "15 y/o", "aged 15", "15 वर्षीय",
# "15 साल की लड़की", "15 saal ka ladka". The number is the first group that matched.
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen")
    )
}  # fmt: skip
_NUMBER = r"(\d{1,3}|" + "|".join(_NUMBER_WORDS) + ")"
_BEFORE = r"(?<![\w.])"
_AFTER = r"(?![\w\u0900-\u097f])"
_AGE_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        _BEFORE + _NUMBER + r"[\s_-]*(?:years?|yrs?)[\s_-]*old" + _AFTER,
        _BEFORE + _NUMBER + r"[\s_-]*(?:yo|y/o|y\.o\.?)" + _AFTER,
        _BEFORE + r"aged?[\s:]*" + _NUMBER + _AFTER,
        _BEFORE + _NUMBER + r"[\s_-]*(?:वर्षीय|varshiya|varshiy|varshiye)" + _AFTER,
        _BEFORE
        + _NUMBER
        + r"[\s_-]*(?:साल|वर्ष|बरस|saal|sal|baras|varsh)\s*(?:की|का|के|ki|kii|ka|ke)\s*"
        + r"(?:लडकी|लडका|बच्ची|बच्चा|ladki|ladka|larki|larka|girl|boy)"
        + _AFTER,
    )
)


def _young_age(folded: str, below: int) -> str | None:
    for pattern in _AGE_PATTERNS:
        for found in pattern.finditer(folded):
            number = found.group(1)
            age = _NUMBER_WORDS[number] if number in _NUMBER_WORDS else int(number)
            if age < below:
                return found.group(0)
    return None


# --- the lists ------------------------------------------------------------------------------


@dataclass
class _Together:
    who: dict[str, list[str]] = field(default_factory=dict)
    what: dict[str, list[str]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    ages_below: int | None = None


@dataclass
class _Lists:
    """The parsed files, merged: category -> language -> terms."""

    terms: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    together: dict[str, _Together] = field(default_factory=dict)
    allow: list[str] = field(default_factory=list)


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BlocklistError(f"{where}: must be a list of strings")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise BlocklistError(f"{where}: {item!r} is not a non-empty string")
        if len(item) > MAX_TERM_CHARS:
            raise BlocklistError(f"{where}: {item[:20]!r}… is over {MAX_TERM_CHARS} characters")
        if not _term_tokens(item):
            raise BlocklistError(f"{where}: {item!r} has no letters or digits")
    return list(value)


def _language_lists(value: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise BlocklistError(f"{where}: must be a table of language = [terms]")
    lists: dict[str, list[str]] = {}
    for language, terms in value.items():
        if not _LANGUAGE_CODE.fullmatch(language):
            raise BlocklistError(
                f"{where}.{language}: not a language code such as 'en', 'hi' or 'hinglish'"
            )
        lists[language] = _string_list(terms, f"{where}.{language}")
    return lists


def _add(target: dict[str, list[str]], lists: Mapping[str, list[str]]) -> None:
    for language, terms in lists.items():
        target.setdefault(language, []).extend(terms)


def _read_into(lists: _Lists, path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BlocklistError(f"{path}: cannot read: {exc}") from exc
    for name, table in data.items():
        where = f"{path}: [{name}]"
        if not isinstance(table, dict):
            raise BlocklistError(f"{where}: must be a table")
        if name == ALLOW:
            unknown = set(table) - {"terms"}
            if unknown:
                raise BlocklistError(f"{where}: unknown keys {sorted(unknown)}; only 'terms'")
            lists.allow.extend(_string_list(table.get("terms", []), f"{where}.terms"))
            continue
        if not _CATEGORY_NAME.fullmatch(name):
            raise BlocklistError(f"{where}: a category is lowercase letters, digits and _")
        languages = {key: value for key, value in table.items() if key != TOGETHER}
        _add(lists.terms.setdefault(name, {}), _language_lists(languages, where))
        if TOGETHER in table:
            _read_together(lists.together.setdefault(name, _Together()), table[TOGETHER], where)


def _read_together(rule: _Together, table: Any, where: str) -> None:
    where = f"{where}.{TOGETHER}"
    if not isinstance(table, dict):
        raise BlocklistError(f"{where}: must be a table")
    unknown = set(table) - {"who", "what", "categories", "ages_below"}
    if unknown:
        raise BlocklistError(f"{where}: unknown keys {sorted(unknown)}")
    _add(rule.who, _language_lists(table.get("who", {}), f"{where}.who"))
    _add(rule.what, _language_lists(table.get("what", {}), f"{where}.what"))
    rule.categories.extend(_string_list(table.get("categories", []), f"{where}.categories"))
    if "ages_below" in table:
        ages_below = table["ages_below"]
        if isinstance(ages_below, bool) or not isinstance(ages_below, int):
            raise BlocklistError(f"{where}.ages_below: must be a whole number")
        if not 1 <= ages_below <= 100:
            raise BlocklistError(f"{where}.ages_below: must be between 1 and 100")
        rule.ages_below = ages_below


def _entries(
    category: str, lists: Mapping[str, list[str]], removed: frozenset[tuple[str, ...]]
) -> list[_Entry]:
    entries = (
        _Entry(category, term, _term_tokens(term)) for terms in lists.values() for term in terms
    )
    return [entry for entry in entries if entry.tokens not in removed]


@dataclass(frozen=True)
class _TogetherRule:
    category: str
    who: _Index
    what: _Index
    categories: frozenset[str]
    ages_below: int | None


def _first(hits: Iterable[_Hit]) -> _Hit | None:
    # The longest entry at the earliest place: "pm modi" rather than "modi".
    return min(hits, key=lambda hit: (hit.start, hit.start - hit.end), default=None)


class PromptPolicy:
    """The merged block lists, compiled for matching. Build it with `load`."""

    def __init__(
        self,
        terms: _Index,
        allow: _Index,
        together: Sequence[_TogetherRule],
        categories: Sequence[str],
        counts: Mapping[str, Mapping[str, int]],
    ) -> None:
        self._terms = terms
        self._allow = allow
        self._together = tuple(together)
        self._rank = {category: rank for rank, category in enumerate(categories)}
        self.categories: tuple[str, ...] = tuple(categories)
        # category -> language -> number of terms, for start-up logs and tests.
        self.counts: Mapping[str, Mapping[str, int]] = counts

    @classmethod
    def load(cls, override: Path | None = None) -> PromptPolicy:
        """The built-in lists, plus an operator's override file whose lists add terms."""
        lists = _Lists()
        _read_into(lists, BUILTIN_BLOCKLISTS)
        if override is not None:
            _read_into(lists, override)
        source = override or BUILTIN_BLOCKLISTS

        for name, rule in lists.together.items():
            missing = sorted(set(rule.categories) - set(lists.terms))
            if missing:
                raise BlocklistError(f"{source}: [{name}.together]: no categories {missing}")
            if not (rule.who or rule.ages_below) or not (rule.what or rule.categories):
                raise BlocklistError(
                    f"{source}: [{name}.together]: needs `who` terms (or `ages_below`) and "
                    "`what` terms (or `categories`)"
                )

        listed = {
            tokens
            for category in lists.terms.values()
            for terms in category.values()
            for tokens in map(_term_tokens, terms)
        }
        allow_tokens = [_term_tokens(term) for term in lists.allow]
        # An allowed entry that is itself a list term takes it off; any other is exempt text.
        removed = frozenset(tokens for tokens in allow_tokens if tokens in listed)
        exempt = [
            _Entry(ALLOW, term, tokens)
            for term, tokens in zip(lists.allow, allow_tokens, strict=True)
            if tokens not in removed
        ]

        known = [name for name in CATEGORY_ORDER if name in lists.terms]
        categories = known + [name for name in lists.terms if name not in CATEGORY_ORDER]
        terms = _Index(
            entry
            for category in categories
            for entry in _entries(category, lists.terms[category], removed)
        )
        together = [
            _TogetherRule(
                name,
                _Index(_entries(name, rule.who, removed)),
                _Index(_entries(name, rule.what, removed)),
                frozenset(rule.categories),
                rule.ages_below,
            )
            for name, rule in lists.together.items()
        ]
        counts = {
            category: {language: len(terms) for language, terms in lists.terms[category].items()}
            for category in categories
        }
        return cls(terms, _Index(exempt), together, categories, counts)

    def check(self, text: str) -> PromptVerdict:
        tokens = _Tokens.of(text)
        hits: list[_Hit] = []
        readings = list(tokens.all_readings())
        masks = [self._exempt(words) for words in readings]
        for words, masked in zip(readings, masks, strict=True):
            hits.extend(self._terms.hits(words, masked))
        spelled = list(self._terms.spelled_hits(tokens.spelled))
        found: dict[str, str] = {}
        for hit in sorted(hits, key=lambda hit: (hit.start, hit.start - hit.end)):
            found.setdefault(hit.entry.category, hit.entry.term)
        for entry in spelled:
            found.setdefault(entry.category, entry.term)

        for rule in self._together:
            if rule.category in found:
                continue
            if term := self._together_term(rule, readings, masks, tokens, text, found):
                found[rule.category] = term

        if not found:
            return ALLOWED
        category = min(found, key=lambda name: self._rank.get(name, len(self._rank)))
        return PromptVerdict(blocked=True, category=category, term=found[category])

    def _exempt(self, words: tuple[str, ...]) -> frozenset[int]:
        if not self._allow:
            return frozenset()
        return frozenset(
            index for hit in self._allow.hits(words) for index in range(hit.start, hit.end)
        )

    @staticmethod
    def _together_term(
        rule: _TogetherRule,
        readings: Sequence[tuple[str, ...]],
        masks: Sequence[frozenset[int]],
        tokens: _Tokens,
        text: str,
        found: Mapping[str, str],
    ) -> str | None:
        def side(index: _Index) -> str | None:
            for words, masked in zip(readings, masks, strict=True):
                if hit := _first(index.hits(words, masked)):
                    return hit.entry.term
            return next((entry.term for entry in index.spelled_hits(tokens.spelled)), None)

        who = side(rule.who)
        if who is None and rule.ages_below is not None:
            who = _young_age(_fold(text), rule.ages_below)
        if who is None:
            return None
        what = next((found[name] for name in rule.categories if name in found), None)
        what = what or side(rule.what)
        return None if what is None else f"{who} + {what}"


def check_prompt(policy: PromptPolicy, text: str) -> PromptVerdict:
    return policy.check(text)


def require_allowed(policy: PromptPolicy, text: str) -> None:
    """Raise `PromptBlocked` (carrying the verdict) for a prompt the lists refuse."""
    verdict = policy.check(text)
    if verdict.blocked:
        raise PromptBlocked(verdict)
