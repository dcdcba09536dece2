"""Flower reports deprecated features through its logger; the autouse fixture in conftest.py
fails any test during which Flower logs one, except the deprecations kept on purpose."""

from flwr.supercore.logger import warn_deprecated_feature

def test_a_deprecation_logged_by_flower_is_caught_and_a_kept_one_is_not(
        no_flower_deprecations):
    warn_deprecated_feature("something old")
    assert no_flower_deprecations.seen and "something old" in no_flower_deprecations.seen[0]
    no_flower_deprecations.seen.clear()
    warn_deprecated_feature("The `run_simulation` function is deprecated and ...")
    assert no_flower_deprecations.seen == []
