"""VisualBERT: one transformer over a caption and the objects of its scene, pretrained with masked language
modelling (the image visible) and sentence-image prediction.

    model = VisualBERT(vocab_size=40, max_text_len=12, n_regions=3, dim=64, depth=2, n_heads=4, crop_size=16)
    params = model.init(np.random.default_rng(0))
    inp, chosen = bert_mask(ids, attn_mask, rng, mask_id=3, vocab_size=40, special_ids=(0, 1, 2, 3))
    loss, cache = model.loss(params, ids, attn_mask, crops, boxes, valid, (inp, chosen), itm_labels)
    grads = model.backward(cache)

Sequence (``../shared`` reference §22; Li et al. 2019, arXiv 1908.03557, uclanlp/visualbert; huggingface
``modeling_visual_bert.py``): ``[CLS] w_1 ... [SEP] [PAD] ...`` (T positions) followed by one visual token per
object slot (K = ``n_regions``), L = T + K tokens in one stream; every layer attends over both.

* text token ``t``: ``E[id_t] + P[t] + S[0]``;
* visual token ``k``: ``region_proj(f_k) + box_proj(g_k) + S[1]``, where ``f_k`` is the region feature and
  ``g_k = (x0/W, y0/H, x1/W, y1/H, area/(W H))`` the normalised box geometry (VisualBERT's visual position
  embedding is a word alignment, unavailable here; projected geometry is the usual substitute, as in
  LXMERT and UNITER);
* one LayerNorm over the concatenated embeddings (as the huggingface port), then refssl's pre-norm blocks and
  a final LayerNorm (BERT is post-norm; the blocks here are the ones every refssl transformer shares);
* attention ``key_mask = [attn_mask | valid]``: padding and absent objects are never attended, so a scene
  with fewer objects, or ``text_only=True`` (every region masked out), is exact, not approximate.

**Region features: the region encoder on the box crop.**  Each object's box is cropped from the image and
resized to ``crop_size`` (``refssl.data.scenes.crop_boxes``); a small image encoder (default
:func:`~refssl.nn.models.cnn_encoder` with channels (16, 32), or any refssl module mapping (M, C, c, c) to
(M, F)) maps every present crop to a feature, trained end to end with the transformer.  This replaces the
paper's frozen detector features; the alternative, ROI pooling of one feature map, would share computation
between objects but mixes in the context of neighbouring objects at 32 x 32.  Only the present crops
(``valid``) go through the encoder.

Objectives (the official pretraining):

* masked language modelling with the image visible: :func:`bert_mask` chooses 15 % of the caption words
  (never ``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``) and corrupts 80 / 10 / 10 % of them to ``[MASK]`` /
  a random word / themselves; a BERT head (dense -> GELU -> LayerNorm -> decoder tied to the token table,
  + bias) predicts the original word at the chosen positions only; loss = registered ``masked_token_ce``
  (mean over the chosen tokens of the batch);
* sentence-image prediction: a linear head on the final ``[CLS]`` token gives 2 logits; loss = registered
  ``cross_entropy`` (mean over the batch).  **Labels here: 1 = the caption matches the regions, 0 = it
  does not.**  (BERT's next-sentence head and the huggingface port use index 0 for "matches"; swapping the
  head's two columns maps one to the other.)  BERT's pooler (dense + tanh before the classifier) is
  omitted: the final LayerNorm already bounds the [CLS] feature, and refssl has no tanh op;
* total = MLM + ITM (either may be switched off by passing None).  The caller decides which pairs carry the
  MLM term: to train MLM on matched pairs only (LXMERT, UNITER), clear the mismatched rows of ``chosen``.

Params: ``tok.table`` (V, D), ``pos`` (T_max, D), ``seg.table`` (2, D), ``region.*`` (region encoder),
``region_proj.*`` (F, D), ``box_proj.*`` (5, D), ``emb_norm.*``, ``blocks.{i}.*``, ``norm.*``, ``mlm.dense.*``
(D, D), ``mlm.norm.*``, ``mlm.decoder.b`` (V,), ``itm.*`` (D, 2).
"""

from __future__ import annotations

