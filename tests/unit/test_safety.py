"""The prompt block lists: what they refuse in English, Hindi and Hinglish (evasions included),
what they must let through, the operator's override, and the image decision table."""

from __future__ import annotations

import tomllib
import unicodedata
from pathlib import Path

import pytest

from chitrakar.domain import CommandError
from chitrakar.safety import (
    BUILTIN_BLOCKLISTS,
    BlocklistError,
    ContentPolicy,
    ImageAction,
    PromptBlocked,
    PromptPolicy,
    PromptVerdict,
    check_prompt,
    decide,
    require_allowed,
)

ZWJ, ZWNJ, ZWSP = "\u200d", "\u200c", "\u200b"


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy.load()


BLOCKED = [
    # sexual
    ("sexual", "a nude woman on a beach"),
    ("sexual", "NAKED man"),
    ("sexual", "s3xy girl"),
    ("sexual", "p0rn star"),
    ("sexual", "n@ked lady"),
    ("sexual", "$exy dancer"),
    ("sexual", "n.u.d.e photo"),
    ("sexual", "a n u d e photo"),
    ("sexual", "n_u_d_e"),
    ("sexual", "nu.de selfie"),
    ("sexual", f"n{ZWJ}u{ZWNJ}d{ZWSP}e"),
    ("sexual", "seeexxxy model"),
    ("sexual", "naaaaked"),
    ("sexual", "ｎｕｄｅ"),  # fullwidth
    ("sexual", "nаked"),  # Cyrillic а
    ("sexual", "nüdé"),
    ("sexual", "X X X"),
    ("sexual", "नंगी लड़की"),
    ("sexual", "अश्लील तस्वीर"),
    ("sexual", f"नं{ZWJ}गी औरत"),
    ("sexual", "बिना कपड़ों के"),
    ("sexual", "बिना कपडों के"),  # without the nukta
    ("sexual", "nangi ladki"),
    ("sexual", "NANGI ladki"),
    ("sexual", "kapde utaar ke"),
    ("sexual", "balatkar ka drishya"),
    # minors
    ("minors", "loli anime"),
    ("minors", "child porn"),
    ("minors", "child-porn"),
    ("minors", "c h i l d p o r n"),
    ("minors", "a 15 year old girl in a bikini"),
    ("minors", "15yo in lingerie"),
    ("minors", "fifteen-year-old, seductive pose"),
    ("minors", "a teen, sexy"),
    ("minors", "a nude child"),
    ("minors", "a child in lingerie"),
    ("minors", "बाल पोर्न"),
    ("minors", "१५ साल की लड़की बिकिनी में"),
    ("minors", "बच्ची ब्रा में"),
    ("minors", "nangi bachchi"),
    ("minors", "14 saal ki ladki bikini mein"),
    ("minors", "bachchi sexy"),
    # violence and gore
    ("violence_gore", "a beheaded man"),
    ("violence_gore", "covered in blood, gory"),
    ("violence_gore", "a mob lynching"),
    ("violence_gore", "acid attack victim"),
    ("violence_gore", "D3CAPITATED"),
    ("violence_gore", "खून से लथपथ आदमी"),
    ("violence_gore", "कटा हुआ सिर"),
    ("violence_gore", "khoon se lathpath"),
    ("violence_gore", "kata hua sar"),
    # self-harm
    ("self_harm", "a girl about to commit suicide"),
    ("self_harm", "cut my wrists"),
    ("self_harm", "self-harm"),
    ("self_harm", "आत्महत्या करता आदमी"),
    ("self_harm", "खुदकुशी"),
    ("self_harm", "aatmahatya"),
    ("self_harm", "khudkushi karta hua"),
    # hate
    ("hate", "heil hitler"),
    ("hate", "a chinki"),
    ("hate", "चमार"),
    ("hate", "कटुआ"),
    ("hate", "katua"),
    ("hate", "bhangi"),
    ("hate", "neech jaati ka aadmi"),
    # real people
    ("denylist", "Narendra Modi dancing garba"),
    ("denylist", "narender modi"),
    ("denylist", "modiji in a hat"),
    ("denylist", "M0DI"),
    ("denylist", "नरेंद्र मोदी"),
    ("denylist", "नरेन्द्र मोदी"),
    ("denylist", "राहुल गाँधी"),
    ("denylist", "राहुल गांधी"),
    ("denylist", "Rashmika Mandanna in a saree"),
    ("denylist", "rashmika mandana"),
    ("denylist", "रश्मिका मंदाना"),
    ("denylist", "SRK"),
    ("denylist", "shahrukh khan"),
    ("denylist", "Shah Rukh Khan"),
    ("denylist", "शाहरुख खान"),
    ("denylist", "Vladimir Putin"),
    ("denylist", "p.u.t.i.n"),
]


