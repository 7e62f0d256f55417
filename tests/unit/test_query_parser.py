"""The gateway's query parser: brands, categories and price bounds out of free shop text.

The parser learns its vocabulary from the catalog it is given. Here the tests play the catalog: they
build the brand / category lists from the synthetic shop's vocabulary (the parser never imports it),
and a small hand-made catalog with prices and awkward names stands in for a real one.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from gateway.query_parser import ParsedQuery, QueryParser
from scorer.data import vocab
from scorer.data.synthetic import _category_noun, generate_shop

SYN_BRANDS = sorted({b for spec in vocab.CATEGORIES for b in spec.brands})
SYN_CATEGORIES = [spec.name for spec in vocab.CATEGORIES]

# A hand-made catalog: names with punctuation, accents, apostrophes, stop-word-ish and price-word-ish
# names, and prices chosen so the quartiles are easy to check by hand (numpy's linear interpolation):
#   Headphones 10..50 -> p25 20, p75 40;  Watches 100..500 -> p25 200, p75 400;  Bags 5..45 -> 15, 35
#   all 15 prices -> p25 22.5, p75 150;   Bags + Watches -> p25 27.5
SHOP_BRANDS = ["Apple", "HP", "H&M", "All-Clad", "The North Face", "Levi's", "Dr. Martens", "Nestlé", "A.P.C.",
               "On", "3M", "Luxury Living", "Bath and Body Works"]
SHOP_CATEGORIES = ["Bags", "Headphones", "Watches", "Home & Garden", "Luxury Watches", "Shorts", "Accessories",
                   "Dresses"]
SHOP_PRICES = {
    "Headphones": [10.0, 20.0, 30.0, 40.0, 50.0],
    "Watches": [100.0, 200.0, 300.0, 400.0, 500.0],
    "Bags": [5.0, 15.0, 25.0, 35.0, 45.0, float("nan")],  # a missing price is ignored
}


@pytest.fixture(scope="module")
def syn() -> QueryParser:
    return QueryParser(SYN_BRANDS, SYN_CATEGORIES)  # no prices: "cheap" / "premium" give no bound


@pytest.fixture(scope="module")
def shop() -> QueryParser:
    return QueryParser(SHOP_BRANDS, SHOP_CATEGORIES, SHOP_PRICES)


def _pq(text: str, brands=(), cats=(), lo=None, hi=None) -> ParsedQuery:
    return ParsedQuery(text=text, brands=tuple(brands), categories=tuple(cats), min_price=lo, max_price=hi)


# (query, expected) against the synthetic vocabulary.
SYN_CASES = [
    # brands: case-insensitive, whole words, longest first, natural spellings of punctuated names
    ("nike", _pq("nike", ["Nike"])),
    ("NIKE Sneakers", _pq("NIKE Sneakers", ["Nike"], ["Sneakers"])),
    ("new balance running shoes", _pq("new balance running shoes", ["New Balance"], ["Running Shoes"])),
    ("the north face jacket", _pq("the north face jacket", ["The North Face"], ["Jackets"])),
    ("north face down jacket", _pq("north face down jacket", ["The North Face"], ["Jackets"])),
    ("le creuset dutch oven", _pq("le creuset dutch oven", ["Le Creuset"])),
    ("h&m t-shirt", _pq("h&m t-shirt", ["H&M"], ["T-Shirts"])),
    ("H & M tshirt", _pq("H & M tshirt", ["H&M"], ["T-Shirts"])),
    ("h and m t shirts", _pq("h and m t shirts", ["H&M"], ["T-Shirts"])),
    ("all-clad frying pan", _pq("all-clad frying pan", ["All-Clad"])),
    ("all clad cookware", _pq("all clad cookware", ["All-Clad"], ["Cookware"])),
    ("arc'teryx windbreaker", _pq("arc'teryx windbreaker", ["Arcteryx"])),
    ("Arc’teryx jackets", _pq("Arc’teryx jackets", ["Arcteryx"], ["Jackets"])),
    ("apple watch", _pq("apple watch", ["Apple"], ["Watches"])),
    ("hp laptop", _pq("hp laptop", ["HP"], ["Laptops"])),
    ("delonghi espresso machine", _pq("delonghi espresso machine", ["DeLonghi"])),
    ("nike adidas nike", _pq("nike adidas nike", ["Nike", "Adidas"])),  # order of appearance, deduplicated
    ("ｎｉｋｅ", _pq("ｎｉｋｅ", ["Nike"])),  # fullwidth letters
    # categories: name, singular / plural, spelling variants, "&" parts; product types are NOT mapped
    ("running shoe", _pq("running shoe", cats=["Running Shoes"])),
    ("trail running shoes", _pq("trail running shoes", cats=["Running Shoes"])),
    ("t shirts", _pq("t shirts", cats=["T-Shirts"])),
    ("headphone", _pq("headphone", cats=["Headphones"])),
    ("over-ear headphones", _pq("over-ear headphones", cats=["Headphones"])),  # "over" with no number
    ("laptops", _pq("laptops", cats=["Laptops"])),
    ("watches", _pq("watches", cats=["Watches"])),
    ("backpack", _pq("backpack", cats=["Backpacks"])),
    ("coffee maker", _pq("coffee maker", cats=["Coffee Makers"])),
    ("yoga mat", _pq("yoga mat", cats=["Yoga & Fitness"])),
    ("fitness gear", _pq("fitness gear", cats=["Yoga & Fitness"])),
    ("yoga and fitness", _pq("yoga and fitness", cats=["Yoga & Fitness"])),
    ("espresso machine", _pq("espresso machine")),
    ("smartwatch", _pq("smartwatch")),
    ("jackets and backpacks", _pq("jackets and backpacks", cats=["Jackets", "Backpacks"])),
    # two category words in a row: the last is the thing wanted
    ("laptop backpack", _pq("laptop backpack", cats=["Backpacks"])),
    ("fitness watch", _pq("fitness watch", cats=["Watches"])),
    # explicit prices, all the phrasings; the phrase leaves the text
    ("under 50", _pq("", hi=50.0)),
    ("below 50", _pq("", hi=50.0)),
    ("less than 50", _pq("", hi=50.0)),
    ("up to 50", _pq("", hi=50.0)),
    ("max 50", _pq("", hi=50.0)),
    ("< 50", _pq("", hi=50.0)),
    ("under $50", _pq("", hi=50.0)),
    ("under 50 dollars", _pq("", hi=50.0)),
    ("for under 50 bucks", _pq("", hi=50.0)),
    ("50 or less", _pq("", hi=50.0)),
    ("under50", _pq("", hi=50.0)),
    ("over 100", _pq("", lo=100.0)),
    ("above 100", _pq("", lo=100.0)),
    ("more than 100", _pq("", lo=100.0)),
    ("from 100", _pq("", lo=100.0)),
    ("at least 100", _pq("", lo=100.0)),
    ("> 100", _pq("", lo=100.0)),
    ("100+", _pq("", lo=100.0)),
    ("100 and up", _pq("", lo=100.0)),
    ("between 20 and 40", _pq("", lo=20.0, hi=40.0)),
    ("20-40", _pq("", lo=20.0, hi=40.0)),
    ("$20-$40", _pq("", lo=20.0, hi=40.0)),
    ("20 to 40", _pq("", lo=20.0, hi=40.0)),
    ("$20 - $40", _pq("", lo=20.0, hi=40.0)),
    ("from 20 to 40", _pq("", lo=20.0, hi=40.0)),
    ("20–40 €", _pq("", lo=20.0, hi=40.0)),
    ("€30", _pq("", hi=30.0)),  # a lone amount with a currency is a budget
    ("£30 gift", _pq("gift", hi=30.0)),
    ("under 1,200", _pq("", hi=1200.0)),
    ("under 1.5k", _pq("", hi=1500.0)),
    ("under 49.99", _pq("", hi=49.99)),
    ("unter 49,99 €", _pq("unter", hi=49.99)),
    ("under €1.200,50", _pq("", hi=1200.5)),
    # range swap, several bounds
    ("between 40 and 20", _pq("", lo=20.0, hi=40.0)),
    ("40-20", _pq("", lo=20.0, hi=40.0)),
    ("over 100 under 50", _pq("", lo=50.0, hi=100.0)),
    ("under 50 below 30", _pq("", hi=30.0)),  # the tightest bound
    # text: only the price phrase goes; brand and category words stay
    ("nike running shoes under $50", _pq("nike running shoes", ["Nike"], ["Running Shoes"], hi=50.0)),
    ("  NIKE   nike  sneakers , under 80 ", _pq("NIKE nike sneakers", ["Nike"], ["Sneakers"], hi=80.0)),
    ("sneakers (under 80)", _pq("sneakers", cats=["Sneakers"], hi=80.0)),
    ("128gb smartphone 360-840", _pq("128gb smartphone", cats=["Smartphones"], lo=360.0, hi=840.0)),
    ("5g phone between 220 and 500", _pq("5g phone", lo=220.0, hi=500.0)),
    ("dell ssd 2-in-1 laptop 400-920", _pq("dell ssd 2-in-1 laptop", ["Dell"], ["Laptops"], lo=400.0, hi=920.0)),
    ("priced below 80 frying pan", _pq("frying pan", hi=80.0)),
    # numbers that are not prices stay in the text
    ("40l backpack", _pq("40l backpack", cats=["Backpacks"])),
    ("16gb ram laptop", _pq("16gb ram laptop", cats=["Laptops"])),
    ("2-in-1 laptop", _pq("2-in-1 laptop", cats=["Laptops"])),
    ("up to 50% off jackets", _pq("up to 50% off jackets", cats=["Jackets"])),
    ("dumbbells up to 20 kg", _pq("dumbbells up to 20 kg")),
    ("3-4 person tent", _pq("3-4 person tent")),
    ("over 40l backpack", _pq("over 40l backpack", cats=["Backpacks"])),
    ("around $50 headphones", _pq("around $50 headphones", cats=["Headphones"])),  # no bound: words stay
    ("under 30 pounds", _pq("under 30 pounds")),  # as likely a weight as a currency
    # price words without prices: removed from the text, no bound
    ("cheap headphones", _pq("headphones", cats=["Headphones"])),
    ("premium laptop", _pq("laptop", cats=["Laptops"])),
]

# Queries that must parse to nothing at all: text is the query, whitespace normalised.
NOTHING = [
    "", "   ", "something nice for my dad", "bagel", "chpt", "40l", "5g", "128gb", "gift ideas",
    "under the sea poster", "日本語", "a" * 512, "under " * 80, "1-" * 256, "\t\n", "over-the-top",
    "$", "under $", "between and", "2020 vision", "iphone 15", "under 1,2345",
]


@pytest.mark.parametrize(("query", "expected"), SYN_CASES, ids=[q for q, _ in SYN_CASES])
def test_synthetic_vocabulary(syn, query, expected):
    assert syn.parse(query) == expected


@pytest.mark.parametrize("query", NOTHING, ids=[q[:30] for q in NOTHING])
def test_parses_to_nothing(syn, shop, query):
    for parser in (syn, shop):
        assert parser.parse(query) == _pq(" ".join(query.split()))


SHOP_CASES = [
    # cheap => max = p25, premium => min = p75, of the matched category's prices ...
    ("cheap headphones", _pq("headphones", cats=["Headphones"], hi=20.0)),
    ("budget headphone", _pq("headphone", cats=["Headphones"], hi=20.0)),
    ("affordable watch", _pq("watch", cats=["Watches"], hi=200.0)),
    ("inexpensive bags", _pq("bags", cats=["Bags"], hi=15.0)),
    ("low cost bag", _pq("bag", cats=["Bags"], hi=15.0)),
    ("not too expensive bag", _pq("bag", cats=["Bags"], hi=15.0)),
    ("premium headphones", _pq("headphones", cats=["Headphones"], lo=40.0)),
    ("luxury watches for him", _pq("luxury watches for him", cats=["Luxury Watches"])),  # a category wins
    ("high end watches", _pq("watches", cats=["Watches"], lo=400.0)),
    ("high-end watch", _pq("watch", cats=["Watches"], lo=400.0)),
    ("expensive bag", _pq("bag", cats=["Bags"], lo=35.0)),
    # ... of several matched categories together, of all prices when none matched or none has prices
    ("cheap bags and watches", _pq("bags and watches", cats=["Bags", "Watches"], hi=27.5)),
    ("cheap", _pq("", hi=22.5)),
    ("premium gift", _pq("gift", lo=150.0)),
    ("cheap dresses", _pq("dresses", cats=["Dresses"], hi=22.5)),
    # an explicit bound wins for its side, and a word that contradicts it is dropped
    ("cheap headphones under 50", _pq("headphones", cats=["Headphones"], hi=50.0)),
    ("premium headphones over 10", _pq("headphones", cats=["Headphones"], lo=10.0)),
    ("cheap watches over 100", _pq("watches", cats=["Watches"], lo=100.0, hi=200.0)),
    ("cheap watches over 300", _pq("watches", cats=["Watches"], lo=300.0)),
    ("premium headphones under 30", _pq("headphones", cats=["Headphones"], hi=30.0)),
    ("cheap premium bag", _pq("bag", cats=["Bags"])),  # contradiction: neither
    # a real catalog's names
    ("levis bag", _pq("levis bag", ["Levi's"], ["Bags"])),
    ("levi's", _pq("levi's", ["Levi's"])),
    ("dr martens boots", _pq("dr martens boots", ["Dr. Martens"])),
    ("nestle", _pq("nestle", ["Nestlé"])),
    ("apc jacket", _pq("apc jacket", ["A.P.C."])),
    ("3m tape", _pq("3m tape", ["3M"])),
    ("bath & body works", _pq("bath & body works", ["Bath and Body Works"])),
    ("luxury living sofa", _pq("luxury living sofa", ["Luxury Living"])),  # a brand wins over a price word
    ("on-ear headphones", _pq("on-ear headphones", cats=["Headphones"])),  # brand "On" is a stop word
    ("garden hose", _pq("garden hose", cats=["Home & Garden"])),
    ("accessory", _pq("accessory", cats=["Accessories"])),
    ("dress", _pq("dress", cats=["Dresses"])),
    ("shorts", _pq("shorts", cats=["Shorts"])),
    ("short sleeve", _pq("short sleeve")),  # "Shorts" is not singularised
    ("bags", _pq("bags", cats=["Bags"])),
]


@pytest.mark.parametrize(("query", "expected"), SHOP_CASES, ids=[q for q, _ in SHOP_CASES])
def test_catalog_with_prices(shop, query, expected):
    assert shop.parse(query) == expected


def test_quartiles_match_numpy():
    prices = {"Lamps": list(np.random.default_rng(0).lognormal(3, 1, 101)), "Mugs": [7.0]}
    p = QueryParser([], ["Lamps", "Mugs"], prices)
    assert p.parse("cheap lamp").max_price == pytest.approx(np.percentile(prices["Lamps"], 25))
    assert p.parse("premium lamps").min_price == pytest.approx(np.percentile(prices["Lamps"], 75))
    assert p.parse("premium mug").min_price == 7.0  # a single price is its own quartile
    everything = prices["Lamps"] + prices["Mugs"]
    assert p.parse("cheap stuff").max_price == pytest.approx(np.percentile(everything, 25))


def test_empty_and_dirty_vocabulary():
    empty = QueryParser([], [])
    assert empty.parse("nike under 50") == _pq("nike", hi=50.0)
    assert empty.parse("cheap nike") == _pq("nike")  # no prices: no bound
    dirty = QueryParser(["Nike", None, float("nan"), "", "  ", "x", "Nike"], ["Bags", None])  # type: ignore[list-item]
    assert dirty.parse("nike x bag") == _pq("nike x bag", ["Nike"], ["Bags"])


def test_parser_does_not_import_the_synthetic_vocabulary():
    source = (Path(__file__).parents[2] / "gateway" / "query_parser.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+scorer", source, re.M)


def test_never_raises_on_any_string(syn, shop):
    rng = random.Random(11)
    alphabet = list("ab nike&'’-$€£.,:+<>~%()kK 0123456789éñ\t\n\u00a0\u200f\u0301日") + [
        "under ", "between ", " and ", " to ", "h&m", "cheap", "40l", "\ud800", "\x00", "ß", "ﬁ", "İ"]
    odd = ["\ud800", "\x00" * 10, "İstanbul under 50", "ß" * 600, "\u0301" * 100, "$" * 512, "1," * 300,
           "9" * 400, "under " + "9" * 400, "under 1e400", "1" * 512 + " - " + "2" * 512]
    queries = odd + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    for q in queries:
        for parser in (syn, shop):
            r = parser.parse(q)
            assert isinstance(r.text, str) and len(r.text) <= len(q)
            for bound in (r.min_price, r.max_price):
                assert bound is None or (isinstance(bound, float) and bound == bound and bound != float("inf"))
            if r.min_price is not None and r.max_price is not None:
                assert r.min_price <= r.max_price


# --- every query of a synthetic shop ----------------------------------------------------------------

END = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _template_re(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field in ("p", "lo", "hi"):
        pattern = pattern.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\d+)")
    return re.compile(rf"^(?P<rest>.*?) ?{pattern}$")


@pytest.fixture(scope="module")
def synthetic_queries():
    shop = generate_shop("tiny", seed=3, end=END)
    ev = shop.events
    queries = sorted(ev.loc[ev["event_type"] == "QUERY", "query"].dropna().unique())
    prices = shop.items.groupby("category")["price"].apply(list).to_dict()
    # The catalog's own vocabulary, as the gateway would read it from the items table.
    parser = QueryParser(shop.items["brand"].unique(), shop.items["category"].unique(), prices)
    return queries, parser


def test_every_synthetic_query(synthetic_queries):
    """The generator appends its price phrase and prepends its price word (see _draw_intent): the
    parser must read back exactly those bounds, strip exactly those words, find exactly the brands
    named in the query, and never give a category other than the one the query was drawn from."""
    queries, parser = synthetic_queries
    assert len(queries) > 100
    unders = [_template_re(t) for t in vocab.PRICE_UNDER]
    ranges = [_template_re(t) for t in vocab.PRICE_RANGE]
    price_words = vocab.PRICE_WORDS_CHEAP + vocab.PRICE_WORDS_PREMIUM
    nouns = {t: spec.name for spec in vocab.CATEGORIES for t in spec.types}
    nouns |= {_category_noun(spec.name): spec.name for spec in vocab.CATEGORIES}
    category_nouns = {_category_noun(spec.name) for spec in vocab.CATEGORIES}
    seen = {"under": 0, "range": 0, "word": 0, "brand": 0}
    for q in queries:
        r = parser.parse(q)
        rest, lo, hi = q, None, None
        for rx in unders:
            if m := rx.match(q):
                rest, hi = m["rest"], float(m["p"])
                seen["under"] += 1
                break
        for rx in ranges:
            if m := rx.match(q):
                rest, lo, hi = m["rest"], float(m["lo"]), float(m["hi"])
                seen["range"] += 1
                break
        word = next((w for w in sorted(price_words, key=len, reverse=True) if rest.startswith(w + " ")), None)
        if word:
            rest = rest[len(word) + 1:]
            seen["word"] += 1
            assert (r.max_price is not None) == (word in vocab.PRICE_WORDS_CHEAP), q
            assert (r.min_price is not None) == (word in vocab.PRICE_WORDS_PREMIUM), q
        else:
            assert (r.min_price, r.max_price) == (lo, hi), q
        assert r.text == rest, q

        named = [b for b in SYN_BRANDS if re.search(rf"(?<!\w){re.escape(b.lower())}(?!\w)", q)]
        assert set(r.brands) == set(named), q
        seen["brand"] += bool(named)

        noun = max((n for n in nouns if rest.endswith(n)), key=len)
        assert set(r.categories) <= {nouns[noun]}, q
        if noun in category_nouns:  # the query names the category itself
            assert r.categories == (nouns[noun],), q
    assert all(n > 5 for n in seen.values()), seen  # the check covered every kind of query
