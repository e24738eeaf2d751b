"""Personalized fields: which profile properties they need, and what they render to."""

from __future__ import annotations

from herald_common import personalization


def test_needed_properties_come_from_profile_variables_only() -> None:
    sources = [
        'Hi {{ profile.first_name | default: "there" }}',
        "{% for lang in profile.langs %}{{ lang | upcase }} {% endfor %}",
        "{% if profile.vip %}VIP{% endif %}",
        "no variables",
    ]
    assert personalization.profile_properties(sources) == {"first_name", "langs", "vip"}


def test_render_with_defaults_and_missing_properties() -> None:
    source = 'Hi {{ profile.first_name | default: "there" }}{% if profile.vip %}, VIP{% endif %}!'
    assert personalization.render(source, {"first_name": "Ada", "vip": True}) == "Hi Ada, VIP!"
    assert personalization.render(source, {}) == "Hi there!"


def test_problems_are_explained() -> None:
    assert personalization.problem("plain text") is None
    assert personalization.problem("{{ profile.plan }}") is None
    assert "not a valid template" in (personalization.problem("{% if %}") or "")
    assert "unknown variable 'campaign.name'" in (personalization.problem("{{ campaign.name }}") or "")
    assert "unknown variable 'profile'" in (personalization.problem("{{ profile }}") or "")
    assert "at most" in (personalization.problem("x" * 5000) or "")