import numpy as np

from ..ops import activations, attention, cross_entropy, linear
from ..ops import masked_modelling as mm
from .clip_model import no_decay as _clip_no_decay
from .clip_model import output_dim
from .io import prefixed, subdict
from .models import cnn_encoder
from .text import check_text_batch
from .transformer import (TransformerStack, _lin, _lin_backward, _ln, _ln_backward, _ln_init, _trunc_normal,
                          xavier_uniform)

__all__ = ["VisualBERT", "bert_mask", "box_geometry", "no_decay", "MLM_PROB", "MLM_SPLIT"]

MLM_PROB = 0.15  # BERT: each eligible token is chosen with probability 0.15
MLM_SPLIT = (0.8, 0.1, 0.1)  # chosen tokens -> [MASK] / random word / unchanged


def no_decay(name: str) -> bool:
    """Biases, norm parameters and position embeddings are kept out of weight decay."""
    return _clip_no_decay(name)


def bert_mask(ids, attn_mask, rng, mask_id, vocab_size, special_ids, *, prob=MLM_PROB):
    """BERT's masked-LM corruption of a tokenised batch.

    Every real, non-special token (``attn_mask`` True and id not in ``special_ids``) is chosen independently
    with probability ``prob`` (0.15; uclanlp/visualbert's ``random_word`` and huggingface's
    ``DataCollatorForLanguageModeling`` draw per token, BERT's TF data script draws a fixed count per
    sequence).  Each chosen token becomes ``mask_id`` with probability 0.8, a uniformly drawn word with 0.1,
    and stays unchanged with 0.1.  The random word is drawn from the non-special ids (the official code
    draws from the whole vocabulary; with a vocabulary of a few dozen words, 4 of them special, that would
    put [CLS]/[PAD]/... in captions a tenth of the time).  If nothing is chosen in the whole batch, one
    eligible token is chosen (and corrupted by the same rule), so that the MLM mean is defined.

    Returns ``(input_ids, chosen)``: the corrupted ids (a new array) and the (B, T) bool mask of the chosen
    positions, whose targets are the original ``ids``.
    Derivation: derivations/vision_language.md#mlm-masking-and-its-expected-loss.
    """
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise TypeError(f"ids must be an integer array (B, T), got {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(attn_mask, np.ndarray) or attn_mask.dtype != np.bool_ or attn_mask.shape != ids.shape:
        raise ValueError(f"attn_mask must be a bool array of the shape of ids {ids.shape}")
    vocab_size = int(vocab_size)
    special = np.unique(np.asarray(special_ids, dtype=np.int64))
    if int(mask_id) not in special:
        raise ValueError(f"special_ids must contain mask_id = {mask_id}, got {special.tolist()}")
    if not 0.0 < float(prob) <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    words = np.setdiff1d(np.arange(vocab_size), special)
    if words.size == 0:
        raise ValueError("the vocabulary has no non-special word to draw random replacements from")
    eligible = attn_mask & ~np.isin(ids, special)
    if not eligible.any():
        raise ValueError("no maskable token: every real position holds a special id")
    chosen = eligible & (rng.random(ids.shape) < float(prob))
    if not chosen.any():
        flat = np.flatnonzero(eligible)
        chosen.flat[flat[int(rng.integers(0, flat.size))]] = True
    u = rng.random(ids.shape)
    to_mask = chosen & (u < MLM_SPLIT[0])
    to_random = chosen & (u >= MLM_SPLIT[0]) & (u < MLM_SPLIT[0] + MLM_SPLIT[1])
    out = ids.copy()
    out[to_mask] = mask_id
    out[to_random] = words[rng.integers(0, words.size, size=int(to_random.sum()))]
    return out, chosen


def box_geometry(boxes, image_size):
    """(x0/S, y0/S, x1/S, y1/S, (x1 - x0)(y1 - y0)/S²) of pixel boxes (B, K, 4) -> (B, K, 5), boxes' dtype."""
    s = boxes.dtype.type(image_size)
    g = np.empty(boxes.shape[:2] + (5,), boxes.dtype)
    g[..., :4] = boxes / s
    g[..., 4] = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (s * s)
    return g


class VisualBERT:
    """Single-stream vision-language transformer (see the module docstring)."""

    def __init__(self, vocab_size: int, max_text_len: int, n_regions: int, dim: int, depth: int, n_heads: int,
                 *, region_encoder=None, region_dim=None, crop_size: int = 16, in_channels: int = 3,
                 image_size: int = 32, mlp_ratio: float = 4.0):
        self.vocab_size, self.max_text_len, self.n_regions = int(vocab_size), int(max_text_len), int(n_regions)
        self.dim, self.depth, self.n_heads = int(dim), int(depth), int(n_heads)
        self.crop_size, self.in_channels, self.image_size = int(crop_size), int(in_channels), int(image_size)
        if min(self.vocab_size, self.max_text_len, self.n_regions, self.crop_size) < 1:
            raise ValueError("vocab_size, max_text_len, n_regions and crop_size must be >= 1")
        if region_encoder is None:
            region_dim = self.dim if region_dim is None else int(region_dim)
            region_encoder = cnn_encoder(in_channels=self.in_channels, image_size=self.crop_size,
                                         channels=(16, 32), out_dim=region_dim)
        self.region_encoder = region_encoder
        self.region_dim = int(region_dim) if region_dim is not None else output_dim(region_encoder)
        self.stack = TransformerStack(dim, depth, n_heads, mlp_ratio)

    # -- parameters --
    def init(self, rng, dtype=np.float32) -> dict:
        d, v, f = self.dim, self.vocab_size, self.region_dim
        p = {"tok.table": (0.02 * rng.standard_normal((v, d))).astype(dtype),
             "pos": _trunc_normal(rng, 0.02, (self.max_text_len, d), dtype),
             "seg.table": (0.02 * rng.standard_normal((2, d))).astype(dtype)}
        p_reg, s_reg = self.region_encoder.init(rng, dtype)
        if s_reg:
            raise ValueError(f"the region encoder keeps state ({sorted(s_reg)[:3]} ...): use one without "
                             "batch norm")
        p.update(prefixed(p_reg, "region"))
        p["region_proj.w"], p["region_proj.b"] = xavier_uniform(rng, f, d, (f, d), dtype), np.zeros(d, dtype)
        p["box_proj.w"], p["box_proj.b"] = xavier_uniform(rng, 5, d, (5, d), dtype), np.zeros(d, dtype)
        p["emb_norm.gamma"], p["emb_norm.beta"] = _ln_init(d, dtype)
        p.update(prefixed(self.stack.init(rng, dtype)[0], "blocks"))
        p["norm.gamma"], p["norm.beta"] = _ln_init(d, dtype)
        p["mlm.dense.w"], p["mlm.dense.b"] = xavier_uniform(rng, d, d, (d, d), dtype), np.zeros(d, dtype)
        p["mlm.norm.gamma"], p["mlm.norm.beta"] = _ln_init(d, dtype)
        p["mlm.decoder.b"] = np.zeros(v, dtype)
        # BERT's N(0, 0.02²) for the classifier: the [CLS] tokens of a fresh model are nearly equal, and a
        # xavier-sized head would start every pair at one confident, arbitrary answer (ITM loss >> log 2)
        p["itm.w"], p["itm.b"] = (0.02 * rng.standard_normal((d, 2))).astype(dtype), np.zeros(2, dtype)
        return p

    # -- input checks --
    def _check_regions(self, region_inputs, boxes, valid, b):
        k, c, s = self.n_regions, self.in_channels, self.crop_size
        if not isinstance(region_inputs, np.ndarray) or region_inputs.shape != (b, k, c, s, s):
            raise ValueError(f"region_inputs must be an array of shape (B, K, C, c, c) = {(b, k, c, s, s)}, got "
                             f"shape {getattr(region_inputs, 'shape', type(region_inputs).__name__)}")
        if not isinstance(boxes, np.ndarray) or boxes.shape != (b, k, 4):
            raise ValueError(f"boxes must be an array of shape (B, K, 4) = {(b, k, 4)}, got shape "
                             f"{getattr(boxes, 'shape', type(boxes).__name__)}")
        if not isinstance(valid, np.ndarray) or valid.dtype != np.bool_ or valid.shape != (b, k):
            raise ValueError(f"valid must be a bool array of shape (B, K) = {(b, k)}, got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {getattr(valid, 'shape', '')}")

    # -- the shared trunk --
    def _trunk(self, params, ids, attn_mask, region_inputs, boxes, valid, *, text_only=False, train=True):
        """Embeddings + blocks + final norm -> (y (B, T + K, D), cache)."""
        check_text_batch(ids, attn_mask, self.max_text_len)
        b, t = ids.shape
        self._check_regions(region_inputs, boxes, valid, b)
        if not isinstance(text_only, (bool, np.bool_)):
            raise TypeError(f"text_only must be a bool, got {type(text_only).__name__}")
        if text_only:
            valid = np.zeros_like(valid)
        k, d = self.n_regions, self.dim
        dt = params["tok.table"].dtype

        e_tok, c_tok = attention.embedding_forward(ids, params["tok.table"])
        e_pos, c_pos = attention.embedding_forward(np.arange(t), params["pos"])
        e_seg, c_seg = attention.embedding_forward(np.repeat(np.arange(2), (t, k)), params["seg.table"])

        n_present = int(valid.sum())
        vis = np.zeros((b, k, d), dt)
        c_reg = c_rp = None
        if n_present:
            feats, c_reg, _ = self.region_encoder.forward(subdict(params, "region"), {},
                                                          region_inputs[valid].astype(dt, copy=False),
                                                          train=train)
            v, c_rp = _lin(params, "region_proj", feats)
            vis[valid] = v
        geo, c_bp = _lin(params, "box_proj", box_geometry(boxes.astype(dt, copy=False), self.image_size))

        x = np.concatenate([e_tok + e_pos, vis + geo], axis=1) + e_seg
        x, c_eln = _ln(params, "emb_norm", x)
        key_mask = np.concatenate([attn_mask, valid], axis=1)
        outs, c_blocks = self.stack.forward_outputs(subdict(params, "blocks"), x, key_mask=key_mask)
        y, c_norm = _ln(params, "norm", outs[-1])
        return y, (c_tok, c_pos, c_seg, c_reg, c_rp, c_bp, c_eln, c_blocks, c_norm, valid, t,
                   {kk: vv.shape for kk, vv in subdict(params, "region").items()}, dt)

    def _trunk_backward(self, cache, dy, grads):
        c_tok, c_pos, c_seg, c_reg, c_rp, c_bp, c_eln, c_blocks, c_norm, valid, t, reg_shapes, dt = cache
        d = _ln_backward(c_norm, dy, "norm", grads)
        d, g = self.stack.backward(c_blocks, d)
        grads.update(prefixed(g, "blocks"))
        dx = _ln_backward(c_eln, d, "emb_norm", grads)
        dtext, dvis = dx[:, :t], dx[:, t:]
        # the token table also receives the tied MLM decoder's gradient (added by the caller)
        grads["tok.table"] = attention.embedding_backward(c_tok, dtext)[1]
        grads["pos"] = attention.embedding_backward(c_pos, dtext.sum(axis=0))[1]
        grads["seg.table"] = attention.embedding_backward(c_seg, dx.sum(axis=0))[1]
        _lin_backward(c_bp, dvis, "box_proj", grads)
        if c_reg is not None:
            dfeat = _lin_backward(c_rp, dvis[valid], "region_proj", grads)
            grads.update(prefixed(self.region_encoder.backward(c_reg, dfeat, need_dx=False)[1], "region"))
        else:  # no object present in the batch: the region branch took no part in the loss
            grads["region_proj.w"] = np.zeros((self.region_dim, self.dim), dt)
            grads["region_proj.b"] = np.zeros(self.dim, dt)
            grads.update({f"region.{kk}": np.zeros(s, dt) for kk, s in reg_shapes.items()})

    # -- heads --
    def _mlm_logits(self, params, h):
        """BERT's LM head on rows h (M, D) -> (logits (M, V), cache); decoder tied to the token table."""
        u, c_dense = _lin(params, "mlm.dense", h)
        a, c_act = activations.gelu_forward(u)
        z, c_ln = _ln(params, "mlm.norm", a)
        logits, c_dec = linear.linear_forward(z, params["tok.table"].T, params["mlm.decoder.b"])
        return logits, (c_dense, c_act, c_ln, c_dec)

    def _mlm_logits_backward(self, cache, dlogits, grads):
        c_dense, c_act, c_ln, c_dec = cache
        dz, dwt, dbias = linear.linear_backward(c_dec, dlogits)
        grads["tok.table"] = grads["tok.table"] + dwt.T
        grads["mlm.decoder.b"] = dbias
        da = _ln_backward(c_ln, dz, "mlm.norm", grads)
        du = activations.gelu_backward(c_act, da)[0]
        return _lin_backward(c_dense, du, "mlm.dense", grads)

    # -- training loss --
    def loss(self, params, ids, attn_mask, region_inputs, boxes, valid, mlm_mask_info, itm_labels, *,
             text_only=False):
        """MLM + ITM loss and its cache.

        ids (B, T) int: the original captions (the MLM targets); attn_mask (B, T) bool; region_inputs
        (B, K, C, c, c) crops; boxes (B, K, 4) pixels; valid (B, K) bool; ``mlm_mask_info`` = ``(input_ids,
        chosen)`` from :func:`bert_mask` (or None: no MLM term); ``itm_labels`` (B,) int, 1 = the caption
        matches these regions, 0 = it does not (or None: no ITM term).
        """
        if mlm_mask_info is None and itm_labels is None:
            raise ValueError("pass mlm_mask_info, itm_labels or both: the loss would be empty")
        inp = ids
        chosen = None
        if mlm_mask_info is not None:
            inp, chosen = mlm_mask_info
            check_text_batch(inp, attn_mask, self.max_text_len)
            if not isinstance(chosen, np.ndarray) or chosen.dtype != np.bool_ or chosen.shape != inp.shape:
                raise ValueError(f"chosen (mlm_mask_info[1]) must be a bool array of shape {inp.shape}")
            if not chosen.any():
                raise ValueError("chosen (mlm_mask_info[1]) marks no token: the MLM mean is undefined")
            if (chosen & ~attn_mask).any():
                raise ValueError("chosen (mlm_mask_info[1]) marks padding positions")
            check_text_batch(ids, attn_mask, self.max_text_len)
            if ids.shape != inp.shape:
                raise ValueError(f"ids {ids.shape} and the masked input ids {inp.shape} must have one shape")
        y, c_trunk = self._trunk(params, inp, attn_mask, region_inputs, boxes, valid, text_only=text_only)
        value = y.dtype.type(0)
        c_mlm = c_itm = None
        terms = {}
        if chosen is not None:
            logits, c_head = self._mlm_logits(params, y[:, :inp.shape[1]][chosen])
            m = logits.shape[0]
            ce, c_ce = mm.masked_token_ce_forward(logits[None], ids[chosen][None], np.ones((1, m), bool))
            value = value + ce
            terms["mlm"] = float(ce)
            c_mlm = (c_head, c_ce)
        if itm_labels is not None:
            itm_labels = np.asarray(itm_labels)
            if itm_labels.shape != (len(ids),) or itm_labels.dtype.kind not in "iub":
                raise ValueError(f"itm_labels must be an integer array (B,) = ({len(ids)},) of 0/1, got "
                                 f"{itm_labels.dtype} {itm_labels.shape}")
            il, c_head = _lin(params, "itm", y[:, 0])
            bce, c_ce = cross_entropy.cross_entropy_forward(il, itm_labels.astype(np.int64))
            value = value + bce
            terms["itm"] = float(bce)
            c_itm = (c_head, c_ce)
        return value, (c_trunk, c_mlm, c_itm, chosen, y.shape, terms)

    def backward(self, cache) -> dict:
        """Gradients of the total loss with respect to every parameter (keys of ``params``)."""
        c_trunk, c_mlm, c_itm, chosen, shape, _ = cache
        dt = c_trunk[-1]
        b, length, d = shape
        t = c_trunk[10]
        grads = {}
        dy = np.zeros(shape, dt)
        if c_itm is not None:
            c_head, c_ce = c_itm
            dil = cross_entropy.cross_entropy_backward(c_ce, 1.0)[0]
            dy[:, 0] += _lin_backward(c_head, dil, "itm", grads)
        else:
            grads["itm.w"], grads["itm.b"] = np.zeros((d, 2), dt), np.zeros(2, dt)
        head = {}
        if c_mlm is not None:
            c_head, c_ce = c_mlm
            dlogits = mm.masked_token_ce_backward(c_ce, 1.0)[0][0]
            head["tok.table"] = np.zeros((self.vocab_size, d), dt)
            dh = self._mlm_logits_backward(c_head, dlogits, head)
            dy[:, :t][chosen] += dh
        self._trunk_backward(c_trunk, dy, grads)
        if c_mlm is not None:
            grads["tok.table"] = grads["tok.table"] + head.pop("tok.table")
            grads.update(head)
        else:
            grads["mlm.dense.w"], grads["mlm.dense.b"] = np.zeros((d, d), dt), np.zeros(d, dt)
            grads["mlm.norm.gamma"], grads["mlm.norm.beta"] = np.zeros(d, dt), np.zeros(d, dt)
            grads["mlm.decoder.b"] = np.zeros(self.vocab_size, dt)
        return grads

    def loss_and_grads(self, params, *args, **kw):
        value, cache = self.loss(params, *args, **kw)
        return float(value), self.backward(cache)

    @staticmethod
    def loss_terms(cache) -> dict:
        """The two terms of the last loss as floats: {"mlm": ..., "itm": ...} (those that were computed)."""
        return dict(cache[-1])

    # -- evaluation --
    def predict_masked(self, params, input_ids, attn_mask, region_inputs, boxes, valid, at, *, text_only=False):
        """MLM logits at chosen positions.  ``at``: a (B, T) bool mask -> (M, V), rows in row-major order of
        the True entries; or a (B,) integer array of one position per row -> (B, V)."""
        y, _ = self._trunk(params, input_ids, attn_mask, region_inputs, boxes, valid, text_only=text_only,
                           train=False)
        text = y[:, :input_ids.shape[1]]
        at = np.asarray(at)
        if at.dtype == np.bool_:
            if at.shape != input_ids.shape:
                raise ValueError(f"at must be a bool mask of shape {input_ids.shape}, got shape {at.shape}")
            h = text[at]
        else:
            h = text[np.arange(len(text)), self._positions(at, input_ids.shape)]
        return self._mlm_logits(params, h)[0]

    def itm_logits(self, params, ids, attn_mask, region_inputs, boxes, valid, *, text_only=False):
        """Sentence-image logits (B, 2); column 1 = "the caption matches the regions"."""
        y, _ = self._trunk(params, ids, attn_mask, region_inputs, boxes, valid, text_only=text_only,
                           train=False)
        return _lin(params, "itm", y[:, 0])[0]

    def attention_to_regions(self, params, ids, attn_mask, region_inputs, boxes, valid, position, *,
                             text_only=False):
        """Last-layer attention weights (B, H, K) from the text token at ``position`` (an int, or (B,) ints)
        to the K region tokens; absent regions get exactly 0.  Average over axis 1 for a head mean."""
        _, cache = self._trunk(params, ids, attn_mask, region_inputs, boxes, valid, text_only=text_only,
                               train=False)
        c_blocks, t = cache[7], cache[10]
        probs = attention.multi_head_attention_probs(c_blocks[-1][1])  # (B, H, L, L)
        pos = self._positions(position, ids.shape)
        return probs[np.arange(len(ids)), :, pos, t:]

    @staticmethod
    def _positions(position, shape):
        b, t = shape
        pos = np.broadcast_to(np.asarray(position), (b,))
        if pos.dtype.kind not in "iu" or pos.min() < 0 or pos.max() >= t:
            raise ValueError(f"position must be integer(s) in [0, {t}), got {position!r}")
        return pos
