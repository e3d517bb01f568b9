"""Procedural facial-expression clips (FLAME expression coefficients) with labels and captions.

An expression clip is one emotion at one intensity with a timing profile, plus random blinks,
built on the semantic components of the synthetic head (``EXPRESSION_NAMES``; a coefficient of
1 is a clear moderate expression, 2 a strong one):

==========  ===========================================================================
emotion     recipe (weights at intensity 1; each sample jitters them by up to +-15 %)
==========  ===========================================================================
neutral     nothing
happy       smile 1.0, a little eye squint (eye_close 0.12 each side)
sad         frown 1.0, brow_inner_raise 0.85
angry       brow_furrow 1.0, lip_press 0.7, nose_wrinkle 0.3
surprised   brow_raise 1.0, eyes_wide 0.8, lips_part 0.8
disgusted   nose_wrinkle 1.0, upper_lip_raise 0.9, brow_furrow 0.35, frown 0.2
fearful     brow_raise 0.6, brow_inner_raise 0.8, eyes_wide 0.8, mouth_stretch 0.8
==========  ===========================================================================

Intensity (scale of the recipe): ``slight`` 0.45-0.65, ``moderate`` 0.9-1.2, ``strong``
1.6-2.0 (neutral has none). Timing of the envelope: ``hold`` (present the whole clip),
``gradual`` (neutral, then a 1.5-2.5 s minimum-jerk rise, then held), ``sudden`` (neutral for
0.5-1.5 s, then a 0.1-0.25 s rise, then held), ``brief`` (rises, holds 0.8-1.5 s, fades back).
Neutral clips are always ``hold``. On top: slow noise on every coefficient (small on the
semantic ones, decaying with the index on the others) and blinks (eye_close_left + right
pulses of 150-300 ms, every 2-6 s).

Captions come from phrase banks with fixed train / test wordings, like the motion captions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mvportrait.data.motion import SUBJECTS, Bank, as_rng, check_clip_args, min_jerk, smooth_noise, with_subject
from mvportrait.flame.synthetic import EXPRESSION_NAMES

EMOTIONS = ("neutral", "happy", "sad", "angry", "surprised", "disgusted", "fearful")
INTENSITIES = ("slight", "moderate", "strong")
TIMINGS = ("hold", "gradual", "sudden", "brief")
N_SEMANTIC = len(EXPRESSION_NAMES)

RECIPES = {
    "neutral": {},
    "happy": {"smile": 1.0, "eye_close_left": 0.12, "eye_close_right": 0.12},
    "sad": {"frown": 1.0, "brow_inner_raise": 0.85},
    "angry": {"brow_furrow": 1.0, "lip_press": 0.7, "nose_wrinkle": 0.3},
    "surprised": {"brow_raise": 1.0, "eyes_wide": 0.8, "lips_part": 0.8},
    "disgusted": {"nose_wrinkle": 1.0, "upper_lip_raise": 0.9, "brow_furrow": 0.35, "frown": 0.2},
    "fearful": {"brow_raise": 0.6, "brow_inner_raise": 0.8, "eyes_wide": 0.8, "mouth_stretch": 0.8},
}
INTENSITY_SCALE = {"slight": (0.45, 0.65), "moderate": (0.9, 1.2), "strong": (1.6, 2.0)}
RECIPE_JITTER = 0.15
SEMANTIC_NOISE = 0.04     # std of the slow noise on semantic coefficients
OTHER_NOISE = 0.3         # std of the slow noise on coefficient 15, decaying as (k - 14) ** -0.5
BLINK_S = (0.15, 0.3)
BLINK_EVERY_S = (2.0, 6.0)
BLINK_CLOSE = (0.95, 1.15)
EYE_CLOSE = (EXPRESSION_NAMES.index("eye_close_left"), EXPRESSION_NAMES.index("eye_close_right"))


@dataclass(frozen=True)
class EmotionLabel:
    """One emotion over a clip: intensity (None for neutral), timing, the envelope's key frames
    (``onset`` = rise starts, ``apex_start``..``apex_end`` = full intensity, ``offset`` = back to
    neutral, ``frames`` when it lasts to the end) and the centre frames of the blinks."""

    emotion: str
    intensity: str | None = None
    timing: str = "hold"
    onset: int = 0
    apex_start: int = 0
    apex_end: int = 0
    offset: int = 0
    blinks: tuple[int, ...] = ()
    frames: int = 0
    fps: float = 25.0

    def __post_init__(self):
        if self.emotion not in EMOTIONS:
            raise ValueError(f"unknown emotion {self.emotion!r}; expected one of {EMOTIONS}")
        if self.emotion == "neutral":
            if self.intensity is not None or self.timing != "hold":
                raise ValueError("a neutral label has no intensity and timing 'hold'")
        elif self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        if self.timing not in TIMINGS:
            raise ValueError(f"unknown timing {self.timing!r}; expected one of {TIMINGS}")
        object.__setattr__(self, "blinks", tuple(int(b) for b in self.blinks))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blinks"] = list(self.blinks)
        return d

    @staticmethod
    def from_dict(d: dict) -> "EmotionLabel":
        return EmotionLabel(**{**d, "blinks": tuple(d.get("blinks", ()))})


# ------------------------------------------------------------------------ generation
def _envelope(timing: str, rng, t: np.ndarray, duration: float):
    """Envelope (T,) in [0, 1] and its key times (onset, apex_start, apex_end, offset) in seconds."""
    if timing == "hold":
        return np.ones_like(t), (0.0, 0.0, duration, duration)
    if timing == "gradual":
        rise = min(rng.uniform(1.5, 2.5), 0.6 * duration)
        t0 = rng.uniform(0.0, min(0.5, duration - rise - 0.25 * duration))
        return min_jerk(t, t0, t0 + rise), (t0, t0 + rise, duration, duration)
    if timing == "sudden":
        rise = rng.uniform(0.1, 0.25)
        t0 = rng.uniform(0.5, 1.5) * min(1.0, duration / 4.0)
        return min_jerk(t, t0, t0 + rise), (t0, t0 + rise, duration, duration)
    if timing == "brief":
        scale = min(1.0, duration / 4.0)
        up, hold, down = (rng.uniform(0.2, 0.4) * scale, rng.uniform(0.8, 1.5) * scale,
                          rng.uniform(0.3, 0.5) * scale)
        t0 = rng.uniform(0.2, max(0.2, duration - up - hold - down - 0.4 * scale))
        env = min_jerk(t, t0, t0 + up) - min_jerk(t, t0 + up + hold, t0 + up + hold + down)
        return env, (t0, t0 + up, t0 + up + hold, t0 + up + hold + down)
    raise ValueError(f"unknown timing {timing!r}; expected one of {TIMINGS}")


def _blinks(rng, frames: int, fps: float) -> tuple[np.ndarray, list[int]]:
    """Blink curve (T,) in [0, ~1.15] and the blink centre frames."""
    t = np.arange(frames) / fps
    duration = frames / fps
    curve = np.zeros(frames)
    centres = []
    now = rng.uniform(0.2, 3.0)
    while True:
        width = rng.uniform(*BLINK_S)
        centre = round((now + width / 2) * fps)  # the peak lands on a frame
        now = centre / fps - width / 2
        if now + width > duration - 0.05:
            break
        x = np.clip((t - now) / width, 0.0, 1.0)
        curve = np.maximum(curve, rng.uniform(*BLINK_CLOSE) * np.sin(np.pi * x) ** 2)
        centres.append(int(centre))
        now += width + rng.uniform(*BLINK_EVERY_S)
    return curve, centres


def make_emotion(emotion: str, intensity: str | None = None, timing: str = "hold", rng=0, frames: int = 100,
                 fps: float = 25.0, n_expr: int = 50, blinks: bool = True):
    """Realise a given emotion label: returns ``(EmotionLabel, expression (frames, n_expr) float32)``.

    ``intensity`` defaults to "moderate" for non-neutral emotions. Raises ValueError for unknown
    labels or ``n_expr`` < 15 (the semantic components are needed).
    """
    frames, fps = check_clip_args(frames, fps)
    rng = as_rng(rng)
    if isinstance(n_expr, bool) or not isinstance(n_expr, (int, np.integer)) or not N_SEMANTIC <= n_expr <= 100:
        raise ValueError(f"n_expr must be an integer in [{N_SEMANTIC}, 100], got {n_expr!r}")
    if emotion != "neutral" and intensity is None:
        intensity = "moderate"
    EmotionLabel(emotion, intensity, timing)  # validates the vocabulary
    t = np.arange(frames) / fps
    duration = frames / fps
    env, keys = _envelope(timing, rng, t, duration)
    expr = np.zeros((frames, n_expr))
    if emotion != "neutral":
        scale = rng.uniform(*INTENSITY_SCALE[intensity])
        for name, w in RECIPES[emotion].items():
            w = w * rng.uniform(1 - RECIPE_JITTER, 1 + RECIPE_JITTER)
            expr[:, EXPRESSION_NAMES.index(name)] += scale * w * env
    sem = SEMANTIC_NOISE * smooth_noise(rng, frames, fps, N_SEMANTIC, max_hz=1.0)
    sem += SEMANTIC_NOISE * rng.standard_normal(N_SEMANTIC)  # a small constant bias per clip
    expr[:, :N_SEMANTIC] += sem
    if n_expr > N_SEMANTIC:
        k = np.arange(1, n_expr - N_SEMANTIC + 1)
        other = smooth_noise(rng, frames, fps, n_expr - N_SEMANTIC, max_hz=1.0) + rng.standard_normal(k.size)
        expr[:, N_SEMANTIC:] += OTHER_NOISE * k ** -0.5 * other / np.sqrt(2.0)
    centres = []
    if blinks:
        curve, centres = _blinks(rng, frames, fps)
        for i, idx in enumerate(EYE_CLOSE):
            expr[:, idx] += curve * (1.0 + 0.03 * (2 * i - 1) * rng.random())
    to_frame = lambda s: int(min(frames, round(s * fps)))  # noqa: E731
    label = EmotionLabel(emotion, intensity if emotion != "neutral" else None, timing,
                         *(to_frame(s) for s in keys), blinks=tuple(centres), frames=frames, fps=fps)
    return label, expr.astype(np.float32)


def sample_emotion(rng, frames: int = 100, fps: float = 25.0, n_expr: int = 50):
    """A random expression clip: ``(EmotionLabel, expression (frames, n_expr) float32)``.

    About 1 in 7 clips is neutral; intensities and timings are uniform (clips shorter than 2 s
    only use "hold" and "sudden").
    """
    frames, fps = check_clip_args(frames, fps)
    rng = as_rng(rng)
    emotion = EMOTIONS[rng.integers(len(EMOTIONS))]
    if emotion == "neutral":
        return make_emotion("neutral", None, "hold", rng, frames, fps, n_expr)
    intensity = INTENSITIES[rng.integers(len(INTENSITIES))]
    timings = TIMINGS if frames / fps >= 2.0 else ("hold", "sudden")
    timing = timings[rng.integers(len(timings))]
    return make_emotion(emotion, intensity, timing, rng, frames, fps, n_expr)


# --------------------------------------------------------------------------- captions
ADJECTIVES = {
    "happy": Bank(train=("happy", "cheerful", "joyful"), test=("glad", "delighted")),
    "sad": Bank(train=("sad", "unhappy", "downcast"), test=("sorrowful", "gloomy", "miserable")),
    "angry": Bank(train=("angry", "mad", "furious"), test=("cross", "irate")),
    "surprised": Bank(train=("surprised", "astonished", "shocked"), test=("amazed", "startled", "stunned")),
    "disgusted": Bank(train=("disgusted", "repulsed"), test=("revolted", "grossed out", "sickened")),
    "fearful": Bank(train=("scared", "afraid", "frightened"), test=("fearful", "alarmed")),
    "neutral": Bank(train=("neutral", "calm", "expressionless"), test=("composed", "impassive")),
}
VERB_PHRASES = {
    "happy": Bank(train=("smiles", "grins", "beams"), test=("smiles happily", "wears a smile")),
    "sad": Bank(train=("frowns sadly", "makes a sad face", "sulks"), test=("wears a sorrowful frown", "mopes")),
    "angry": Bank(train=("scowls", "glares angrily", "frowns angrily"), test=("fumes", "glowers")),
    "surprised": Bank(train=("gasps in surprise", "raises {poss} eyebrows in surprise", "looks on in surprise"),
                      test=("widens {poss} eyes in astonishment", "reacts with surprise")),
    "disgusted": Bank(train=("grimaces in disgust", "wrinkles {poss} nose in disgust", "makes a disgusted face"),
                      test=("sneers in revulsion", "curls {poss} lip in disgust")),
    "fearful": Bank(train=("cringes in fear", "looks on in fear", "makes a frightened face"),
                    test=("trembles with fear", "winces in fright")),
    "neutral": Bank(train=("keeps a neutral face", "keeps a straight face", "shows no emotion",
                           "has a blank expression"),
                    test=("stays expressionless", "wears a poker face", "shows no feelings")),
}
# Copulas by timing; "{x}" is the (intensity +) adjective.
COPULAS = {
    "hold": Bank(train=("looks {x}", "seems {x}", "appears {x}", "looks {x} throughout"),
                 test=("comes across as {x}", "is visibly {x}", "remains {x} from start to finish")),
    "gradual": Bank(train=("gradually becomes {x}", "little by little becomes {x}", "becomes {x} over time"),
                    test=("steadily becomes {x}", "bit by bit grows {x}")),
    "sudden": Bank(train=("suddenly looks {x}", "suddenly becomes {x}", "abruptly becomes {x}"),
                   test=("all at once turns {x}", "in an instant becomes {x}")),
    "brief": Bank(train=("briefly looks {x}", "looks {x} for a moment", "momentarily looks {x}"),
                  test=("fleetingly looks {x}", "looks {x} for just an instant")),
}
# Timing around a verb phrase; "{v}" is the (verb phrase + intensity).
VERB_TIMINGS = {
    "hold": Bank(train=("{v}", "{v}", "{v} the whole time", "{v} throughout"),
                 test=("{v}", "{v} from start to finish", "{v} all the while")),
    "gradual": Bank(train=("gradually {v}", "progressively {v}", "increasingly {v}"),
                    test=("steadily {v}", "bit by bit {v}")),
    "sudden": Bank(train=("suddenly {v}", "abruptly {v}", "all of a sudden {v}"),
                   test=("all at once {v}", "in an instant {v}")),
    "brief": Bank(train=("briefly {v}", "{v} for a moment", "momentarily {v}"),
                  test=("fleetingly {v}", "{v} for just an instant")),
}
ADJ_INTENSITY = {
    "slight": Bank(train=("slightly", "a little", "somewhat"), test=("a bit", "mildly")),
    "moderate": Bank(train=("",), test=("",)),
    "strong": Bank(train=("very", "extremely", "really"), test=("incredibly", "exceedingly", "tremendously")),
}
VERB_INTENSITY = {
    "slight": Bank(train=("slightly", "a little"), test=("faintly", "a tiny bit")),
    "moderate": Bank(train=("",), test=("",)),
    "strong": Bank(train=("intensely", "strongly"), test=("fiercely", "with great intensity")),
}


def banks() -> dict[str, Bank]:
    """Every phrase bank of emotion captions by a dotted name."""
    out = {"subjects": SUBJECTS}
    for prefix, table in (("adjective", ADJECTIVES), ("verb", VERB_PHRASES), ("copula", COPULAS),
                          ("verb_timing", VERB_TIMINGS), ("adj_intensity", ADJ_INTENSITY),
                          ("verb_intensity", VERB_INTENSITY)):
        out.update({f"{prefix}.{k}": v for k, v in table.items()})
    return out


def emotion_phrase(label: EmotionLabel, rng, split: str = "train", poss: str = "their") -> str:
    """The verb phrase of an emotion label (third person, no subject), e.g. "suddenly looks very happy"."""
    rng = as_rng(rng)
    intensity = label.intensity or "moderate"
    if rng.random() < 0.5:  # adjective style: copula + intensity + adjective
        adj = ADJECTIVES[label.emotion].pick(rng, split)
        word = ADJ_INTENSITY[intensity].pick(rng, split)
        x = f"{word} {adj}" if word else adj
        return COPULAS[label.timing].pick(rng, split).format(x=x)
    verb = VERB_PHRASES[label.emotion].pick(rng, split).format(poss=poss)
    word = VERB_INTENSITY[intensity].pick(rng, split)
    v = f"{verb} {word}" if word else verb
    return VERB_TIMINGS[label.timing].pick(rng, split).format(v=v)


def caption_emotion(label: EmotionLabel, rng, split: str = "train") -> str:
    """A full emotion caption: a random subject from the split's wordings plus the verb phrase."""
    rng = as_rng(rng)
    subject, poss = SUBJECTS.pick(rng, split)
    return with_subject(subject, emotion_phrase(label, rng, split, poss))
