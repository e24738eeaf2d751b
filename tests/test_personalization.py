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


def test_common_fields_render_exactly_as_liquid_does() -> None:
    """Simple fields skip the Liquid engine; what they render must not change."""
    sources = [
        "{{ profile.first_name }}",
        'Hi {{ profile.first_name | default: "there" }}, your code is {{ profile.code }}',
        "{{profile.code}}{{ profile.code }} }} text",
        "{{ profile.plan | default: 'free' }}!",
        "{{ profile.size }} {{ profile.first }} {{ profile.last }}",
        "{{- profile.first_name }} {{ profile.missing | upcase }}",
        '{{ profile.first_name | default: "" }}',
        "{{\n profile.first_name\t}}",
    ]
    profiles: list[dict[str, object]] = [
        {},
        {"first_name": "Ada", "code": 7, "plan": "gold"},
        {"first_name": "", "code": 0, "plan": ""},
        {"first_name": None, "code": -12, "plan": None},
        {"first_name": True, "code": 1.5, "plan": False},
        {"first_name": ["a", "b"], "code": {"x": 1}, "plan": "  "},
        {"first_name": "<b>é</b>", "code": 10**30, "size": "S", "first": None},
        {"first_name": "x" * 40_000},
    ]
    engine = personalization._environment
    for source in sources:
        for profile in profiles:
            expected: str | None
            try:
                expected = engine.from_string(source).render(profile=profile)
            except Exception:
                expected = None  # fails for this recipient
            got: str | None
            try:
                got = personalization.render(source, profile)
            except personalization.PersonalizationError:
                got = None
            assert got == expected, (source, profile)
    assert personalization._simple_parts(sources[1]) is not None  # the common shape takes the short way
