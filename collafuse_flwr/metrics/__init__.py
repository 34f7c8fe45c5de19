"""Measurements of CollaFuse runs (sample quality, disclosure, privacy); torch only, no Flower.
Nothing is imported here: a package importing its submodules deadlocks when two threads import them."""
