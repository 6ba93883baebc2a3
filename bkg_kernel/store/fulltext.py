"""Full-text search: a BM25 inverted index per collection, in memory beside FAISS, kept in step on every write.

DuckDB stays the source of truth. This index is derived from the `text` column the way the FAISS index is
derived from `vec`: addressed by position (fid), appended to on upsert, masked on delete, saved beside the FAISS
file (`<table>.fts`, a zip whose members carry CRCs), caught up from DuckDB on open (positions past the saved
ones by reading their texts, deletes from the rows themselves), rebuilt after a compaction, and copied into
snapshots.

Analysis, as LanceDB's (and tantivy's) English defaults: Unicode folded to ASCII where it can be (accents
stripped; ß, æ, ø, ł and the like written as Lucene's ASCII folding writes them), lower case, split on anything
but letters and digits (`read_csv` and `os.path` are two words each), tokens over 40 characters dropped, Lucene's
33 English stop words dropped, Snowball English stemming. Chinese, Japanese and Korean, written without spaces
between words, are split as Lucene's CJK analyser splits them (with unigrams): a run of their letters is indexed
as its characters and its overlapping pairs, and asked for by its pairs (a lone character by itself), so
"機械学習" finds a text holding it and "猫" a text holding "猫が好き". Scoring: BM25 with
k1 = 1.2, b = 0.75 and Lucene's idf, over the live documents only: a deleted point leaves the document
frequencies at once, not at the next merge.

Postings live in segments, as in Lucene: a write appends one (its postings sorted by term, then position) and
segments of similar size merge (a binary counter: O(log n) segments, each posting merged O(log n) times),
dropping dead positions as they go.
"""

from __future__ import annotations

import bisect
import functools
import io
import json
import os
import re
import threading
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import CorruptData

K1, B = 1.2, 0.75
MAX_TOKEN = 40
# Lucene's EnglishAnalyzer stop set (tantivy's too): short, so that words like "first", "value" or "name",
# which the 571-word SMART list drops, still count in technical text.
_LUCENE_STOP = "a an and are as at be but by for if in into is it no not of on or such that the their then there these"
STOP_WORDS = frozenset(f"{_LUCENE_STOP} they this to was will with".split(" "))
# Bump when analysis changes: a saved index made with another analyser is rebuilt on open.
ANALYZER = "fold_latin-lower-alnum40-lucene33-snowball_en-cjk_bigram/2"
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits
# ASCII text (nearly all of it): one C pass maps letters to lower case and everything else but digits to a
# space, then str.split; a third of the regex's time.
_ASCII_WORDS = str.maketrans({chr(i): chr(i).lower() if chr(i).isalnum() else " " for i in range(128)})
# Latin letters with no decomposition to strip (Lucene's ASCIIFoldingFilter folds them too): "Straße", "Søren",
# "Łódź" are found by "strasse", "soren", "lodz".
_UNDECOMPOSED = str.maketrans(
    {
        "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L",
        "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i", "ħ": "h", "Ħ": "H", "ŀ": "l",
        "Ŀ": "L", "ŧ": "t", "Ŧ": "T", "ŋ": "ng", "Ŋ": "NG", "ĸ": "q", "ſ": "s", "ƒ": "f", "ɨ": "i", "ʉ": "u",
    }
)  # fmt: skip
CHARS_PER_CALL = 100_000  # characters of text analysed at a time while indexing (~15,000 words: a C call of ~2 ms)
_DROPPED = -1  # a word that yields no term (a stop word, too long)
_UNSEEN = -2
ARRAYS = ("terms", "docs", "tfs", "doc_len")


# Letters of the scripts written without spaces between words: Hangul Jamo, Hiragana and Katakana, Hangul
# compatibility Jamo, CJK ideographs (extension A, the unified block, compatibility ideographs, extensions B-H),
# Hangul Jamo extended A, Hangul syllables, half-width Katakana.
CJK_LETTER = (
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af"
    "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)
CJK_RUN = re.compile(f"({CJK_LETTER}+)")


def words(text: str, query: bool = False) -> list[str]:
    """Split a text into lower-case ASCII-folded words (before stop words and stemming); a run of Chinese,
    Japanese or Korean letters into its characters and its overlapping pairs (a `query`: its pairs only)."""
    if not text.isascii():
        if CJK_RUN.search(text):
            return _cjk_words(text, query)
        folded = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in folded if not unicodedata.combining(ch)).translate(_UNDECOMPOSED)
        if not text.isascii():
            return _WORD.findall(text.lower())
    return text.translate(_ASCII_WORDS).split()