@pytest.mark.parametrize(("category", "prompt"), BLOCKED)
def test_blocked_prompts(policy: PromptPolicy, category: str, prompt: str) -> None:
    verdict = policy.check(prompt)
    assert verdict.blocked, prompt
    assert verdict.category == category, (prompt, verdict)
    assert verdict.term


HARMLESS = [
    "a Kerala saree",
    "a cinematic portrait of a grandmother in a Kerala saree",
    "Holi colours",
    "Holi with bhang and thandai",
    "a cricket match, batsman hits a six",
    "shoot a photo at the ghats",
    "a professional headshot",
    "Scunthorpe",
    "analysis of a cocktail party",
    "Sussex",
    "Essex countryside, unisex clothing",
    "a bride's mehendi",
    "a Punjabi bride's chura",
    "a temple elephant",
    "a rooster crowing at dawn",
    "a blue tit on a branch",
    "chicken breast curry",
    "a therapist's office",
    "a grape vine",
    "a library cum reading room",
    "a swastik rangoli for Diwali",
    "a yogi meditating in the Himalayas",
    "om namo bhagavate vasudevaya",
    "a trump card",
    "coffee in CP, Delhi",
    "gore gaal wali dulhan",
    "baal katwa lo",
    "mujhe mat chodna",
    "bina kapde badle",
    "barefoot, नंगे पाँव",
    "painting of Nanga Parbat",
    "नंगी तलवार लिए योद्धा",
    "sex ratio in Haryana, an infographic",
    "a same-sex wedding",
    "oilseed rape fields",
    "a suicide prevention poster",
    "a child playing Holi",
    "children in school uniform",
    "a mother and her 2 year old son",
    "a 5 star hotel",
    "3d render of a temple, 4k",
    "a girl in a bikini on Goa beach",
    "XX chromosome diagram",
    "A R Rahman playing the piano",
    "mera parivaar, dadi aur bachche",
    "मेरे परिवार का एक सुंदर चित्र, दादा-दादी और बच्चे",
    "बच्चों के साथ माँ की तस्वीर",
    "दिवाली पर पूरे परिवार की फ़ोटो",
    "शादी में दूल्हा और दुल्हन",
    "",
    "   ",
    "!!! ??? ...",
]


@pytest.mark.parametrize("prompt", HARMLESS)
def test_harmless_prompts_pass(policy: PromptPolicy, prompt: str) -> None:
    assert policy.check(prompt) == PromptVerdict(blocked=False)


def test_stretched_letters_and_real_double_letters(policy: PromptPolicy) -> None:
    # A letter three or more times marks a stretched word; two is read as written.
    assert policy.check("boooobs").term == "boobs"
    assert not policy.check("two bobs haircut").blocked
    assert not policy.check("xx").blocked
    assert policy.check("xxxx").term == "xxx"


def test_the_most_serious_category_is_reported(policy: PromptPolicy) -> None:
    verdict = policy.check("a naked 12 year old")
    assert verdict.category == "minors"
    assert verdict.term == "12 year old + naked"


def test_the_longest_entry_at_a_place_is_reported(policy: PromptPolicy) -> None:
    assert policy.check("Narendra Modi").term == "narendra modi"


def test_check_prompt_and_require_allowed(policy: PromptPolicy) -> None:
    assert check_prompt(policy, "a nude") == policy.check("a nude")
    require_allowed(policy, "a Kerala saree")
    with pytest.raises(PromptBlocked) as raised:
        require_allowed(policy, "a nude")
    error = raised.value
    assert isinstance(error, CommandError)
    assert error.key == "safety.prompt_blocked"
    assert error.params == {}
    assert "nude" not in str(error)
    assert error.verdict == PromptVerdict(blocked=True, category="sexual", term="nude")


def test_a_long_prompt_is_checked_quickly(policy: PromptPolicy) -> None:
    import time

    prompt = "a cinematic portrait of a grandmother in a Kerala saree, " * 17
    started = time.perf_counter()
    for _ in range(20):
        assert not policy.check(prompt).blocked
    assert (time.perf_counter() - started) / 20 < 0.05


# --- the catalogue file ---------------------------------------------------------------------

CATEGORIES = ("sexual", "minors", "violence_gore", "self_harm", "hate", "denylist")


def _is_devanagari(term: str) -> bool:
    letters = [char for char in term if char.isalpha()]
    return bool(letters) and all("DEVANAGARI" in unicodedata.name(char) for char in letters)


def test_every_category_has_terms_in_every_script() -> None:
    data = tomllib.loads(BUILTIN_BLOCKLISTS.read_text("utf-8"))
    for category in CATEGORIES:
        table = data[category]
        for language in ("en", "hi", "hinglish"):
            assert table[language], (category, language)
        assert all(_is_devanagari(term) for term in table["hi"]), category
        assert all(term.isascii() for term in table["en"] + table["hinglish"]), category
    together = data["minors"]["together"]
    for side in ("who", "what"):
        assert all(together[side][language] for language in ("en", "hi", "hinglish"))


