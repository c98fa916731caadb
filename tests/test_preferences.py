import json
from importlib import resources

import pytest

from mope.preferences import Dimension, Preference, PreferenceRegistry, default_registry, load_registry


def packaged():
    return json.loads(resources.files("mope").joinpath("data/preferences.json").read_text())


def test_parse_codes_and_names_agree_with_packaged_data():
    data = packaged()["dimensions"]
    by_code = Preference.parse("P1A,P2B,P3A")
    by_name = Preference.parse("elementary, informative ,FRIENDLY")
    assert by_code == by_name
    assert by_code.code == "P1A,P2B,P3A"
    assert by_code.prompt_text() == " ".join(data[c]["prompt"] for c in ("P1A", "P2B", "P3A"))
    assert by_code.active_mask(6) == [True, False, False, True, True, False]


@pytest.mark.parametrize(
    "text, match",
    [("P1A,P9Z", "unknown preference dimension 'P9Z'.*P1A \\(elementary\\)"),
     ("P1A,P1B", "two dimensions of axis 'expertise'"),
     ("concise,informative", "two dimensions of axis 'informativeness'"),
     ("", "non-empty")],
)
def test_bad_preferences_are_value_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Preference.parse(text)


def test_eight_combinations_one_per_axis():
    combos = default_registry().combinations()
    assert len(combos) == 8 and len({c.code for c in combos}) == 8
    for c in combos:
        assert sorted(d.axis for d in c.dimensions) == ["expertise", "informativeness", "style"]


def test_prompt_format_expert_and_pcm_views():
    reg = default_registry()
    pref = Preference.parse("P2A")
    expert_prompt = reg.format_prompt("Name a colour.")
    pcm_prompt = reg.format_prompt("Name a colour.", pref)
    fmt = packaged()["prompt_format"]
    assert pcm_prompt == fmt.replace("{instruction}", "Name a colour.").replace(
        "{preference prompts joined by spaces}", pref.prompt_text())
    assert expert_prompt == "<|user|>\nName a colour.\n<|assistant|>\n"
    assert reg.instruction_of(expert_prompt) == "Name a colour."
    assert reg.instruction_of("raw text") == "raw text"


def test_user_registered_dimensions_and_named_experts():
    reg = PreferenceRegistry(prompt_format="Q: {instruction} ({preference prompts joined by spaces})\nA:")
    reg.register(Dimension("T1", "tone", "pirate", "Talk like a pirate.", "pirate_expert"))
    reg.register(Dimension("L1", "length", "short", "Be short.", 0))
    pref = reg.parse("pirate,L1")
    assert pref.active_mask(["/ckpt/base", "/ckpt/pirate_expert"]) == [True, True]
    assert reg.format_prompt("hi", pref) == "Q: hi (Talk like a pirate. Be short.)\nA:"
    with pytest.raises(ValueError, match="no expert named 'pirate_expert'"):
        pref.active_mask(["a", "b"])
    with pytest.raises(ValueError, match="served by expert 0, but there are only 0 experts"):
        reg.parse("short").active_mask(0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Dimension("T2", "tone", "pirate", "x", 1))


def test_load_registry_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preferences file not found"):
        load_registry(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="prompt_format"):
        load_registry({"dimensions": {}})
