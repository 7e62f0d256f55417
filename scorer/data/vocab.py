"""The synthetic shop's vocabulary: categories, product types, brands, features, colours.

Plain data, no logic. The generator (synthetic.py) draws items from it, and the query parser of the
gateway later learns the same vocabulary from the catalog itself (never from this file), so a real
catalog works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CategorySpec:
    name: str
    types: tuple[str, ...]  # product types, as they appear in titles and queries
    features: tuple[str, ...]  # selling points a shopper searches for
    brands: tuple[str, ...]
    median_price: float  # typical price of a mid-tier brand's item, in the shop currency
    materials: tuple[str, ...] = ()


CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec(
        "Running Shoes",
        ("road running shoes", "trail running shoes", "racing shoes", "stability running shoes"),
        ("cushioned", "lightweight", "waterproof", "breathable", "wide fit", "carbon plate"),
        ("Nike", "Adidas", "Asics", "Brooks", "Hoka", "New Balance", "Saucony"),
        120.0,
        ("mesh", "knit", "synthetic"),
    ),
    CategorySpec(
        "Sneakers",
        ("low top sneakers", "high top sneakers", "slip-on sneakers", "skate shoes"),
        ("leather", "vegan", "classic", "platform", "retro", "canvas"),
        ("Nike", "Adidas", "Puma", "Vans", "Converse", "New Balance"),
        85.0,
        ("leather", "canvas", "suede"),
    ),
    CategorySpec(
        "T-Shirts",
        ("crew neck t-shirt", "v-neck t-shirt", "running t-shirt", "graphic t-shirt"),
        ("organic cotton", "quick dry", "oversized", "slim fit", "moisture wicking"),
        ("Nike", "Adidas", "Uniqlo", "Patagonia", "H&M", "Puma"),
        25.0,
        ("cotton", "polyester", "merino"),
    ),
    CategorySpec(
        "Jackets",
        ("rain jacket", "down jacket", "fleece jacket", "softshell jacket", "windbreaker"),
        ("waterproof", "insulated", "packable", "hooded", "windproof", "recycled"),
        ("Patagonia", "The North Face", "Columbia", "Arcteryx", "Uniqlo", "Nike"),
        140.0,
        ("nylon", "polyester", "down", "fleece"),
    ),
    CategorySpec(
        "Backpacks",
        ("hiking backpack", "laptop backpack", "travel backpack", "daypack"),
        ("waterproof", "anti-theft", "lightweight", "40l", "20l", "rolltop"),
        ("Osprey", "Deuter", "The North Face", "Herschel", "Samsonite", "Patagonia"),
        90.0,
        ("nylon", "canvas", "polyester"),
    ),
    CategorySpec(
        "Headphones",
        ("over-ear headphones", "wireless earbuds", "on-ear headphones", "sports earbuds"),
        ("noise cancelling", "wireless", "bluetooth", "long battery", "foldable", "waterproof"),
        ("Sony", "Bose", "Apple", "Sennheiser", "JBL", "Anker"),
        150.0,
    ),
    CategorySpec(
        "Smartphones",
        ("smartphone", "5g phone", "compact phone", "phablet"),
        ("128gb", "256gb", "dual sim", "triple camera", "fast charging", "oled"),
        ("Apple", "Samsung", "Google", "Xiaomi", "OnePlus", "Motorola"),
        600.0,
    ),
    CategorySpec(
        "Laptops",
        ("ultrabook", "gaming laptop", "2-in-1 laptop", "business laptop"),
        ("16gb ram", "ssd", "touchscreen", "lightweight", "long battery", "oled"),
        ("Apple", "Dell", "Lenovo", "HP", "Asus", "Acer"),
        1100.0,
    ),
    CategorySpec(
        "Coffee Makers",
        ("espresso machine", "drip coffee maker", "capsule machine", "moka pot", "french press"),
        ("milk frother", "programmable", "stainless steel", "compact", "grinder"),
        ("Breville", "DeLonghi", "Nespresso", "Keurig", "Philips", "Bialetti"),
        150.0,
        ("stainless steel", "plastic", "aluminium", "glass"),
    ),
    CategorySpec(
        "Cookware",
        ("frying pan", "dutch oven", "saucepan", "wok", "cookware set"),
        ("non-stick", "cast iron", "induction", "dishwasher safe", "stainless steel"),
        ("Le Creuset", "Tefal", "Lodge", "All-Clad", "Zwilling", "IKEA"),
        70.0,
        ("cast iron", "stainless steel", "aluminium", "ceramic"),
    ),
    CategorySpec(
        "Yoga & Fitness",
        ("yoga mat", "resistance bands", "dumbbells", "foam roller", "yoga leggings"),
        ("non-slip", "eco", "extra thick", "adjustable", "high waisted"),
        ("Lululemon", "Manduka", "Gaiam", "Nike", "Adidas", "Reebok"),
        45.0,
        ("natural rubber", "tpe", "neoprene", "nylon"),
    ),
    CategorySpec(
        "Watches",
        ("smartwatch", "gps watch", "dive watch", "chronograph watch", "digital watch"),
        ("heart rate", "solar", "waterproof", "sapphire glass", "gps"),
        ("Casio", "Garmin", "Apple", "Seiko", "Fossil", "Timex"),
        220.0,
        ("stainless steel", "titanium", "resin", "leather"),
    ),
)

# Price level of a brand relative to the category median (1.0 = mid-tier).
BRAND_PRICE_TIER: dict[str, float] = {
    "Arcteryx": 1.9, "Le Creuset": 1.8, "All-Clad": 1.7, "Apple": 1.5, "Bose": 1.4, "Lululemon": 1.6,
    "Garmin": 1.4, "Sennheiser": 1.3, "Breville": 1.4, "Zwilling": 1.3, "Patagonia": 1.35, "Hoka": 1.15,
    "Osprey": 1.2, "Manduka": 1.3, "Seiko": 1.3, "The North Face": 1.2, "Samsung": 1.2, "Sony": 1.15,
    "Uniqlo": 0.6, "H&M": 0.5, "IKEA": 0.5, "Anker": 0.55, "Xiaomi": 0.55, "Casio": 0.5, "Timex": 0.6,
    "Acer": 0.7, "Gaiam": 0.7, "Tefal": 0.75, "Keurig": 0.8, "Bialetti": 0.5, "Lodge": 0.7,
    "Motorola": 0.6, "Columbia": 0.8, "Deuter": 0.95, "Herschel": 0.9, "Reebok": 0.8, "Puma": 0.85,
    "Vans": 0.8, "Converse": 0.8, "JBL": 0.8, "Fossil": 0.9,
}

COLOURS: tuple[str, ...] = (
    "black", "white", "grey", "navy", "blue", "red", "green", "olive", "beige", "pink", "orange", "silver",
)

# Invented model names (no real product lines), combined with a number for variety.
MODEL_WORDS: tuple[str, ...] = (
    "Aero", "Nova", "Pulse", "Summit", "Swift", "Terra", "Vibe", "Zen", "Edge", "Core", "Flux", "Orbit",
    "Ridge", "Drift", "Quest", "Bolt", "Echo", "Atlas", "Nimbus", "Vertex", "Glide", "Cirrus", "Haven", "Spark",
)

# How shoppers say price in queries; {p} is a number. Parsed back by the gateway's query parser.
PRICE_UNDER = ("under {p}", "below {p}", "less than {p}", "up to {p}", "max {p}")
PRICE_OVER = ("over {p}", "above {p}", "more than {p}")
PRICE_RANGE = ("between {lo} and {hi}", "{lo}-{hi}", "${lo}-${hi}")
PRICE_WORDS_CHEAP = ("cheap", "budget", "affordable")
PRICE_WORDS_PREMIUM = ("premium", "luxury", "high end")
