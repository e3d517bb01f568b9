import pytest

from mvportrait.drivers.text import DEFAULT_EMOTION, DEFAULT_MOTION, PromptParts, split_prompt

# prompt -> (motion, emotion); None = the part's default
CASES = {
    "nods twice slowly, then smiles happily": ("nods twice slowly", "smiles happily"),
    "nods while smiling": ("nods", "smiling"),
    "smiles and nods": ("nods", "smiles"),
    "looks up happily": ("looks up", "happily"),
    "happily nods": ("nods", "happily"),
    "nods": ("nods", None),
    "smiles": (None, "smiles"),
    "grins widely": (None, "grins widely"),
    "shakes head left and right, then frowns angrily": ("shakes head left and right", "frowns angrily"),
    "looks left and right": ("looks left and right", None),
    "A man nods twice and then looks surprised": ("A man nods twice", "looks surprised"),
    "She looks sad, then turns her head to the right": ("turns her head to the right", "She looks sad"),
    "turns to the left while laughing": ("turns to the left", "laughing"),
    "nods with a big smile": ("nods", "with a big smile"),
    "shakes his head in disgust": ("shakes his head", "in disgust"),
    "opens his mouth wide in surprise": ("opens his mouth wide", "in surprise"),
    "speaks angrily to the camera": ("speaks to the camera", "angrily"),
    "turns left looking sad": ("turns left", "looking sad"),
    "raises eyebrows and then nods": ("nods", "raises eyebrows"),
    "winks and tilts head": ("tilts head", "winks"),
    "looks at the camera, disgusted": ("looks at the camera", "disgusted"),
    "remains calm": (None, "remains calm"),
    "stays calm and nods": ("nods", "stays calm"),
    "stays still with a neutral expression": ("stays still", "with a neutral expression"),
    "nods, still smiling": ("nods", "still smiling"),
    "nods twice slowly; cries. Then turns left!": ("nods twice slowly. Then turns left", "cries"),
    "talks while frowning, then smiles broadly and looks down": ("talks and looks down", "frowning, then smiles broadly"),
    "yawns, then looks around nervously": ("yawns, then looks around", "nervously"),
    "sways gently from side to side": ("sways gently from side to side", None),
    "dances": ("dances", None),  # no keyword: the whole prompt is motion
    "Nods\u200b  slowly\tthen\nsmiles": ("Nods slowly", "smiles"),
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_split(prompt):
    motion, emotion = CASES[prompt]
    parts = split_prompt(prompt)
    assert isinstance(parts, PromptParts)
    assert (parts.motion, parts.emotion) == (motion or DEFAULT_MOTION, emotion or DEFAULT_EMOTION)
    assert parts.motion_is_default == (motion is None)
    assert parts.emotion_is_default == (emotion is None)


def test_clauses_keep_prompt_order():
    parts = split_prompt("smiles, then nods, then frowns and turns left")
    assert parts.clauses == (("emotion", "smiles"), ("motion", "nods"), ("emotion", "frowns"), ("motion", "turns left"))
    assert parts.motion == "nods and turns left" and parts.emotion == "smiles, then frowns"
    assert parts.prompt == "smiles, then nods, then frowns and turns left"


def test_explicit_parts_override_the_split():
    parts = split_prompt("nods and smiles", emotion="laughs  out loud")
    assert (parts.motion, parts.emotion) == ("nods", "laughs out loud")
    parts = split_prompt("nods and smiles", motion="turns left")
    assert (parts.motion, parts.emotion) == ("turns left", "smiles")
    parts = split_prompt("", motion="tilts head", emotion="happy")
    assert (parts.motion, parts.emotion) == ("tilts head", "happy")
    assert not parts.motion_is_default and not parts.emotion_is_default
    parts = split_prompt("smiles", motion="stays still")
    assert not parts.motion_is_default


def test_bad_prompts():
    for bad in ("", "  \n ", "\x00\u200b"):
        with pytest.raises(ValueError, match="empty"):
            split_prompt(bad)
    with pytest.raises(ValueError, match="empty"):
        split_prompt("", motion="nods")  # emotion still needs the prompt
    with pytest.raises(TypeError, match="str"):
        split_prompt(None)
    with pytest.raises(TypeError, match="str"):
        split_prompt(["nods"])
    with pytest.raises(TypeError, match="emotion"):
        split_prompt("nods", emotion=1)


def test_long_prompt_is_capped():
    parts = split_prompt("nods, then smiles, " * 500)
    assert len(parts.prompt) <= 2000
    assert parts.motion.startswith("nods") and parts.emotion.startswith("smiles")
