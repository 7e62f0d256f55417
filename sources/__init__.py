"""What serving reads besides the online store (catalog attributes, item popularity, behaviour events),
behind one interface: Feast's offline store API for any offline store, or memory in unit tests."""