def test_loaded_policy_counts_its_terms(policy: PromptPolicy) -> None:
    assert set(CATEGORIES) <= set(policy.categories)
    for category in CATEGORIES:
        assert all(policy.counts[category][language] > 0 for language in ("en", "hi", "hinglish"))


def test_every_listed_term_blocks_itself(policy: PromptPolicy) -> None:
    data = tomllib.loads(BUILTIN_BLOCKLISTS.read_text("utf-8"))
    for category in CATEGORIES:
        for language in ("en", "hi", "hinglish"):
            for term in data[category][language]:
                verdict = policy.check(term)
                assert verdict.blocked, (category, term)


# --- the override ---------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "override.toml"
    path.write_text(text, "utf-8")
    return path


def test_override_adds_terms_and_categories(tmp_path: Path) -> None:
    override = _write(
        tmp_path,
        """
[denylist]
en = ["Local Leader"]
hi = ["स्थानीय नेता"]

[gambling]
en = ["satta matka"]
""",
    )
    policy = PromptPolicy.load(override)
    assert policy.check("the local leader on a horse") == PromptVerdict(
        blocked=True, category="denylist", term="Local Leader"
    )
    assert policy.check("स्थानीय नेता").category == "denylist"
    assert policy.check("S@TTA matka chart").category == "gambling"
    # The built-in terms are still there.
    assert policy.check("a nude").category == "sexual"
    assert not PromptPolicy.load().check("the local leader").blocked


def test_allow_takes_a_term_off_the_lists(tmp_path: Path) -> None:
    policy = PromptPolicy.load(_write(tmp_path, '[allow]\nterms = ["Modi"]\n'))
    assert not policy.check("a portrait of Mrs Modi, our secretary").blocked
    # Only that entry: the full name is still listed.
    assert policy.check("narendra modi").term == "narendra modi"


def test_allow_exempts_a_phrase(tmp_path: Path) -> None:
    assert PromptPolicy.load().check("breast cancer awareness nipple diagram").blocked
    policy = PromptPolicy.load(_write(tmp_path, '[allow]\nterms = ["nipple diagram"]\n'))
    assert not policy.check("breast cancer awareness nipple diagram").blocked
    # The exempt phrase covers its own words only.
    assert policy.check("nipple diagram, nude").term == "nude"


def test_override_adds_to_a_together_rule(tmp_path: Path) -> None:
    override = _write(tmp_path, '[minors.together.what]\nen = ["swimsuit"]\n')
    assert not PromptPolicy.load().check("a child in a swimsuit").blocked
    assert PromptPolicy.load(override).check("a child in a swimsuit").category == "minors"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sexual]\nen = 'nude'\n", "must be a list"),
        ("[sexual]\nen = ['']\n", "non-empty"),
        ("[sexual]\nen = ['...']\n", "no letters"),
        ("[sexual]\nEnglish = ['x']\n", "language code"),
        ("[Bad-Name]\nen = ['x']\n", "category"),
        ("[allow]\nwords = ['x']\n", "only 'terms'"),
        ("[minors.together]\ncategories = ['nope']\n", "no categories"),
        ("[minors.together]\nages_below = 'ten'\n", "whole number"),
        ("[extra.together]\nwho = { en = ['x'] }\n", "needs"),
        ("sexual = 3\n", "must be a table"),
        ("[sexual\n", "cannot read"),
    ],
)
def test_a_bad_override_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BlocklistError, match=message) as raised:
        PromptPolicy.load(_write(tmp_path, text))
    assert "\n" not in str(raised.value)
    assert "override.toml" in str(raised.value)


def test_a_missing_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BlocklistError, match="cannot read"):
        PromptPolicy.load(tmp_path / "missing.toml")


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flagged", "policy", "action"),
    [
        (False, ContentPolicy.BLOCK, ImageAction.SEND),
        (False, ContentPolicy.SPOILER, ImageAction.SEND),
        (False, ContentPolicy.ALLOW, ImageAction.SEND),
        (True, ContentPolicy.BLOCK, ImageAction.BLOCK),
        (True, ContentPolicy.SPOILER, ImageAction.SPOILER),
        (True, ContentPolicy.ALLOW, ImageAction.SEND),
    ],
)
def test_decide(flagged: bool, policy: ContentPolicy, action: ImageAction) -> None:
    assert decide(flagged, policy) is action


def test_policy_values_read_from_settings() -> None:
    assert ContentPolicy("spoiler") is ContentPolicy.SPOILER
    assert {member.value for member in ImageAction} == {"send", "spoiler", "block"}
