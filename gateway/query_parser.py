"""Query understanding: free shop text -> the text to embed plus brand / category / price constraints.

The vocabulary (brands, categories, their prices) comes from the catalog at construction, never from
the synthetic shop's vocab module, so a real catalog works the same way.

Precision comes first: a wrong filter hides exactly the items the shopper wanted, while a missed one
only leaves the work to relevance. So names match as whole words only, product types are not mapped
to categories, and a number is a price only inside a price phrase ("under 50", "20-40", "$30"),
never on its own ("40l backpack", "2-in-1 laptop").

Matching runs on a normalised copy of the query (lower case, accents and in-word apostrophes dropped,
whitespace runs collapsed) that remembers where each character came from, so the returned text is cut
from the original query and keeps its spelling.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedQuery:
    text: str  # the query without its price phrases / words; brand and category words stay (relevance)
    brands: tuple[str, ...]  # catalog spelling, in order of appearance, deduplicated
    categories: tuple[str, ...]  # catalog spelling, in order of appearance, deduplicated
    min_price: float | None
    max_price: float | None


# --- normalisation --------------------------------------------------------------------------------

_APOSTROPHES = "'’`´"
# Anything the ASCII fast path cannot pass through unchanged: whitespace runs, tabs / newlines, apostrophes.
_NEEDS_SLOW_PATH = re.compile(r"\s\s|[^\S ]|['’`´]")


def _normalise(s: str) -> tuple[str, list[int] | None]:
    """The matching view of `s` and, per view character, its index in `s` (None: the same index).

    Lower case (casefold), accents dropped (NFKD without combining marks, so "crème" finds "Creme"
    and fullwidth digits become digits), in-word apostrophes dropped ("arc'teryx" finds "Arcteryx",
    "levis" finds "Levi's"), whitespace runs collapsed to one space (so the patterns below need only
    " ?" and cannot backtrack over long blank runs).
    """
    if s.isascii() and not _NEEDS_SLOW_PATH.search(s):
        return s.lower(), None  # the common case: same length, so indices map to themselves
    out: list[str] = []
    src: list[int] = []
    last = len(s) - 1
    for i, ch in enumerate(s):
        if ch.isspace():
            if out and out[-1] != " ":
                out.append(" ")
                src.append(i)
            continue
        if ch in _APOSTROPHES and 0 < i < last and s[i - 1].isalnum() and s[i + 1].isalnum():
            continue
        for c in unicodedata.normalize("NFKD", ch):
            if unicodedata.combining(c):
                continue
            for f in c.casefold():
                out.append(f)
                src.append(i)
    return "".join(out), src


# --- catalog names: one trie-shaped regex ---------------------------------------------------------

# Placeholder units between the words of a name, expanded to regex when the trie is emitted.
_SEP = "\x00"  # space / hyphen / dot, optional: "t-shirt" = "t shirt" = "tshirt", "dr. martens"
_AMP = "\x01"  # "&", "+" or " and ": "h&m" = "h & m" = "h and m"
_UNIT_RE = {_SEP: r"[-. ]{0,2}", _AMP: r"(?: ?[&+] ?| and )"}
_MAX_NAME_CHARS = 80  # longer names are never typed; the cap also bounds the regex's nesting

# Single words that are also shop names now and then ("On", "Other", "New") but would match almost
# every query; such a name is still found through its longer aliases, never through these alone.
_STOPWORDS = frozenset(
    "a an and the of for with to in on at by or is it be no not my me we us so up all any one new "
    "more less best top good sale other others misc miscellaneous general under over max min".split()
)
# Plural words whose singular is a different, common word ("shorts" -> "short sleeve"): not singularised.
_PLURAL_ONLY = frozenset("shorts glasses goods news series clothes species arts".split())


def _name_key(view_text: str) -> str:
    """Spelling-free identity of a matched name: its alphanumeric words, minus a standalone "and"."""
    return "".join(w for w in re.findall(r"[^\W_]+", view_text) if w != "and")


def _units(alias: str) -> tuple[str, ...] | None:
    """A normalised alias as trie units: its characters, with _SEP / _AMP between its words."""
    words = re.findall(r"[^\W_]+", alias)
    if not words or len(alias) > _MAX_NAME_CHARS:
        return None
    seps = re.findall(r"(?<=[^\W_])[\W_]+(?=[^\W_])", alias)  # the separators between those words
    units: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "and" and 0 < i < len(words) - 1:  # "Bath and Body" also as "bath & body"
            units.append(_AMP)
            i += 1
            continue
        if i and units[-1] != _AMP:
            sep = seps[i - 1]
            units.append(_AMP if ("&" in sep or "+" in sep) else _SEP)
        units.extend(w)
        i += 1
    return tuple(units)


def _trie_regex(aliases: Iterable[tuple[str, ...]]) -> str:
    """One alternation over all aliases, prefix-shared, so matching cost does not grow with the
    catalog's size; at a node that ends an alias the continuation is greedy-optional, so the longest
    alias wins ("new balance" before "new", "the north face" before "the")."""
    root: dict = {}
    for units in aliases:
        node = root
        for u in units:
            node = node.setdefault(u, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [(_UNIT_RE.get(u) or re.escape(u)) + emit(child) for u, child in node.items() if u]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


def _singular(word: str) -> list[str]:
    if len(word) <= 3 or word in _PLURAL_ONLY or word.endswith(("ss", "us", "is", "os")):
        return []
    if word.endswith("ies"):
        return [word[:-3] + "y", word[:-1]]  # accessories -> accessory, hoodies -> hoodie
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return [word[:-2]]  # watches -> watch, boxes -> box
    if word.endswith("s"):
        return [word[:-1]]  # shoes -> shoe, laptops -> laptop
    return []


def _plural(word: str) -> list[str]:
    if not word.isalpha() or word.endswith("s"):
        return []
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    if word.endswith(("x", "z", "ch", "sh")):
        return [word + "es"]
    return [word + "s"]


def _number_forms(alias: str) -> set[str]:
    """The alias with its last word in singular and plural ("running shoes" / "running shoe")."""
    m = re.search(r"[^\W_]+$", alias)
    if not m:
        return {alias}
    head, last = alias[: m.start()], m.group()
    return {alias} | {head + w for w in _singular(last) + _plural(last)}


def _category_aliases(view: str) -> set[str]:
    # "Yoga & Fitness" is also found as "yoga" or "fitness": each part names the category.
    parts = [p for p in re.split(r" ?(?:&|/|,|\+|\band\b) ?", view) if p.strip()]
    forms: set[str] = set()
    for part in {view, *parts}:
        forms |= _number_forms(part.strip(" -."))
    return forms


def _brand_aliases(view: str) -> set[str]:
    # "The North Face" is mostly typed "north face".
    return {view, view[4:]} if view.startswith("the ") else {view}


# --- prices ---------------------------------------------------------------------------------------

# A number: 1,200 / 1,200.50 / 1.200 and 1.200,50 (European) / 49,99 (decimal comma) / 49.99 / 50.
# Three digits after a single dot are read as thousands: prices never have three decimals.
_NUM = (
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![.,]?\d)|\d{1,3}(?:\.\d{3})+(?:,\d{2})?(?![.,]?\d)"
    r"|\d+,\d{2}(?![.,]?\d)|\d+(?:\.\d+)?(?![.,]\d))"
)
_CUR_PRE = r"(?:us\$|[$€£¥₹]|(?:usd|eur|gbp|chf) )"
_CUR_POST = r"(?: ?(?:[$€£¥₹]|usd|eur|euros?|dollars?|bucks|gbp|chf|quid)(?!\w))"
# A number followed by a unit is a size, a weight or a count, not a price ("up to 20 kg", "3-4 person
# tent", "up to 50% off"). "pounds" is here too: as likely a weight as a currency, and a wrong price
# filter costs more than a missed one.
_NOT_UNIT = (
    r"(?! ?(?:%|°|\"|(?:x|kg|g|gr|grams?|lbs?|pounds?|oz|ounces?|l|litres?|liters?|ml|cl|gb|tb|mb|mah|w"
    r"|watts?|v|volts?|hz|mm|cm|km|m|inch(?:es)?|ft|feet|hours?|hrs?|h|mins?|minutes?|days?|weeks?"
    r"|months?|years?|yrs?|people|persons?|players?|seats?|pieces?|pcs|pack|cups?|qt|quarts?|gallons?"
    r"|miles?|mph|rpm|fps|mp|stars?)(?!\w)))"
)
# An amount: optional currency, a number with an optional attached "k" (1.5k), optional currency word.
_AMT = rf"(?:{_CUR_PRE} ?)?{_NUM}k?(?!\w){_NOT_UNIT}{_CUR_POST}?"
_LEAD = r"(?:(?:for|priced?|prices|costing|costs?):? ?)?"  # "for under 50", "priced below 50": removed too
_DASH = r"(?:-|–|—)"
_UNDER_PRE = (
    r"(?:under|below|beneath|less than|lower than|cheaper than|up to|upto|at most|no more than"
    r"|not more than|not over|max(?:imum)?[.:]?|budget(?: of|:)?|<=?|≤|=<)"
)
_UNDER_POST = r"(?: ?(?:or less|or under|or below|and under|and below|or cheaper|max(?:imum)?|at most|tops)(?!\w))"
_OVER_PRE = (
    r"(?:over|above|more than|greater than|higher than|at least|no less than|not less than"
    r"|min(?:imum)?[.:]?|from|starting (?:at|from)|>=?|≥|=>)"
)
_OVER_POST = (
    rf"(?:\+(?!\d){_NOT_UNIT}"  # "100+", but not "4+ stars"
    r"|(?: (?:and up|and above|and over|or more|or above|or higher|plus|min(?:imum)?|at least))(?!\w))"
)
_CHEAP = (
    r"(?:not (?:too |so |very |that )?(?:expensive|pricey|costly)|cheap(?:er|est)?|budget|affordable"
    r"|inexpensive|low[- ]?cost|low[- ]?priced?|bargain|economical)"
)
_PREMIUM = r"(?:premium|luxury|luxurious|high[- ]?end|top[- ]?end|top of the line|expensive|pricey|upscale)"

# One left-to-right pass; at each position the first alternative that matches wins, so the order says
# what a phrase means: a range before a single bound ("from 20 to 40" before "from 20"), a phrase
# before a bare word ("budget 100" before "budget"). Every repetition is bounded or over a distinct
# character class and the view has no whitespace runs, so matching is linear in the query's length.
_PRICE_RE = re.compile(
    # Not inside a word or a number, nor inside a chain like "10-20-30" (a code, not a range).
    r"(?<![\w.,])(?<!\d[-–—])(?<!\d [-–—] )(?:"
    rf"(?P<range>{_LEAD}(?:between ?{_AMT} ?(?:and|&|{_DASH}|to) ?{_AMT}"
    rf"|from ?{_AMT} ?(?:to|{_DASH}|until|till) ?{_AMT}|{_AMT} ?(?:{_DASH}|to) ?{_AMT})(?! ?{_DASH} ?\d))"
    rf"|(?P<under>{_LEAD}{_UNDER_PRE} ?{_AMT}|{_AMT}{_UNDER_POST})"
    rf"|(?P<over>{_LEAD}{_OVER_PRE} ?{_AMT}|{_AMT}{_OVER_POST})"
    # "around $50" is no bound; matched only so that the lone-amount rule below does not claim it.
    rf"|(?P<approx>(?:around|about|approx(?:imately)?\.?|roughly|circa|~) ?{_AMT})"
    # A lone amount with a currency ("€30", "50 dollars") is the shopper's budget: an upper bound.
    rf"|(?P<at>{_CUR_PRE} ?{_NUM}k?(?!\w){_NOT_UNIT}{_CUR_POST}?|{_NUM}k?(?!\w){_NOT_UNIT}{_CUR_POST})"
    rf"|(?P<cheap>{_CHEAP})(?!\w)"
    rf"|(?P<premium>{_PREMIUM})(?!\w)"
    r")"
)
_AMOUNT_RE = re.compile(rf"(?<![\d.,])({_NUM})(k?)(?!\w)")


def _amounts(phrase: str) -> list[float]:
    out = []
    for num, k in _AMOUNT_RE.findall(phrase):
        if re.fullmatch(r"\d{1,3}(?:\.\d{3})+(?:,\d{2})?|\d+,\d{2}", num):  # European: 1.200,50
            num = num.replace(".", "").replace(",", ".")
        else:
            num = num.replace(",", "")
        value = float(num) * (1000.0 if k else 1.0)
        if math.isfinite(value):
            out.append(value)
    return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), without importing numpy here.
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# --- the parser -----------------------------------------------------------------------------------

class QueryParser:
    """Parses queries against one catalog's brands, categories and (optionally) their prices.

    "cheap"-like words give max_price = the 25th percentile of the matched categories' prices (of all
    prices when no category matched), "premium"-like words min_price = the 75th percentile; without
    prices they give no bound. An explicit bound wins over a word for its side.
    """

    def __init__(self, brands: Iterable[str], categories: Iterable[str],
                 category_prices: Mapping[str, Sequence[float]] | None = None):
        # key (spelling-free form of a matched alias) -> [(kind, catalog name)]; usually one entry,
        # two when a brand and a category share a name, or a catalog spells one brand two ways.
        self._names: dict[str, list[tuple[str, str]]] = {}
        aliases: set[tuple[str, ...]] = set()
        for kind, names, expand in (("brand", brands, _brand_aliases), ("category", categories, _category_aliases)):
            for name in dict.fromkeys(n for n in names if isinstance(n, str) and n.strip()):
                for alias in expand(_normalise(name)[0].strip()):
                    key = _name_key(alias)
                    units = _units(alias)
                    if units is None or len(key) < 2 or alias.strip() in _STOPWORDS:
                        continue
                    aliases.add(units)
                    entries = self._names.setdefault(key, [])
                    if (kind, name) not in entries:
                        entries.append((kind, name))
        trie = _trie_regex(aliases)
        self._name_re = re.compile(rf"(?<!\w)(?:{trie})(?!\w)") if trie else None

        self._prices: dict[str, list[float]] = {}
        for cat, values in (category_prices or {}).items():
            clean = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
            if clean:
                self._prices[cat] = clean
        self._all_prices = sorted(v for vs in self._prices.values() for v in vs)
        self._quartiles: dict[tuple[str, ...], tuple[float, float] | None] = {}

    def _price_quartiles(self, categories: tuple[str, ...]) -> tuple[float, float] | None:
        """(25th, 75th) percentile of the categories' prices; of all prices when none is known."""
        key = tuple(sorted(c for c in categories if c in self._prices))  # sorted: one cache entry per set
        if key not in self._quartiles:
            values = sorted(v for c in key for v in self._prices[c]) if key else self._all_prices
            self._quartiles[key] = (_percentile(values, 0.25), _percentile(values, 0.75)) if values else None
        return self._quartiles[key]

    def parse(self, query: str) -> ParsedQuery:
        view, src = _normalise(query)

        # Brands and categories: leftmost-longest catalog names, whole words only.
        brands: list[str] = []
        cat_hits: list[tuple[int, int, list[str]]] = []
        name_spans: list[tuple[int, int]] = []
        for m in self._name_re.finditer(view) if self._name_re else ():
            entries = self._names.get(_name_key(m.group()), [])
            name_spans.append(m.span())
            brands += [n for k, n in entries if k == "brand"]
            cats = [n for k, n in entries if k == "category"]
            if cats:
                cat_hits.append((m.start(), m.end(), cats))
        # Two category names in a row are a compound noun whose last word is the thing wanted:
        # "laptop backpack" is a backpack, "fitness watch" a watch.
        categories: list[str] = []
        for i, (_, end, cats) in enumerate(cat_hits):
            if i + 1 < len(cat_hits) and view[end:cat_hits[i + 1][0]] in ("", " ", "-"):
                continue
            categories += cats
        categories_t = tuple(dict.fromkeys(categories))

        # Prices. A catalog name wins over a price word it overlaps (a "Luxury Watches" category).
        uppers: list[float] = []
        lowers: list[float] = []
        cheap = premium = False
        cut: list[tuple[int, int]] = []
        for m in _PRICE_RE.finditer(view):
            s, e = m.span()
            if any(s < ne and ns < e for ns, ne in name_spans):
                continue
            kind = m.lastgroup
            if kind == "approx":
                continue  # no bound, so its words stay for relevance
            values = _amounts(m.group())
            if kind == "range" and len(values) == 2:
                lo, hi = sorted(values)
                lowers.append(lo)
                uppers.append(hi)
            elif kind in ("under", "at") and values:
                uppers.append(values[0])
            elif kind == "over" and values:
                lowers.append(values[0])
            elif kind == "cheap":
                cheap = True
            elif kind == "premium":
                premium = True
            else:
                continue  # an amount that did not parse (e.g. overflow): leave the text alone
            cut.append((s, e))

        max_price = min(uppers) if uppers else None  # several bounds on one side: the tightest
        min_price = max(lowers) if lowers else None
        if min_price is not None and max_price is not None and min_price > max_price:
            min_price, max_price = max_price, min_price  # "over 100 under 50": read as a range
        if cheap != premium:  # both at once contradict each other: neither
            quartiles = self._price_quartiles(categories_t)
            if quartiles is not None:
                if cheap and max_price is None and (min_price is None or quartiles[0] >= min_price):
                    max_price = quartiles[0]
                if premium and min_price is None and (max_price is None or quartiles[1] <= max_price):
                    min_price = quartiles[1]

        return ParsedQuery(
            text=_cut(query, cut, src),
            brands=tuple(dict.fromkeys(brands)),
            categories=categories_t,
            min_price=min_price,
            max_price=max_price,
        )


def _cut(query: str, spans: list[tuple[int, int]], src: list[int] | None) -> str:
    """The query without the given view spans, whitespace normalised, stray separators trimmed."""
    text = query
    for s, e in reversed(spans):  # spans come in order and do not overlap
        if src is not None:
            s, e = src[s], src[e - 1] + 1
        text = text[:s] + " " + text[e:]
    text = " ".join(text.split())
    if spans:  # what a cut leaves behind: "shoes (under 50)", "shoes, under 50.", "- over 100 -"
        text = " ".join(_EMPTY_BRACKETS.sub(" ", text).split()).strip(" ,;:.-–—/|")
    return text


_EMPTY_BRACKETS = re.compile(r"[(\[{]\s*[)\]}]")
