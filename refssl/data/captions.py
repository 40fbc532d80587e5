"""Captions of scenes from a small grammar, and the word-level tokenizer built from that grammar.

Grammar
-------
A caption describes every object of a scene (:mod:`refssl.data.scenes`), in slot order: the k-th noun
phrase describes the object in slot k.  Alternatives are drawn independently per caption with the stated
probabilities; everything is drawn from the ``np.random.Generator`` passed in, so a seed fixes the
captions.  Words are lower case and separated by single spaces; there is no punctuation.

::

    caption  := opener body                               p = 3/4
              | count "with" body                         p = 1/4
    opener   := "" | "there is" | "an image with" | "a photo of"        (uniform)
    count    := NUMBER NOUN            NUMBER = "one" | "two" | "three", the number of objects;
                                       NOUN = "shape" | "object" (singular) or "shapes" | "objects"
                                       (plural), agreeing with NUMBER, uniform
    body     := np(0)                                     1 object
              | np(0) pair(0, 1) np(1)                    2 objects
              | np(0) pair(0, 1) np(1) "and" np(2)        3 objects
    pair(i, j) := relation(i, j)                          p = 1/2
              | "next to"                                 p = 1/4
              | "and"                                     p = 1/4
    relation(i, j) := "left of" | "right of" | "above" | "below"
                      where object i lies relative to object j, along an axis on which their boxes are
                      separated (the axis of the larger gap when both are): "left of" means i's box ends
                      left of where j's box starts; "above" means higher in the image (smaller y)
    np(k)    := article [size] COLOR SHAPE                p = 0.8
              | article [size] COLOR "shape"              p = 0.1   (shape left unsaid)
              | article [size] SHAPE                      p = 0.1   (colour left unsaid)
    size     := "small" | "large" | "big"                 the object's size class, said with p = 1/2;
                                                          a large object is "large" or "big" (uniform)
    article  := "an" before a word starting with a vowel, else "a"
    COLOR    := one of refssl.data.shapes.COLOR_NAMES, the object's colour class
    SHAPE    := "circle" | "square" | "triangle", the object's shape

Every caption is therefore true of its scene: its colour, shape and size words are the object's factors,
its count is the number of objects, and its relation holds between the boxes.  The zero-shot prompts
(:func:`prompt_captions`) are captions of this grammar for a single object with one attribute left
unsaid: "a photo of a red shape", "a photo of a circle".

Tokenizer
---------
:class:`Tokenizer` maps words to ids with a fixed vocabulary taken from the grammar (never from data):
``VOCAB`` lists it in id order -- the specials ``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, ``[MASK]`` = 3,
then the function words, relation words, numbers, nouns, sizes, the 8 colours in colour-class order and
the 3 shapes in shape-class order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .scenes import SIZE_NAMES, Scenes
from .shapes import COLOR_NAMES, SHAPES

__all__ = [
    "SPECIAL_TOKENS", "FUNCTION_WORDS", "RELATION_WORDS", "NUMBER_WORDS", "NOUN_WORDS", "SIZE_WORDS",
    "VOCAB", "OPENERS", "MAX_CAPTION_WORDS", "caption_scenes", "prompt_captions", "Tokenizer",
    "word_objects",
]

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
FUNCTION_WORDS = ("a", "an", "there", "is", "image", "with", "photo", "of", "and")
RELATION_WORDS = ("left", "right", "above", "below", "next", "to")
NUMBER_WORDS = ("one", "two", "three")
NOUN_WORDS = ("shape", "shapes", "object", "objects")
SIZE_WORDS = ("small", "large", "big")
VOCAB = (SPECIAL_TOKENS + FUNCTION_WORDS + RELATION_WORDS + NUMBER_WORDS + NOUN_WORDS + SIZE_WORDS
         + tuple(COLOR_NAMES) + tuple(SHAPES))

OPENERS = ("", "there is", "an image with", "a photo of")
# Longest caption: a three-word opener or count, three four-word noun phrases, a two-word relation, "and".
MAX_CAPTION_WORDS = 3 + 3 * 4 + 2 + 1  # so ``max_len = MAX_CAPTION_WORDS + 2`` never truncates
_P_COUNT_FORM = 0.25
_PAIR_P = (0.5, 0.25, 0.25)  # relation, "next to", "and"
_NP_P = (0.8, 0.1, 0.1)  # colour + shape, colour + "shape", shape only
_P_SIZE = 0.5


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(color: int, shape: int, size: int, form: int, say_size: bool, big: bool) -> str:
    words = []
    if say_size:
        words.append("big" if (size == 1 and big) else SIZE_NAMES[size])
    if form in (0, 1):
        words.append(COLOR_NAMES[color])
    words.append("shape" if form == 1 else SHAPES[shape])
    return " ".join([_article(words[0])] + words)


def _relation(box_i: np.ndarray, box_j: np.ndarray) -> str:
    """Where box i lies relative to box j, along an axis on which they are separated."""
    gap_x = max(box_j[0] - box_i[2], box_i[0] - box_j[2])
    gap_y = max(box_j[1] - box_i[3], box_i[1] - box_j[3])
    if gap_x < 0 and gap_y < 0:
        raise ValueError(f"boxes {tuple(box_i)} and {tuple(box_j)} overlap: no relation holds")
    if gap_x >= gap_y:
        return "left of" if box_i[2] <= box_j[0] else "right of"
    return "above" if box_i[3] <= box_j[1] else "below"


def caption_scenes(scenes: Scenes, rng: np.random.Generator) -> list[str]:
    """One caption per scene, drawn from the grammar of the module docstring (true of its scene).

    The random choices are drawn for all scenes at once, as arrays; only the assembly of the strings runs
    per scene.
    """
    if not isinstance(scenes, Scenes):
        raise TypeError(f"scenes must be a Scenes instance (refssl.data.scenes.make_scenes), got "
                        f"{type(scenes).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, k = scenes.valid.shape
    count_form = rng.random(n) < _P_COUNT_FORM
    opener = rng.integers(0, len(OPENERS), size=n)
    plural_noun = rng.integers(0, 2, size=n)  # shape(s) or object(s)
    pair_form = rng.choice(len(_PAIR_P), size=(n, 2), p=_PAIR_P)
    np_form = rng.choice(len(_NP_P), size=(n, k), p=_NP_P)
    say_size = rng.random((n, k)) < _P_SIZE
    big = rng.random((n, k)) < 0.5

    shape, color, size, boxes = (scenes.shape.tolist(), scenes.color.tolist(), scenes.size.tolist(),
                                 scenes.boxes.astype(np.float64))
    n_obj = scenes.n_objects.tolist()
    out = []
    for i in range(n):  # string assembly only; all random draws are above
        m = n_obj[i]
        nps = [_noun_phrase(color[i][s], shape[i][s], size[i][s], np_form[i, s], say_size[i, s], big[i, s])
               for s in range(m)]
        body = nps[0]
        if m >= 2:
            f = pair_form[i, 0]
            pair = _relation(boxes[i, 0], boxes[i, 1]) if f == 0 else ("next to" if f == 1 else "and")
            body = f"{body} {pair} {nps[1]}"
        if m == 3:
            body = f"{body} and {nps[2]}"
        if count_form[i]:
            noun = ("object" if plural_noun[i] else "shape") + ("s" if m > 1 else "")
            out.append(f"{NUMBER_WORDS[m - 1]} {noun} with {body}")
        else:
            out.append(f"{OPENERS[opener[i]]} {body}".strip())
    return out


def prompt_captions(kind: str) -> list[str]:
    """Zero-shot prompts for single-object images, one per class in class order.

    kind "color": "a photo of a red shape", ... (the 8 colour classes of ``COLOR_NAMES``);
    kind "shape": "a photo of a circle", "a photo of a square", "a photo of a triangle".
    """
    if kind == "color":
        return [f"a photo of {_article(c)} {c} shape" for c in COLOR_NAMES]
    if kind == "shape":
        return [f"a photo of {_article(s)} {s}" for s in SHAPES]
    raise ValueError(f"kind must be 'color' or 'shape', got {kind!r}")


class Tokenizer:
    """Word-level tokenizer over the grammar's fixed vocabulary ``VOCAB``.

    ``encode(captions, max_len)`` gives ``[CLS] w1 ... wn [SEP] [PAD] ...`` ids and the attention mask
    (True on real tokens, [CLS] and [SEP] included).  Captions are split on whitespace and their words
    lower-cased; the word ``[MASK]`` may appear in a caption (to write masked queries), the other special
    tokens may not.  A caption longer than ``max_len - 2`` words raises ``ValueError`` unless
    ``truncate=True``, which keeps its first ``max_len - 2`` words (and still ends it with [SEP]).

    Attributes: ``vocab`` (tuple, id order), ``vocab_size``, ``word_to_id`` (dict), ``pad_id``,
    ``cls_id``, ``sep_id``, ``mask_id``, ``color_word_ids`` (colour class -> id), ``shape_word_ids``
    (shape class -> id), ``size_word_ids`` (size class -> tuple of ids: small; large and big),
    ``special_ids``.
    """

    def __init__(self):
        self.vocab = VOCAB
        self.vocab_size = len(VOCAB)
        self.word_to_id = {w: i for i, w in enumerate(VOCAB)}
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (self.word_to_id[t] for t in SPECIAL_TOKENS)
        self.special_ids = (self.pad_id, self.cls_id, self.sep_id, self.mask_id)
        self.color_word_ids = {c: self.word_to_id[w] for c, w in enumerate(COLOR_NAMES)}
        self.shape_word_ids = {s: self.word_to_id[w] for s, w in enumerate(SHAPES)}
        self.size_word_ids = {0: (self.word_to_id["small"],),
                              1: (self.word_to_id["large"], self.word_to_id["big"])}
        # Words a caption may contain: the grammar's words and [MASK].
        self._text_ids = {w: i for w, i in self.word_to_id.items()
                          if w not in SPECIAL_TOKENS or w == "[MASK]"}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    def encode(self, captions: Sequence[str], max_len: int, *, truncate: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """ids (N, max_len) int64 and attention_mask (N, max_len) bool of ``[CLS] words [SEP] [PAD]...``."""
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"captions must be a list of strings (wrap a single caption in a list), got "
                            f"{type(captions).__name__}")
        if isinstance(max_len, (bool, np.bool_)) or not isinstance(max_len, (int, np.integer)):
            raise TypeError(f"max_len must be an integer, got {type(max_len).__name__}")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ([CLS], one word, [SEP]), got {max_len}")
        if not isinstance(truncate, (bool, np.bool_)):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        n = len(captions)
        if n == 0:
            raise ValueError("captions is empty: nothing to encode")
        split = []
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"captions[{i}] must be a string, got {type(c).__name__}")
            words = [w if w.startswith("[") else w.lower() for w in c.split()]
            if not words:
                raise ValueError(f"captions[{i}] is empty ({c!r}): a caption needs at least one word")
            split.append(words)
        lengths = np.fromiter((len(w) for w in split), dtype=np.int64, count=n)
        flat = np.fromiter((self._text_ids.get(w, -1) for w in itertools.chain.from_iterable(split)),
                           dtype=np.int64, count=int(lengths.sum()))
        if (flat < 0).any():
            j = int(np.argmax(flat < 0))
            i = int(np.searchsorted(np.cumsum(lengths), j, side="right"))
            word = split[i][j - (int(lengths[:i].sum()))]
            what = ("a special token that cannot appear in a caption" if word in self.word_to_id
                    else "not in the vocabulary")
            raise ValueError(f"unknown word {word!r} in captions[{i}] ({captions[i]!r}): {what}; the "
                             f"vocabulary is refssl.data.captions.VOCAB")
        room = max_len - 2
        if (lengths > room).any() and not truncate:
            i = int(np.argmax(lengths > room))
            raise ValueError(f"captions[{i}] has {lengths[i]} words, more than max_len - 2 = {room} "
                             f"(longest caption: {lengths.max()} words); raise max_len or pass "
                             f"truncate=True")
        # Scatter the words: word j of caption i goes to column 1 + j.
        row = np.repeat(np.arange(n), lengths)
        col = 1 + np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = col <= room
        ids = np.full((n, max_len), self.pad_id, dtype=np.int64)
        ids[row[keep], col[keep]] = flat[keep]
        kept = np.minimum(lengths, room)
        ids[:, 0] = self.cls_id
        ids[np.arange(n), kept + 1] = self.sep_id
        mask = np.arange(max_len)[None, :] < (kept + 2)[:, None]
        return ids, mask

    def decode(self, ids, *, skip_special: bool = True):
        """Words of ``ids`` ((T,) -> str, (N, T) -> list of str).  With ``skip_special`` the [PAD], [CLS]
        and [SEP] tokens are dropped ([MASK] is kept, as the word ``[MASK]``)."""
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            raise TypeError(f"ids must be an integer array, got dtype {a.dtype}")
        if a.ndim not in (1, 2):
            raise ValueError(f"ids must have shape (T,) or (N, T), got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got values in [{a.min()}, {a.max()}]")
        drop = {self.pad_id, self.cls_id, self.sep_id} if skip_special else set()
        rows = [" ".join(self.vocab[t] for t in r if t not in drop) for r in np.atleast_2d(a).tolist()]
        return rows[0] if a.ndim == 1 else rows


def word_objects(ids: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """The object slot each word of encoded captions describes: (N, T) int64, -1 outside noun phrases.

    By the grammar, the k-th noun phrase describes slot k; a noun phrase is an article followed by a
    size, colour or shape word (so the articles of "an image with" and "a photo of" start none) and runs to
    its noun (a shape word or "shape").  Works on masked captions too, as long as the article and the noun
    of each phrase are unmasked ([MASK] inside a phrase is part of it).
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise TypeError(f"ids must be an integer array (N, T), got {ids.dtype} {ids.shape}")
    w = tokenizer.word_to_id
    article = np.isin(ids, [w["a"], w["an"]])
    starts_np = np.isin(ids, [w[x] for x in SIZE_WORDS + tuple(COLOR_NAMES) + tuple(SHAPES)] +
                        [tokenizer.mask_id])
    noun = np.isin(ids, [w[x] for x in SHAPES] + [w["shape"]])
    start = article.copy()
    start[:, :-1] &= starts_np[:, 1:]
    start[:, -1] = False
    out = np.full(ids.shape, -1, dtype=np.int64)
    slot = np.full(len(ids), -1, dtype=np.int64)
    inside = np.zeros(len(ids), dtype=bool)
    for t in range(ids.shape[1]):  # a scan over the <= 20 positions, vectorised over captions
        slot += start[:, t]
        inside |= start[:, t]
        out[inside, t] = slot[inside]
        inside &= ~noun[:, t]
    return out
