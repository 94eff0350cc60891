"""CIDEr-D, vectorised with numpy: exactly what pycocoevalcap's ``PTBTokenizer`` followed by
``Cider().compute_score`` computes, without Java (captions are tokenized by ``ptb.ptb_tokenize_lines``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from raylora.metrics.ptb import ptb_tokenize_lines

__all__ = ["cider", "cider_per_image"]


def _caption_text(c: Any) -> str:
    return c["caption"] if isinstance(c, Mapping) else c


def _tokenized(gts: Mapping[Any, Sequence[Any]], res: Mapping[Any, Any]) -> tuple[list, list, list]:
    """Image ids (in ``gts`` order), tokenized references and candidates, as PTBTokenizer makes them.

    pycocoevalcap tokenizes the references and the candidates as two separate files, each in its
    dict's order; a caption's tokens may depend on the start of the next line of its file.
    """
    if set(gts) != set(res):
        raise ValueError("gts and res must have the same image ids")
    if not gts:
        raise ValueError("no images to score")
    ids = list(gts)
    hyp_of = {}
    for k, v in res.items():
        if isinstance(v, (str, dict)):
            v = [v]
        if len(v) != 1:
            raise ValueError(f"image {k!r}: expected exactly one candidate caption, got {len(v)}")
        hyp_of[k] = v[0] if type(v[0]) is str else _caption_text(v[0])
    ref_lines: list[str] = []
    sizes = []
    for k in ids:
        refs = gts[k]
        if isinstance(refs, (str, dict)) or len(refs) == 0:
            raise ValueError(f"image {k!r}: references must be a non-empty list of captions")
        ref_lines.extend([c if type(c) is str else _caption_text(c) for c in refs])
        sizes.append(len(refs))
    ref_tok = ptb_tokenize_lines(ref_lines)
    hyp_tok = dict(zip(res, ptb_tokenize_lines([hyp_of[k] for k in res])))
    refs_per_image, start = [], 0
    for n in sizes:
        refs_per_image.append(ref_tok[start : start + n])
        start += n
    return ids, refs_per_image, [hyp_tok[k] for k in ids]


def _runs(s: np.ndarray) -> np.ndarray:
    """For a sorted array, True where a run of equal values starts (a sort-based ``np.unique``)."""
    first = np.empty(len(s), dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    return first


def _cider_scores(
    refs: Sequence[Sequence[str]], hyps: Sequence[str], n: int = 4, sigma: float = 6.0
) -> np.ndarray:
    """Per-image CIDEr-D of tokenized captions, as ``pycocoevalcap.cider.CiderScorer`` computes it.

    Sentences are numbered references first, then one candidate per image; n-grams get dense integer
    ids order by order, and all tf-idf vectors, norms and clipped dot products are sparse numpy ops.
    """
    num_images = len(refs)
    sentences = [r for rs in refs for r in rs]
    num_refs = len(sentences)
    sentences.extend(hyps)
    num_sent = len(sentences)
    # words as CiderScorer's precook splits them (str.split()), all at once: captions are joined with
    # a "\x00" marker word (never in a tokenized caption), whose positions give the word counts
    marked = " \x00 ".join(sentences).split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(marked))}  # dense ids, in order of appearance
    vocab["\x00"] = -1
    ids_marked = np.fromiter(map(vocab.__getitem__, marked), dtype=np.int64, count=len(marked))
    is_word = ids_marked >= 0
    w_ids = ids_marked[is_word]
    ends = np.append(np.flatnonzero(~is_word), len(marked))  # marker after each caption but the last
    lens = np.diff(np.concatenate([[-1], ends])) - 1
    img = np.concatenate(
        [np.repeat(np.arange(num_images, dtype=np.int64), [len(rs) for rs in refs]), np.arange(num_images)]
    )
    sent = np.repeat(np.arange(num_sent, dtype=np.int64), lens)  # sentence of each token
    starts = np.cumsum(lens) - lens
    remaining = np.repeat(starts + lens, lens) - np.arange(len(w_ids))  # tokens left in the sentence
    ref_img = img[:num_refs]
    hyp_sent = num_refs + np.arange(num_images)  # candidate sentence of each image
    ref_len = math.log(float(num_images))
    vocab_size = max(len(vocab), 1)  # word ids are < len(vocab) (one id, the marker's, unused)

    sim = np.zeros(num_refs)
    gram = w_ids  # id of the k-gram starting at each token (valid where remaining >= k)
    num_grams = vocab_size
    for k in range(1, n + 1):
        valid = np.flatnonzero(remaining >= k)
        if len(valid) == 0:
            break
        if k > 1:  # k-gram = (k-1)-gram starting here + the word k-1 further on, renumbered densely
            key = gram[valid] * vocab_size + w_ids[valid + k - 1]
            order = np.argsort(key)
            first = _runs(key[order])
            ids = np.empty(len(valid), dtype=np.int64)
            ids[order] = np.cumsum(first) - 1
            num_grams = int(ids.max()) + 1
            gram = np.full(len(w_ids), -1, dtype=np.int64)
            gram[valid] = ids
        # term frequencies: one entry per (sentence, n-gram), sorted by sentence, so the references'
        # entries come first and the candidates' (one sentence per image, in image order) last
        pairs = np.sort(sent[valid] * num_grams + gram[valid])
        starts_k = np.flatnonzero(_runs(pairs))
        tf = np.diff(np.append(starts_k, len(pairs)))
        pairs = pairs[starts_k]
        e_sent = pairs // num_grams
        e_gram = pairs - e_sent * num_grams
        key = img[e_sent] * num_grams + e_gram  # (image, n-gram)
        split = int(np.searchsorted(e_sent, num_refs))
        # document frequency: in how many images' references an n-gram occurs
        img_gram = np.sort(key[:split])
        df = np.bincount(img_gram[_runs(img_gram)] % num_grams, minlength=num_grams)
        weight = ref_len - np.log(np.maximum(df, 1).astype(np.float64))
        val = tf * weight[e_gram]
        norm = np.sqrt(np.bincount(e_sent, val * val, minlength=num_sent))
        # clipped dot products min(v_hyp, v_ref) * v_ref of each reference with its image's candidate
        h_key, h_val = key[split:], val[split:]  # sorted: candidates are in image order
        r_key, r_val = key[:split], val[:split]
        if len(h_key):
            at = np.minimum(np.searchsorted(h_key, r_key), len(h_key) - 1)
            v_h = np.where(h_key[at] == r_key, h_val[at], 0.0)
        else:
            v_h = np.zeros(len(r_key))
        dot = np.bincount(e_sent[:split], np.minimum(v_h, r_val) * r_val, minlength=num_refs)
        denom = norm[hyp_sent[ref_img]] * norm[:num_refs]
        sim += np.divide(dot, denom, out=dot.copy(), where=denom != 0)
    # the length penalty compares numbers of bigrams (pycocoevalcap's "length" sums the counts at
    # n-gram index 1), not of words
    glen = np.maximum(lens - 1, 0)
    delta = (glen[hyp_sent[ref_img]] - glen[:num_refs]).astype(np.float64)
    per_ref = sim / n * np.exp(-(delta**2) / (2 * sigma**2))
    refs_per_image = np.bincount(ref_img, minlength=num_images)
    return np.bincount(ref_img, per_ref, minlength=num_images) / refs_per_image * 10.0


def cider_per_image(
    gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Any], n: int = 4, sigma: float = 6.0
) -> dict[Any, float]:
    """CIDEr-D of each image: ``gts`` maps image id to raw references, ``res`` to one raw candidate."""
    ids, refs, hyps = _tokenized(gts, res)
    return dict(zip(ids, _cider_scores(refs, hyps, n, sigma).tolist()))


def cider(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Any], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D, equal to pycocoevalcap's PTBTokenizer + ``Cider().compute_score``.

    ``gts`` maps image id to raw references, ``res`` to one raw candidate (a string or a one-item
    list). (``n`` other than 4 uses 1..n-grams; pycocoevalcap always cooks 1..4-grams and fails then.)
    """
    ids, refs, hyps = _tokenized(gts, res)
    return float(np.mean(_cider_scores(refs, hyps, n, sigma)))
