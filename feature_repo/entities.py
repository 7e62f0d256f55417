"""Entities: the shop's users and items, keyed by their string ids."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper (or a pseudonym of one). Unknown ids are cold-start users.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A product in the catalog.",
)