def _cjk_words(text: str, query: bool) -> list[str]:
    """`words` of a text holding Chinese, Japanese or Korean: the rest as everywhere else, each run of those
    letters (normalised: half-width Katakana made full width) as its characters and pairs, or pairs alone."""
    out: list[str] = []
    for n, part in enumerate(CJK_RUN.split(text)):
        if n % 2 == 0:
            if part:
                out += words(part)
            continue
        run = unicodedata.normalize("NFKC", part)
        pairs = [run[i : i + 2] for i in range(len(run) - 1)]
        out += pairs if query and pairs else [*run, *pairs]
    return out


# Runs of the characters `words` may fold: neither ASCII nor Chinese, Japanese or Korean letters (split, not folded),
# at most 32 at a time (a text without spaces, in Thai say, would fill the cache with long runs)
_FOLDABLE = re.compile(f"([^\\x00-\\x7f{CJK_LETTER[1:-1]}]{{1,32}})")


@functools.lru_cache(maxsize=1 << 14)
def _fold_char(ch: str) -> str:
    """One character as `words` folds it; lower-cased already if lower case would change the length of its fold."""
    f = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)).translate(_UNDECOMPOSED)
    return f.lower() if len(f.lower()) != len(f) else f


@functools.lru_cache(maxsize=1 << 13)
def _fold_run(run: str) -> tuple[str, tuple[int, ...] | None]:
    """A run of `_FOLDABLE` characters folded, and how many characters each became (None: one each)."""
    parts = list(map(_fold_char, run))
    sizes = tuple(map(len, parts))
    return "".join(parts), None if sizes.count(1) == len(sizes) else sizes


class Unfold:
    """Where the spans of a folded text lie in the text it was folded from: its steps are the characters that
    folded to another length ("ß": "ss", "…": "...", a combining accent: nothing)."""

    __slots__ = ("_at", "_ends", "_gone", "_starts")

    def __init__(self, steps: list[tuple[int, int, int]]) -> None:  # (index in the text, in the folded text, size)
        self._at = [i for i, _, _ in steps]
        self._starts = [f for _, f, _ in steps]
        self._ends = [f + n for _, f, n in steps]
        self._gone = {i for i, _, n in steps if n == 0}

    def _index(self, p: int) -> int:
        """The index in the text of the character that folded character p came from."""
        k = bisect.bisect_right(self._starts, p) - 1
        if k < 0:
            return p
        return self._at[k] if p < self._ends[k] else self._at[k] + 1 + p - self._ends[k]

    def __call__(self, a: int, b: int) -> list[int]:
        """The span of the text that folded span [a, b) (not empty) came from, with the accents after it."""
        end = self._index(b - 1) + 1
        while end in self._gone:
            end += 1
        return [self._index(a), end]


def folded(text: str) -> tuple[str, Unfold | None]:
    """Fold and lower-case a text as `words` does before splitting it, character for character (Chinese, Japanese
    and Korean letters as they stand), and say where its spans lie in the text (None: where they stand)."""
    parts = _FOLDABLE.split(text)  # ASCII (and CJK), a run to fold, ASCII, ...
    runs = parts[1::2]
    if not runs:  # no character to fold (CJK letters and ASCII)
        return text.lower(), None
    folds, sizes = zip(*map(_fold_run, runs), strict=True)
    parts[1::2] = folds
    low = "".join(parts).lower()  # as long as the text folded: no folded character changes length in lower case
    if not any(sizes):
        return low, None
    steps: list[tuple[int, int, int]] = []
    at = fat = 0  # where a part starts in the text, in the folded text
    for n, run in enumerate(runs):
        at += len(parts[2 * n])
        fat += len(parts[2 * n])
        if sizes[n] is None:
            at += len(run)
            fat += len(run)
            continue
        for size in sizes[n]:
            if size != 1:
                steps.append((at, fat, size))
            at += 1
            fat += size
    return low, Unfold(steps)


_STEMMERS = threading.local()  # a PyStemmer stemmer keeps state: one per thread


@functools.lru_cache(maxsize=1 << 16)
def term(word: str) -> str | None:
    """The term the index makes of one word as `words` gives it (None: a stop word or a token over 40 characters):
    what a highlighter compares to mark the words a query matched ("runs" for "running")."""
    if word in STOP_WORDS or len(word) > MAX_TOKEN:
        return None
    stemmer = getattr(_STEMMERS, "stemmer", None)
    if stemmer is None:
        import Stemmer

        stemmer = _STEMMERS.stemmer = Stemmer.Stemmer("english")
    return str(stemmer.stemWord(word))


