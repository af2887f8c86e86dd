"""Model-level operations shared by every method (attach, count, merge, state, routing, named adapters)."""
