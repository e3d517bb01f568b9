"""Split a text prompt into the motion part (MotionDM: head/neck/jaw pose) and the emotion part
(EmotionDM: expression coefficients), rule-based.

Rules, in order:

1. The prompt is cleaned by ``normalize_prompt`` (NFKC, control characters, whitespace).
2. It is cut into clauses at punctuation (``, ; : . ! ?``) and at connectives (``and``, ``then``,
   ``and then``, ``while``, ``whilst``, ``meanwhile``, ``before``, ``after that``, ``afterwards``,
   ``followed by``, ``finally``, ``but``). Each clause remembers the separator in front of it.
3. Every word is tagged by keyword lists: MOTION (nod, shake, turn, tilt, glance, sway, bob, lean,
   bow, twist, rotate, move, talk, speak, say, sing, whisper, shout, chew, yawn, stay still...;
   ``look``/``gaze``/``stare`` only when a direction follows: "looks up", "looks at the camera";
   ``raise/lower/lift/drop/roll/open/close`` only with head/chin/neck/mouth/jaw/lips nearby) or
   EMOTION (smile, grin, laugh, happy/happily, sad, cry, frown, angry, surprised, disgusted, fear,
   afraid, nervous, neutral, calm, relaxed, smirk, wink, blink, eyebrows, expression...). Facial
   actions that FLAME encodes as expression (wink, blink, eyebrows) count as emotion.
4. A clause with neither joins the clause before it ("looks left and right" stays one clause; a
   leading one joins the next). A clause with only motion words goes to motion, only emotion words
   to emotion. A clause with both is split: its emotion spans (the emotion words plus adjacent
   modifiers such as "with a", "very", "looking", "in") go to emotion ("looks up happily" ->
   "looks up" + "happily"; "nods with a smile" -> "nods" + "with a smile"); the rest goes to motion
   if it still has a motion word, otherwise the whole clause is emotion ("remains calm").
5. Each part is its clauses in prompt order joined by their original separators (the first one's
   separator dropped): "nods twice slowly, then turns left, then smiles" -> motion "nods twice
   slowly, then turns left", emotion "smiles".
6. An empty part gets a default: ``DEFAULT_MOTION`` = "stays still", ``DEFAULT_EMOTION`` =
   "neutral expression" (flagged in ``PromptParts`` so a pipeline may use the unconditional
   embedding instead). A prompt with no keyword at all is taken as motion.

Explicit ``motion=`` / ``emotion=`` arguments override the split of that part.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mvportrait.models.text_encoder import normalize_prompt

DEFAULT_MOTION = "stays still"
DEFAULT_EMOTION = "neutral expression"

_CONNECTIVE = (r"(?:and\s+then|and\s+finally|and\s+afterwards|after\s+that|followed\s+by|"
               r"and|then|while|whilst|meanwhile|before|afterwards|finally|but)")
_BOUNDARY = re.compile(rf"(\s*[,;:.!?](?:[\s,;:.!?]*[,;:.!?])?\s*(?:{_CONNECTIVE}\b\s*)?|\s+{_CONNECTIVE}\b\s*)",
                       re.IGNORECASE)


def _words(*patterns: str) -> re.Pattern:
    return re.compile(r"^(?:" + "|".join(patterns) + r")$")


_MOTION = _words(
    r"nod(?:s|ded|ding)?", r"shak(?:e|es|ing)", r"shook", r"turn(?:s|ed|ing)?", r"tilt(?:s|ed|ing)?",
    r"glanc(?:e|es|ed|ing)", r"sway(?:s|ed|ing)?", r"bob(?:s|bed|bing)?", r"rock(?:s|ed|ing)?",
    r"lean(?:s|ed|ing)?", r"bow(?:s|ed|ing)?", r"twist(?:s|ed|ing)?", r"rotat(?:e|es|ed|ing)",
    r"swivel(?:s|ed|led|ing|ling)?", r"jerk(?:s|ed|ing)?", r"mov(?:e|es|ed|ing)", r"wobbl(?:e|es|ed|ing)",
    r"talk(?:s|ed|ing)?", r"speak(?:s|ing)?", r"spoke", r"say(?:s|ing)?", r"said", r"chat(?:s|ted|ting)?",
    r"sing(?:s|ing)?", r"sang", r"whisper(?:s|ed|ing)?", r"shout(?:s|ed|ing)?", r"yell(?:s|ed|ing)?",
    r"mutter(?:s|ed|ing)?", r"mumbl(?:e|es|ed|ing)", r"chew(?:s|ed|ing)?", r"yawn(?:s|ed|ing)?",
    r"motionless",
)
_STILL_VERB = _words(r"stay(?:s|ed|ing)?", r"remain(?:s|ed|ing)?", r"hold(?:s|ing)?", r"held", r"keep(?:s|ing)?",
                     r"kept", r"sit(?:s|ting)?", r"sat", r"stand(?:s|ing)?", r"stood", r"is", r"are", r"be",
                     r"perfectly", r"completely", r"totally", r"very")
_LOOK = _words(r"look(?:s|ed|ing)?", r"gaz(?:e|es|ed|ing)", r"star(?:e|es|ed|ing)", r"peek(?:s|ed|ing)?")
_DIRECTION = _words(r"up(?:wards?)?", r"down(?:wards?)?", r"left", r"right", r"around", r"round", r"away",
                    r"at", r"aside", r"over", r"back", r"forwards?", r"sideways", r"to", r"towards?", r"into",
                    r"straight", r"ahead", r"off")
_HEAD_ACTION = _words(r"rais(?:e|es|ed|ing)", r"lower(?:s|ed|ing)?", r"lift(?:s|ed|ing)?", r"drop(?:s|ped|ping)?",
                      r"roll(?:s|ed|ing)?", r"open(?:s|ed|ing)?", r"clos(?:e|es|ed|ing)")
_HEAD_PART = _words(r"head", r"chin", r"neck", r"mouth", r"jaw", r"lips?")
_EMOTION = _words(
    r"smil(?:e|es|ed|ing)", r"smiley", r"grin(?:s|ned|ning)?", r"laugh(?:s|ed|ing|ter)?",
    r"giggl(?:e|es|ed|ing)", r"chuckl(?:e|es|ed|ing)", r"(?:un)?happ(?:y|ily|ier|iest|iness)",
    r"joy(?:ful|fully|ous|ously)?", r"cheer(?:ful|fully|y)", r"delight(?:ed|edly|ful)?", r"glad(?:ly)?",
    r"pleased", r"gleeful(?:ly)?", r"ecstatic", r"excit(?:ed|edly|ement)", r"thrilled",
    r"sad(?:ly|ness|der)?", r"sorrow(?:ful|fully)?", r"upset", r"gloom(?:y|ily)", r"melanchol(?:y|ic)",
    r"depressed", r"miserable", r"grie(?:f|ving|ves)", r"cr(?:y|ies|ied|ying)", r"tear(?:s|ful|fully)",
    r"weep(?:s|ing)?", r"wept", r"sob(?:s|bed|bing)?", r"frown(?:s|ed|ing)?", r"scowl(?:s|ed|ing)?",
    r"grimac(?:e|es|ed|ing)", r"pout(?:s|ed|ing)?", r"sneer(?:s|ed|ing)?", r"smirk(?:s|ed|ing)?",
    r"angr(?:y|ily|ier)", r"anger(?:ed)?", r"furious(?:ly)?", r"fury", r"mad", r"rage", r"enraged",
    r"annoy(?:ed|ance)", r"irritat(?:ed|ion)", r"frustrat(?:ed|ion)", r"surpris(?:e|ed|edly|ing|ingly)",
    r"astonish(?:ed|ment)", r"amaz(?:ed|ement)", r"shock(?:ed)?", r"startl(?:e|ed)", r"stunned",
    r"disgust(?:ed|edly|ing)?", r"repuls(?:ed|ion)", r"revolted", r"fear(?:ful|fully)?", r"afraid",
    r"scared", r"frighten(?:ed)?", r"terrif(?:ied|ying)", r"terror", r"horrif(?:ied)", r"anxious(?:ly)?",
    r"anxiety", r"nervous(?:ly)?", r"worr(?:y|ied|iedly)", r"neutral(?:ly)?", r"calm(?:ly)?",
    r"relax(?:ed|edly)", r"seren(?:e|ely)", r"peaceful(?:ly)?", r"content(?:ed|edly)?",
    r"expressionless", r"emotionless", r"blank(?:ly)?", r"stoic(?:ally)?", r"contempt(?:uous|uously)?",
    r"bored(?:om)?", r"confus(?:ed|edly|ion)", r"puzzled", r"proud(?:ly)?", r"shy(?:ly)?",
    r"embarrass(?:ed|ment)", r"wink(?:s|ed|ing)?", r"blink(?:s|ed|ing)?", r"(?:eye)?brows?",
    r"emotion(?:s|al|ally)?", r"expressions?", r"mood",
)
# Words that join an emotion span on its left inside a mixed clause ("nods with a big smile"); a span
# never starts with an adjective ("opens his mouth wide in surprise" -> "in surprise").
_ADJECTIVE = _words(r"big", r"broad", r"wide", r"small", r"faint", r"warm", r"huge", r"gentle", r"soft", r"slight")
_MODIFIER = _words(r"with", r"in", r"of", r"a", r"an", r"the", r"his", r"her", r"their", r"very", r"slightly",
                   r"really", r"so", r"quite", r"extremely", r"somewhat", r"bit", r"little", r"more", r"less",
                   r"look(?:s|ing)?", r"seem(?:s|ing)?", r"appear(?:s|ing)?", r"feel(?:s|ing)?", r"becom(?:e|es|ing)",
                   r"remain(?:s|ing)?", r"stay(?:s|ing)?", _ADJECTIVE.pattern[1:-1])


@dataclass(frozen=True)
class PromptParts:
    """The two texts fed to MotionDM and EmotionDM, and how they were obtained."""

    motion: str
    emotion: str
    prompt: str = ""  # the cleaned input prompt
    motion_is_default: bool = False  # True when ``motion`` is DEFAULT_MOTION because nothing matched
    emotion_is_default: bool = False
    clauses: tuple[tuple[str, str], ...] = ()  # (label, text) per clause piece: motion | emotion


def _key(word: str) -> str:
    return re.sub(r"[^0-9a-z]", "", word.lower())


def _tag(words: list[str]) -> list[str | None]:
    keys = [_key(w) for w in words]
    tags: list[str | None] = []
    for i, k in enumerate(keys):
        near = keys[i + 1:i + 4]
        if _EMOTION.match(k):
            tags.append("E")
        elif k == "still":  # "stays still" is motion, "still smiling" is not
            tags.append("M" if i and _STILL_VERB.match(keys[i - 1]) else None)
        elif k.startswith("stay"):  # "stays still" is motion, "stays calm" is not
            tags.append("M" if "still" in near[:2] or "motionless" in near[:2] else None)
        elif _MOTION.match(k):
            tags.append("M")
        elif _LOOK.match(k) and any(_DIRECTION.match(n) for n in near[:2]):
            tags.append("M")
        elif _HEAD_ACTION.match(k) and any(_HEAD_PART.match(n) for n in near):
            tags.append("M")
        else:
            tags.append(None)
    return tags


def _split_mixed(words: list[str], tags: list[str | None]) -> tuple[str, str]:
    """(motion, emotion) text of a clause holding both kinds of words."""
    in_emotion = [t == "E" for t in tags]
    for i, t in enumerate(tags):  # grow each emotion word's span left over modifiers
        if t != "E":
            continue
        j = i
        while j > 0 and tags[j - 1] is None and _MODIFIER.match(_key(words[j - 1])):
            j -= 1
        while j < i and _ADJECTIVE.match(_key(words[j])):  # "mouth wide in surprise": not "wide"
            j += 1
        for k in range(j, i):
            in_emotion[k] = True
    rest = [(w, t) for w, t, e in zip(words, tags, in_emotion) if not e]
    emotion = " ".join(w for w, e in zip(words, in_emotion) if e)
    if not any(t == "M" for _, t in rest):
        return "", " ".join(words)
    return " ".join(w for w, _ in rest), emotion


def _clauses(text: str) -> list[list[str]]:
    """[[separator, clause], ...] with unclassified clauses merged into a neighbour."""
    pieces = _BOUNDARY.split(text)
    raw = [[pieces[i - 1] if i else "", pieces[i].strip()] for i in range(0, len(pieces), 2)]
    raw = [c for c in raw if c[1]]
    merged: list[list[str]] = []
    pending = ""  # leading clauses without keywords, waiting for the next clause
    for sep, clause in raw:
        has_kw = any(_tag(clause.split()))
        if pending:  # only before the first keyword clause, so the merged clause comes first
            clause, sep, pending = pending + sep + clause, "", ""
        if not has_kw and merged:
            merged[-1][1] += sep + clause
        elif not has_kw:
            pending = clause
        else:
            merged.append([sep, clause])
    if pending:  # no clause had a keyword: the whole prompt is one (motion) clause
        merged.append(["", pending])
    return merged


def _join(pieces: list[tuple[str, str]]) -> str:
    out = ""
    for sep, text in pieces:
        out += (sep if out else "") + text
    return re.sub(r"\s+", " ", out).strip(" ,;:")


def split_prompt(prompt: str, *, motion: str | None = None, emotion: str | None = None) -> PromptParts:
    """Split ``prompt`` into motion and emotion texts (see the module docstring for the rules).

    ``motion`` / ``emotion``, when given, replace that part of the split. ``prompt`` may be empty only
    when both are given. Raises TypeError for non-strings, ValueError for an empty prompt.
    """
    for label, value in (("motion", motion), ("emotion", emotion)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{label}= must be a str or None, got {type(value).__name__}")
    motion = normalize_prompt(motion) if motion is not None else None
    emotion = normalize_prompt(emotion) if emotion is not None else None
    text = normalize_prompt(prompt, allow_empty=motion is not None and emotion is not None)

    motion_pieces: list[tuple[str, str]] = []
    emotion_pieces: list[tuple[str, str]] = []
    labelled: list[tuple[str, str]] = []
    for sep, clause in _clauses(text):
        words = clause.split()
        tags = _tag(words)
        if "E" in tags and "M" in tags:
            m, e = _split_mixed(words, tags)
        elif "E" in tags:
            m, e = "", clause
        else:
            m, e = clause, ""
        if m:
            motion_pieces.append((sep, m))
            labelled.append(("motion", m))
        if e:
            emotion_pieces.append((sep, e))
            labelled.append(("emotion", e))

    split_motion, split_emotion = _join(motion_pieces), _join(emotion_pieces)
    final_motion = motion if motion is not None else (split_motion or DEFAULT_MOTION)
    final_emotion = emotion if emotion is not None else (split_emotion or DEFAULT_EMOTION)
    return PromptParts(
        motion=final_motion, emotion=final_emotion, prompt=text,
        motion_is_default=motion is None and not split_motion,
        emotion_is_default=emotion is None and not split_emotion,
        clauses=tuple(labelled),
    )
