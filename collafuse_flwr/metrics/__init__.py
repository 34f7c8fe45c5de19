"""Measurements for CollaFuse runs: sample quality, compute, communication, and disclosure.

Each submodule has one job: ``fid`` (FID/KID), ``features`` (which backbone, offline),
``digits_cnn`` (the offline digit feature networks), ``disclosure`` (empirical leakage of
uploads) and ``privacy`` (formal epsilon of uploads). Torch only, no Flower. Nothing is imported
here: a package that imports its submodules deadlocks when two threads import them at once.
"""