def cjk(word: str) -> bool:
    """Whether a word holds a Chinese, Japanese or Korean letter (such words stand in a text without spaces)."""
    return CJK_RUN.search(word) is not None


class _Segment:
    """Postings of a run of positions, sorted by term then position: `docs[start[i]:start[i+1]]` hold term
    `keys[i]`, with its frequency in each in `tfs`."""

    __slots__ = ("docs", "keys", "start", "terms", "tfs")

    def __init__(self, terms: np.ndarray, docs: np.ndarray, tfs: np.ndarray) -> None:
        self.terms = terms.astype(np.int32, copy=False)
        self.docs = docs.astype(np.int64, copy=False)
        self.tfs = tfs.astype(np.float32, copy=False)
        # sorted by term: each term's run starts where the term changes (np.unique would sort them again)
        first = np.flatnonzero(np.diff(self.terms, prepend=np.int32(-1)))
        self.keys = self.terms[first]
        self.start = np.append(first, len(self.terms)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.terms)

    @classmethod
    def merged(cls, segments: Sequence[_Segment], alive: np.ndarray) -> _Segment:
        """One segment holding the live postings of these."""
        terms = np.concatenate([s.terms for s in segments])
        docs = np.concatenate([s.docs for s in segments])
        tfs = np.concatenate([s.tfs for s in segments])
        keep = alive[docs]
        terms, docs, tfs = terms[keep], docs[keep], tfs[keep]
        if len(docs) and docs.max() >= 2**32:  # never in practice: positions of a collection held in memory
            order = np.lexsort((docs, terms))
        else:  # one key, term then position: a sort of it takes a tenth of lexsort's time on two keys
            order = np.argsort((terms.astype(np.int64) << 32) | docs)
        return cls(terms[order], docs[order], tfs[order])

    def postings(self, term_ids: np.ndarray) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (index into term_ids, positions, frequencies) for each term this segment holds."""
        at = np.searchsorted(self.keys, term_ids)
        for j, (t, i) in enumerate(zip(term_ids.tolist(), at.tolist(), strict=True)):
            if i < len(self.keys) and self.keys[i] == t:
                a, b = self.start[i], self.start[i + 1]
                yield j, self.docs[a:b], self.tfs[a:b]


class TextIndex:
    """BM25 over the texts of a collection's positions 0..ntotal (positions without text hold no postings)."""

    def __init__(self) -> None:
        import Stemmer  # PyStemmer: Snowball in C

        self._stemmer = Stemmer.Stemmer("english")
        self._stemmer.maxCacheSize = 0  # words are cached in _word_id; PyStemmer's own cache only costs
        self.vocab: list[str] = []  # term id -> stemmed term
        self._term_id: dict[str, int] = {}  # stemmed term -> term id
        self._word_id: dict[str, int] = {}  # surface word -> term id (or _DROPPED): analysis once per word
        self.df = np.zeros(0, dtype=np.int64)  # live documents holding each term
        self.doc_len = np.zeros(0, dtype=np.float32)  # terms per position
        self.alive = np.zeros(0, dtype=bool)  # positions with text, not deleted
        self.n_live = 0
        self.total_len = 0.0
        self.segments: list[_Segment] = []

    @property
    def ntotal(self) -> int:
        return len(self.alive)

    # -- analysis ---------------------------------------------------------------------------------
    def _ids(self, ws: list[str], grow: bool) -> list[int]:
        """Term ids of words (in order; _DROPPED for stop words, _UNSEEN for terms not in the vocabulary when
        `grow` is false)."""
        ids: list[int | None] = list(map(self._word_id.get, ws))
        if None in ids:
            get = self._word_id.get
            for n, w in enumerate(ws):
                if ids[n] is None:
                    t = get(w)  # analysed earlier in this same list?
                    ids[n] = self._analyse(w, grow) if t is None else t
        return ids  # type: ignore[return-value]  # no None left

    def _analyse(self, w: str, grow: bool) -> int:
        if w in STOP_WORDS or len(w) > MAX_TOKEN:
            self._word_id[w] = _DROPPED
            return _DROPPED
        term = self._stemmer.stemWord(w)
        tid = self._term_id.get(term)
        if tid is None:
            if not grow:
                return _UNSEEN  # a query word no document holds: not remembered
            tid = self._term_id[term] = len(self.vocab)
            self.vocab.append(term)
        self._word_id[w] = tid
        return tid

    def query_terms(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Return the query's distinct known term ids and how often each occurs in it."""
        ids = np.asarray([t for t in self._ids(words(text, query=True), grow=False) if t >= 0], dtype=np.int64)
        if len(ids) == 0:
            return ids, np.zeros(0)
        terms, counts = np.unique(ids, return_counts=True)
        return terms, counts.astype(np.float64)

    # -- writing ----------------------------------------------------------------------------------
    def add(self, start: int, texts: Sequence[str | None]) -> None:
        """Index the texts of positions start, start + 1, ... (None: a point without text)."""
        if start != self.ntotal:
            raise CorruptData(f"full-text index holds {self.ntotal} positions, asked to add at {start}")
        n = len(texts)
        if n == 0:
            return
        tids, docs = self._term_ids(texts)
        keep = tids >= 0
        tids, docs = tids[keep], docs[keep]
        doc_len = np.bincount(docs, minlength=n).astype(np.float32)
        has_text = np.fromiter((bool(t) for t in texts), dtype=bool, count=n)
        if len(self.df) < len(self.vocab):
            self.df = np.concatenate([self.df, np.zeros(len(self.vocab) - len(self.df), dtype=np.int64)])
        if len(tids):
            pairs, tfs = np.unique(tids * n + docs, return_counts=True)  # sorted by term, then position
            seg = _Segment(pairs // n, pairs % n + start, tfs)
            self.df += np.bincount(seg.terms, minlength=len(self.df))
            self.segments.append(seg)
        self.doc_len = np.concatenate([self.doc_len, doc_len])
        self.alive = np.concatenate([self.alive, has_text])
        self.n_live += int(has_text.sum())
        self.total_len += float(doc_len.sum())
        self._merge()

    def _term_ids(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """The term ids of the texts' words in order, and the text (0, 1, ...) each is in; the texts analysed
        about `CHARS_PER_CALL` characters at a time. All at once, the lookup of a batch's words would be one C
        call holding the GIL throughout (0.3 s for 50,000 texts), and millions of words held at once would make
        each of the garbage collector's full passes (and their release) take tens of milliseconds: a gateway's
        event loop waits for both."""
        n = len(texts)
        ends = np.cumsum(np.fromiter((len(t) if t else 0 for t in texts), dtype=np.int64, count=n))
        total = int(ends[-1]) if n else 0
        cuts = np.searchsorted(ends, np.arange(CHARS_PER_CALL, total, CHARS_PER_CALL), side="right")
        bounds = np.unique(np.concatenate([[0], cuts, [n]])).tolist()
        ids, docs = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            per_doc = [words(t) if t else [] for t in texts[a:b]]
            ids.append(np.array(self._ids(list(chain.from_iterable(per_doc)), grow=True), dtype=np.int64))
            sizes = np.fromiter(map(len, per_doc), dtype=np.int64, count=b - a)
            docs.append(np.repeat(np.arange(a, b, dtype=np.int64), sizes))  # a repeat holds the GIL too
        return np.concatenate(ids), np.concatenate(docs)

    def remove(self, fids: np.ndarray) -> None:
        """Take positions out (deleted or replaced points): they stop matching and leave the statistics now."""
        fids = np.asarray(fids, dtype=np.int64)
        fids = np.unique(fids[(fids >= 0) & (fids < self.ntotal)])
        fids = fids[self.alive[fids]]
        if len(fids) == 0:
            return
        gone = np.zeros(self.ntotal, dtype=bool)
        gone[fids] = True
        lo, hi = int(fids[0]), int(fids[-1])
        for seg in self.segments:
            if len(seg) and seg.docs.min() <= hi and seg.docs.max() >= lo:
                hit = gone[seg.docs]
                if hit.any():
                    self.df -= np.bincount(seg.terms[hit], minlength=len(self.df))
        self.alive[fids] = False
        self.n_live -= len(fids)
        self.total_len -= float(self.doc_len[fids].sum())

    def _merge(self) -> None:
        """Merge the newest segments while the one before is no more than twice as big (a binary counter)."""
        segs = self.segments
        while len(segs) > 1 and len(segs[-2]) <= 2 * len(segs[-1]):
            segs[-2:] = [_Segment.merged(segs[-2:], self.alive)]

    def _recount(self) -> None:
        """Recompute document frequencies and lengths from the postings and the alive mask."""
        df = np.zeros(len(self.vocab), dtype=np.int64)
        for seg in self.segments:
            live = self.alive[seg.docs]
            df += np.bincount(seg.terms[live], minlength=len(df))
        self.df = df
        self.n_live = int(self.alive.sum())
        self.total_len = float(self.doc_len[self.alive].sum())

    # -- searching --------------------------------------------------------------------------------
    def search(self, text: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the positions and BM25 scores of the k best live matches (only among `allowed`, if given),
        best first, ties by position."""
        empty = np.zeros(0, dtype=np.int64), np.zeros(0)
        terms, qtf = self.query_terms(text)
        if len(terms) == 0 or self.total_len <= 0:  # no query terms, or no live document holds any term
            return empty
        df = self.df[terms].astype(np.float64)
        idf = np.log(1.0 + (self.n_live - df + 0.5) / (df + 0.5)) * qtf
        norm = K1 / (self.total_len / self.n_live)  # k1 / avgdl
        parts_d, parts_s = [], []
        for seg in self.segments:
            for j, docs, tf in seg.postings(terms):
                if df[j] == 0:
                    continue
                dl = self.doc_len[docs]
                parts_d.append(docs)
                parts_s.append(idf[j] * tf * (K1 + 1) / (tf + K1 * (1 - B) + B * norm * dl))
        if not parts_d:
            return empty
        docs = np.concatenate(parts_d)
        score = np.concatenate(parts_s).astype(np.float64)
        if len(parts_d) > 1:
            docs, inverse = np.unique(docs, return_inverse=True)
            score = np.bincount(inverse, weights=score).astype(np.float64)
        keep = self.alive[docs]
        if allowed is not None:
            keep &= np.isin(docs, allowed)
        docs, score = docs[keep], score[keep]
        if k < len(docs):
            top = np.argpartition(-score, k - 1)[:k]
            docs, score = docs[top], score[top]
        order = np.lexsort((docs, -score))
        return docs[order], score[order]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the index atomically (tmp file, rename) as one zip: its members carry CRCs, so a torn or
        damaged file fails to load instead of answering wrongly."""
        if len(self.segments) > 1:
            self.segments = [_Segment.merged(self.segments, self.alive)]
        seg = self.segments[0] if self.segments else _Segment(*(np.zeros(0, dtype=np.int64),) * 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        full = {**meta, "analyzer": ANALYZER, "ntotal": self.ntotal, "terms": len(self.vocab)}
        arrays: dict[str, np.ndarray] = {"terms": seg.terms, "docs": seg.docs, "tfs": seg.tfs, "doc_len": self.doc_len}
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr("meta.json", json.dumps(full))
            z.writestr("vocab.txt", "\n".join(self.vocab))
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                z.writestr(f"{name}.npy", buf.getvalue())
        # No fsync: the index is rebuildable from DuckDB, and a torn file fails its CRCs on the next open.
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> tuple[TextIndex, dict[str, Any]]:
        """Read an index written by `save`; raise `CorruptData` if it is missing, damaged or from another
        analyser. Its statistics are not counted yet: the caller masks the positions to the rows DuckDB holds
        with text and counts them in one pass (`set_alive`) before searching."""
        try:
            with zipfile.ZipFile(path) as z:
                meta = json.loads(z.read("meta.json"))
                if meta.get("analyzer") != ANALYZER:
                    raise CorruptData(f"full-text index {path} was built by another analyser")
                vocab = z.read("vocab.txt").decode().split("\n") if meta["terms"] else []
                arr = {a: np.load(io.BytesIO(z.read(f"{a}.npy")), allow_pickle=False) for a in ARRAYS}
        except CorruptData:
            raise
        except Exception as exc:  # missing, truncated, a CRC mismatch
            raise CorruptData(f"full-text index {path} cannot be read: {exc}") from exc
        n = int(meta["ntotal"])
        if len(vocab) != meta["terms"] or len(arr["doc_len"]) != n or (len(arr["docs"]) and arr["docs"].max() >= n):
            raise CorruptData(f"full-text index {path} does not match its own description")
        self = cls()
        self.vocab = vocab
        self._term_id = {t: i for i, t in enumerate(vocab)}
        self.doc_len = arr["doc_len"].astype(np.float32)
        self.alive = np.ones(n, dtype=bool)
        if len(arr["terms"]):
            self.segments = [_Segment(arr["terms"], arr["docs"], arr["tfs"])]
        return self, meta

    def set_alive(self, alive: np.ndarray) -> None:
        """Mask positions to the ones that still hold text (the rows DuckDB has) and recount the statistics."""
        self.alive &= alive[: self.ntotal]
        self._recount()
