"""PyTorch port of every registered refssl op: losses, layers, attention and masked modelling.

Each function is named like the registered op (``refssl.registry.get(name)``) and is written from the
op's stated formula (its forward docstring) and ``../shared/reference/canonical-definitions.md``, with
torch autograd providing the gradients.  ``OPS`` maps every op name to its function.

Calling convention (that of the conformance kit, ``python -m refssl conformance --framework torch``):

* the op's ARRAY inputs positionally, in the op's order, as torch tensors: differentiable ones with
  ``requires_grad``, integer/bool inputs as integer/bool tensors, a learnable scalar (CLIP's logit
  scale) as a 0-d tensor, an optional array input (``key_mask``) possibly ``None``;
* the op's hyperparameters as keyword arguments with the same names as refssl's ``forward``;
* the return value is the output tensor; gradients are ``autograd`` of ``sum(out * upstream)``.

Scale: every loss returns exactly refssl's value, i.e. the scale refssl documents as official or
paper (NT-Xent at the *paper* scale, half the official TF value; MoCo v3 with its 2 tau; VICReg with the
official 1/2 on the variance term; ...).  Inputs whose gradient slot is ``None`` in refssl (stop-gradient
targets, keys, queues, banks, centers, codebooks, buffers, constant targets) are detached here, as the
official code does, so the port never needs and never produces their gradient.

Numerics: log-sum-exp via ``torch.logsumexp`` / ``log_softmax`` (max-shifted); L2 normalisation with
PyTorch's convention ``x / max(||x||, eps)`` unless the op states another one (BYOL: the JAX floor on the
squared norm; cosine_distill and vector_quantize: the plain norm); squared distances from explicit
differences (exact at coincident points, translation invariant).  Needs torch (``pip install -e .[torch]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["OPS"]  # plus one function per op, listed in OPS

_NORM_EPS = 1e-12    # torch F.normalize: clamp the norm
_COS_EPS = 1e-8      # torch CosineSimilarity: clamp each norm
_BYOL_EPS_SQ = 1e-12  # JAX/TF: clamp the squared norm


# ----------------------------------------------------------------------------------------------------
# shared pieces

def _unit(x, eps=_NORM_EPS):
    """x / max(||x||, eps) along the last axis (torch ``F.normalize``)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _unit_plain(x):
    """x / ||x|| along the last axis (no floor: a zero row would be NaN, as in the official code)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _ce(logits, labels):
    """Row-mean softmax cross-entropy CE(Lambda, y) = mean_r [lse(Lambda_r) - Lambda_{r, y_r}].

    A row whose target logit is its largest is evaluated as log(1 + sum_{j != y} e^{Lambda_j - Lambda_y})
    with log1p: near a zero loss (well separated positives, small tau, large logit scale) the error is
    then relative to the loss, where lse - Lambda_y would cancel to an absolute eps * |Lambda|.  Other rows
    use the max-shifted lse.  Entries of -inf (masked columns) contribute 0 to both forms.
    """
    lab = labels.long().unsqueeze(-1)
    target = logits.gather(-1, lab)
    others = (logits - target).scatter(-1, lab, float("-inf"))       # Lambda_j - Lambda_y, j != y
    top = others.amax(-1)
    # the clamp only guards the branch that is not selected (e^{positive} could overflow there)
    near = torch.log1p(torch.exp(others.clamp_max(0.0)).sum(-1))
    far = torch.logsumexp(logits, dim=-1) - target.squeeze(-1)
    return torch.where(top <= 0, near, far).mean()


def _arange(n, ref):
    return torch.arange(n, device=ref.device)


def _eye(n, ref):
    return torch.eye(n, dtype=torch.bool, device=ref.device)


def _sq_dists(x, y):
    """||x_i - y_j||^2 from explicit differences (N, M): exactly 0 for coincident points."""
    return (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)


def _safe_sqrt(a):
    """sqrt(a) with a zero (not NaN) gradient where a == 0."""
    pos = a > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, a, torch.ones_like(a))), torch.zeros_like(a))


def _softplus(x):
    """log(1 + e^x) without torch's linear cut-off at x > 20 (which is off by e^-20 ~ 2e-9)."""
    return torch.relu(x) + torch.log1p(torch.exp(-x.abs()))


def _standardize(z, eps):
    """Affine-free training-mode BatchNorm per column: (z - mean) / sqrt(Var_b + eps)."""
    zc = z - z.mean(0, keepdim=True)
    return zc / torch.sqrt(zc.pow(2).mean(0, keepdim=True) + eps)


def _offdiag(c):
    return c.masked_fill(_eye(c.shape[0], c), 0.0)


# ----------------------------------------------------------------------------------------------------
# contrastive

def info_nce(z1, z2, *, temperature=0.1, normalize=True, block_size=None):
    """SimCLR NT-Xent at the paper scale (canonical §2): the official TF value is 2x this.

    ``block_size`` is refssl's memory-tiling switch; the tiled loss equals the dense one, so it is accepted
    and ignored here.

    u = [z1^; z2^] (2N, D), s = u u^T / tau with the self entry excluded, positive of i is i + N mod 2N;
    L = 1/(2N) sum_i CE over the 2N - 1 other rows.  ``normalize=False`` uses raw dot products.
    """
    n = z1.shape[0]
    u = torch.cat([z1, z2], 0)
    if normalize:
        u = _unit(u)
    s = (u @ u.T / temperature).masked_fill(_eye(2 * n, u), float("-inf"))
    pos = (_arange(2 * n, u) + n) % (2 * n)
    return _ce(s, pos)


def clip(img, txt, logit_scale, *, block_size=None):
    """Symmetric CLIP loss (open_clip ClipLoss, canonical §3): Lambda = e^s I^ T^^T,
    L = (CE(Lambda, id) + CE(Lambda^T, id)) / 2; ``logit_scale`` s is a 0-d tensor (log 1/tau).
    ``block_size`` (refssl's memory tiling, same result) is accepted and ignored."""
    logits = torch.exp(logit_scale) * (_unit(img) @ _unit(txt).T)
    ids = _arange(img.shape[0], img)
    return 0.5 * (_ce(logits, ids) + _ce(logits.T, ids))


def cross_entropy(logits, labels):
    """Row-mean softmax cross-entropy (``F.cross_entropy``, mean reduction)."""
    return _ce(logits, labels)


def _supcon_rows(z, labels):
    """(B, V, D) view-major -> (V B, D) rows with labels repeated per view; (M, D) passes through."""
    if z.dim() == 3:
        b, v, d = z.shape
        return z.transpose(0, 1).reshape(v * b, d), labels.reshape(-1).repeat(v)
    return z, labels.reshape(-1)


def _supcon_parts(z, labels, temperature):
    rows, y = _supcon_rows(z, labels)
    u = _unit(rows)
    m = u.shape[0]
    if m == 1:
        return None  # no anchor has a contrast set: the loss is 0, and so is its gradient
    self_ = _eye(m, u)
    s = u @ u.T / temperature
    lse = torch.logsumexp(s.masked_fill(self_, float("-inf")), dim=1)   # over A(i) = {j != i}
    pos = (y.unsqueeze(0) == y.unsqueeze(1)) & ~self_                  # P(i)
    return s, lse, pos


def supcon(z, labels, *, temperature=0.1, base_temperature=None):
    """SupCon L_out (SupContrast SupConLoss, contrast_mode "all", canonical §4), rows L2-normalised:
    L_i = -(tau/tau_b) mean_{p in P(i)} [s_ip - lse_{a != i} s_ia]; anchors without positives give 0
    and count in the mean over all V B anchors.  ``base_temperature=None`` means tau_b = tau."""
    tb = temperature if base_temperature is None else base_temperature
    parts = _supcon_parts(z, labels, temperature)
    if parts is None:
        return (z * 0.0).sum()
    s, lse, pos = parts
    posf = pos.to(s.dtype)
    count = posf.sum(1)
    mean_log_prob = ((s - lse.unsqueeze(1)) * posf).sum(1) / count.clamp_min(1.0)
    return -(temperature / tb) * mean_log_prob.mean()


def supcon_in(z, labels, *, temperature=0.1, base_temperature=None):
    """SupCon L_in: L_i = -(tau/tau_b) log[ mean_{p in P(i)} e^{s_ip} / sum_{a != i} e^{s_ia} ];
    anchors without positives give 0 and count in the mean."""
    tb = temperature if base_temperature is None else base_temperature
    parts = _supcon_parts(z, labels, temperature)
    if parts is None:
        return (z * 0.0).sum()
    s, lse, pos = parts
    has = pos.any(1)
    # rows without positives get a finite dummy row so that logsumexp's backward stays NaN-free
    s_pos = torch.where(pos | ~has.unsqueeze(1), s, torch.full_like(s, float("-inf")))
    lse_pos = torch.logsumexp(s_pos, dim=1)
    count = pos.to(s.dtype).sum(1).clamp_min(1.0)
    term = lse_pos - torch.log(count) - lse
    return -(temperature / tb) * torch.where(has, term, torch.zeros_like(term)).mean()


def debiased_info_nce(z1, z2, *, temperature=0.5, tau_plus=0.1):
    """Debiased contrastive loss (Chuang et al., chingyaoc/DCL, canonical §5), shifted by each row's max:
    Ng = max((neg - tau+ Nn pos)/(1 - tau+), Nn e^{-1/t}), L = mean_i -log(pos / (pos + Ng)), Nn = 2N - 2."""
    n = z1.shape[0]
    u = _unit(torch.cat([z1, z2], 0))
    t = temperature
    s = u @ u.T / t
    idx = _arange(2 * n, u)
    pos_col = (idx + n) % (2 * n)
    self_ = _eye(2 * n, u)
    shift = s.masked_fill(self_, float("-inf")).amax(1, keepdim=True).detach()
    e = torch.exp((s - shift).masked_fill(self_, float("-inf")))     # e^{s - m}, self term 0
    l_pos = s[idx, pos_col]
    pos = e[idx, pos_col]
    neg = e.sum(1) - pos
    nn_ = 2 * n - 2
    shift = shift.squeeze(1)
    ng = torch.maximum((neg - tau_plus * nn_ * pos) / (1.0 - tau_plus), nn_ * torch.exp(-1.0 / t - shift))
    return (torch.log(pos + ng) + shift - l_pos).mean()


def alignment(x, y, *, alpha=2):
    """Alignment (Wang & Isola, canonical §6): mean_i ||x_i - y_i||^alpha on the inputs as given;
    the gradient at x_i = y_i is taken as 0."""
    sq = (x - y).pow(2).sum(-1)
    nz = sq > 0
    val = torch.where(nz, torch.where(nz, sq, torch.ones_like(sq)).pow(alpha / 2.0), torch.zeros_like(sq))
    return val.mean()


def uniformity(x, *, t=2):
    """Uniformity: log of the mean of e^{-t ||x_i - x_j||^2} over the N(N-1)/2 unique pairs i < j."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    sq = (x[i] - x[j]).pow(2).sum(-1)
    return torch.logsumexp(-t * sq, dim=0) - math.log(n * (n - 1) / 2)


def l2_normalize(x, *, eps=1e-12):
    """Row-wise x / max(||x||, eps) along the last axis (torch ``F.normalize``)."""
    return _unit(x, eps)


# ----------------------------------------------------------------------------------------------------
# redundancy reduction

def batch_standardize(x, *, eps=1e-5):
    """Affine-free BatchNorm1d in training mode: (x - mean) / sqrt(Var_b + eps) per column."""
    return _standardize(x, eps)


def _cross_corr(s1, s2):
    return s1.T @ s2 / s1.shape[0]


def barlow_twins(z1, z2, *, lambd=0.0051, eps=1e-5):
    """Barlow Twins at the official scale (canonical §7): C = BN(z1)^T BN(z2) / N, each view with its own
    statistics; L = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2 (solo-learn = 0.025 x this)."""
    c = _cross_corr(_standardize(z1, eps), _standardize(z2, eps))
    return (1.0 - torch.diagonal(c)).pow(2).sum() + lambd * _offdiag(c).pow(2).sum()


def barlow_twins_hsic(z1, z2, *, lambd=0.0051, eps=1e-5, normalization="batchnorm"):
    """Barlow Twins with off-diagonal target -1 (Tsai et al., canonical §8):
    L = sum_i (1 - C_ii)^2 + lambd sum_{i != j} (1 + C_ij)^2.  ``normalization="tsai"``: rows
    L2-normalised, then columns centred and divided by the unbiased std without eps; C still / N."""
    if normalization == "tsai":
        def norm(z):
            zn = _unit(z)
            return (zn - zn.mean(0, keepdim=True)) / zn.std(0, unbiased=True, keepdim=True)
        s1, s2 = norm(z1), norm(z2)
    elif normalization == "batchnorm":
        s1, s2 = _standardize(z1, eps), _standardize(z2, eps)
    else:
        raise ValueError(f"normalization must be 'batchnorm' or 'tsai', got {normalization!r}")
    c = _cross_corr(s1, s2)
    return (1.0 - torch.diagonal(c)).pow(2).sum() + lambd * _offdiag(1.0 + c).pow(2).sum()


def vicreg(x, y, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, batch_size=None):
    """VICReg as the official code (canonical §9): MSE invariance, variance hinge with 1/2 per view
    (solo-learn: 2x), covariance with the configured ``batch_size`` - 1 (default N - 1) denominator."""
    n, d = x.shape
    nb = n if batch_size is None else batch_size
    inv = (x - y).pow(2).mean()
    xc, yc = x - x.mean(0), y - y.mean(0)

    def var_term(c):
        std = torch.sqrt(c.pow(2).sum(0) / (n - 1) + eps)
        return torch.relu(1.0 - std).mean() / 2.0

    def cov_term(c):
        cov = c.T @ c / (nb - 1)
        return _offdiag(cov).pow(2).sum() / d

    return (sim_coeff * inv + std_coeff * (var_term(xc) + var_term(yc))
            + cov_coeff * (cov_term(xc) + cov_term(yc)))


def _median_pair_distance(x):
    """Median over pairs i < j of ||x_i - x_j|| (mean of the two middle values for an even count),
    differentiable through the distance(s) that define it."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    dist = torch.sort(_safe_sqrt((x[i] - x[j]).pow(2).sum(-1))).values
    p = dist.shape[0]
    return dist[p // 2] if p % 2 else 0.5 * (dist[p // 2 - 1] + dist[p // 2])


def hsic(x, y, *, kernel="linear", sigma=None):
    """Biased HSIC (Gretton et al. 2005): tr(K H L H) / (N - 1)^2.  Gaussian kernel
    exp(-||a - b||^2 / (2 sigma^2)) with a fixed ``sigma`` for both inputs or, for ``None``, the median
    pairwise distance of each input (the gradient flows through the bandwidth)."""
    n = x.shape[0]

    def centred_gram(a):
        # H K H.  Constants vanish under centring, so the linear kernel is built from centred rows and
        # the Gaussian one from e^{-d} - 1 (expm1): a wide bandwidth then does not cancel 1 - 1 in float32
        if kernel == "linear":
            ac = a - a.mean(0, keepdim=True)
            return ac @ ac.T
        if kernel == "gaussian":
            bw = _median_pair_distance(a) if sigma is None else sigma
            k = torch.expm1(-_sq_dists(a, a) / (2.0 * bw * bw))
            return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kernel!r}")

    # tr(K H L H) = sum((H K H) * (H L H)) since H is symmetric and idempotent
    return (centred_gram(x) * centred_gram(y)).sum() / (n - 1) ** 2


def gaussian_ib(z1, z2, *, beta=2.0, eps=1e-4, standardize_views=True):
    """Gaussian IB of the Barlow Twins appendix: log|S_{Z|X}| + ((1 - beta)/beta) log|S_Z| with
    S_{Z|X} = (1/2N) sum_n (s1 - s2)(s1 - s2)^T + eps I and S_Z the biased covariance of the 2N stacked
    rows + eps I; s = per-view BatchNorm standardisation (eps 1e-5) or the raw views.  The covariances
    and log-determinants are evaluated in float64 (as refssl), the result cast back."""
    if standardize_views:
        z1, z2 = _standardize(z1, 1e-5), _standardize(z2, 1e-5)
    a, b = z1.to(torch.float64), z2.to(torch.float64)
    n, d = a.shape
    ridge = eps * torch.eye(d, dtype=torch.float64, device=a.device)
    diff = a - b
    s_cond = diff.T @ diff / (2 * n) + ridge
    both = torch.cat([a, b], 0)
    bc = both - both.mean(0, keepdim=True)
    s_z = bc.T @ bc / (2 * n) + ridge

    def logdet(m):
        return 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(m))).sum()

    return (logdet(s_cond) + (1.0 - beta) / beta * logdet(s_z)).to(z1.dtype)


# ----------------------------------------------------------------------------------------------------
# teacher-student

def _byol_unit(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(_BYOL_EPS_SQ))


def byol(p1, p2, t1, t2):
    """Official BYOL loss (deepmind-research, canonical §10), in [0, 8]:
    (1/N) sum_i ||p1^_i - t2^_i||^2 + ||p2^_i - t1^_i||^2, JAX normalisation, targets stop-gradient."""
    t1, t2 = t1.detach(), t2.detach()
    d1 = (_byol_unit(p1) - _byol_unit(t2)).pow(2).sum(-1)
    d2 = (_byol_unit(p2) - _byol_unit(t1)).pow(2).sum(-1)
    return (d1 + d2).mean()


def _cos(a, b):
    """a.b / (max(||a||, 1e-8) max(||b||, 1e-8)) row by row."""
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(_COS_EPS)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(_COS_EPS)
    return (a * b).sum(-1) / (na * nb)


def neg_cosine(p, z):
    """-(1/N) sum_i cos(p_i, sg z_i) (SimSiam's D, lightly's NegativeCosineSimilarity)."""
    return -_cos(p, z.detach()).mean()


def simsiam(p1, p2, z1, z2):
    """SimSiam (canonical §11): -1/2 [mean cos(p1, sg z2) + mean cos(p2, sg z1)]."""
    return -0.5 * (_cos(p1, z2.detach()).mean() + _cos(p2, z1.detach()).mean())


def moco_v3(q1, q2, k1, k2, *, temperature=1.0):
    """MoCo v3 with the official 2 tau (canonical §12), single process:
    2 tau CE(q1^ k2^^T / tau, id) + 2 tau CE(q2^ k1^^T / tau, id); keys stop-gradient."""
    k1, k2 = _unit(k1.detach()), _unit(k2.detach())
    ids = _arange(q1.shape[0], q1)
    t = temperature
    return 2 * t * (_ce(_unit(q1) @ k2.T / t, ids) + _ce(_unit(q2) @ k1.T / t, ids))


def moco_queue(q, k, queue, *, temperature=0.2):
    """MoCo v2 InfoNCE (canonical §13): CE([q^.k^, q^.Q_1..Q_K] / tau, 0); k and the queue (used as
    stored, one key per row) are stop-gradient."""
    qh, kh = _unit(q), _unit(k.detach())
    logits = torch.cat([(qh * kh).sum(-1, keepdim=True), qh @ queue.detach().T], 1) / temperature
    return _ce(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def dino(student, teacher, center, *, student_temp=0.1, teacher_temp=0.04):
    """DINO loss (DINOLoss, canonical §14): mean over the (teacher t, student v) pairs with v != t of
    mean_b -P_t[b] . log_softmax(student[v, b] / tau_s), P_t = softmax((teacher[t] - c) / tau_t)
    (teacher and center stop-gradient; center (K,) or (1, K))."""
    p_t = torch.softmax((teacher.detach() - center.detach().reshape(1, 1, -1)) / teacher_temp, dim=-1)
    logq = torch.log_softmax(student / student_temp, dim=-1)
    vt, vs, n = teacher.shape[0], student.shape[0], student.shape[1]
    ce = -torch.einsum("tbk,vbk->tv", p_t, logq) / n            # (V_t, V_s) batch-mean CE of each pair
    same_crop = _arange(vt, ce).unsqueeze(1) == _arange(vs, ce).unsqueeze(0)
    return ce.masked_fill(same_crop, 0.0).sum() / (vt * vs - min(vt, vs))


def nnclr(p1, p2, z1, z2, support, *, temperature=0.1):
    """NNCLR (paper pseudocode, solo-learn, canonical §15): nn_a = the normalised support row most
    similar to z_a^ (support rows normalised first); L = 1/2 CE(nn_1 p2^^T / tau, id)
    + 1/2 CE(nn_2 p1^^T / tau, id).  z1, z2 and the support are stop-gradient."""
    sh = _unit(support.detach())

    def nearest(z):
        return sh[torch.argmax(_unit(z.detach()) @ sh.T, dim=1)]

    ids = _arange(p1.shape[0], p1)
    t = temperature
    return 0.5 * (_ce(nearest(z1) @ _unit(p2).T / t, ids) + _ce(nearest(z2) @ _unit(p1).T / t, ids))


def mean_shift(query, target, bank, *, k=5, ptr=0):
    """Mean Shift (MSF train_msf.py, canonical §16): enqueue t^ into the bank at rows ptr.. (mod M)
    *before* the search, pick the k rows most similar to t^_i, L = mean_i mean_k (2 - 2 q^_i . m).
    target and bank are stop-gradient."""
    th = _unit(target.detach())
    m = bank.shape[0]
    rows = (ptr + _arange(th.shape[0], th)) % m
    bank2 = bank.detach().clone()
    bank2[rows] = th
    nbr = torch.topk(th @ bank2.T, k, dim=1).indices                 # (N, k)
    qh = _unit(query)
    return (2.0 - 2.0 * torch.einsum("nd,nkd->nk", qh, bank2[nbr])).mean()


# ----------------------------------------------------------------------------------------------------
# prototypes and I-Con

def proto_nce(q, k, queue, prototypes, assignments, phis, *, temperature=0.2, num_negative_prototypes=None,
              num_clusters=None, rng=None, negative_indices=None):
    """ProtoNCE (salesforce/PCL, canonical §17): L = L_inst + (1/M) sum_m CE(Lambda^m, id), with
    L_inst = CE([q^.k^, q^.queue^] / tau, 0) and Lambda^m_ij = q^_i . c^_{a_j} / phi_{a_j} over the
    columns a = (positive prototypes of the batch, then the negatives ``negative_indices[m]``), local
    indices of clustering m offset into the stacked ``prototypes``.  Only q gets a gradient.

    The negatives must be given as ``negative_indices`` (M, r): a port cannot replay a numpy ``rng``'s
    draw (``num_negative_prototypes = 0`` also works: no negatives).
    """
    qh = _unit(q)
    kh, queue_h = _unit(k.detach()), _unit(queue.detach())
    n = q.shape[0]
    logits = torch.cat([(qh * kh).sum(-1, keepdim=True), qh @ queue_h.T], 1) / temperature
    loss = _ce(logits, torch.zeros(n, dtype=torch.long, device=q.device))

    protos_h = _unit(prototypes.detach())
    phis = phis.detach()
    assignments = assignments.long()
    nc = [prototypes.shape[0]] if num_clusters is None else [int(c) for c in num_clusters]
    if negative_indices is None:
        if num_negative_prototypes != 0:
            raise ValueError("proto_nce port: pass the negatives as negative_indices (M, r); a numpy rng's "
                             "draw cannot be replayed in torch")
        negative_indices = [[] for _ in nc]
    neg = torch.as_tensor(negative_indices, dtype=torch.long, device=q.device).reshape(len(nc), -1)
    ids = _arange(n, q)
    proto_sum, offset = 0.0, 0
    for m, km in enumerate(nc):     # M clusterings (3 in PCL): a loop over clusterings, not samples
        cols = torch.cat([assignments[m], neg[m]]) + offset
        lam = qh @ protos_h[cols].T / phis[cols]
        proto_sum = proto_sum + _ce(lam, ids)
        offset += km
    return loss + proto_sum / len(nc)


def _uniform_support(n, m, mask_diagonal, ref):
    """u_j: uniform over the columns of the support S(i) (M, or the M - 1 non-self columns)."""
    if mask_diagonal:
        return (~_eye(n, ref)).to(ref.dtype) / (m - 1)
    return torch.full((n, m), 1.0 / m, dtype=ref.dtype, device=ref.device)


def icon(p, logits, *, alpha=0.0, alpha_q=0.0, mask_diagonal=True, learn_p=False):
    """I-Con (canonical §20): mean over rows of KL(p~_i || q~_i), q = softmax of the logits over S(i)
    (all columns, or j != i when ``mask_diagonal``), p~ = (1 - alpha) p + alpha u,
    q~ = (1 - alpha_q) q + alpha_q u, u uniform over S(i); 0 log 0 = 0.  This is the true KL (the
    official playground value minus H(p~), same logit gradient).  p is a constant unless ``learn_p``."""
    if not learn_p:
        p = p.detach()
    n, m = logits.shape
    u = _uniform_support(n, m, mask_diagonal, logits)
    if mask_diagonal:
        logits = logits.masked_fill(_eye(n, logits), float("-inf"))
    logq = torch.log_softmax(logits, dim=1)
    if alpha_q:
        # log((1 - a) q + a u) as a log-sum of the two parts.  Outside the support (the masked self entry)
        # both parts are -inf: placeholders keep logaddexp's backward finite there (p~ = 0 drops the entry)
        out = u == 0
        logq = torch.logaddexp((math.log1p(-alpha_q) + logq).masked_fill(out, 0.0),
                               math.log(alpha_q) + torch.log(u.masked_fill(out, 1.0)))
    pt = (1.0 - alpha) * p + alpha * u
    support = pt > 0
    safe_pt = torch.where(support, pt, torch.ones_like(pt))
    safe_logq = torch.where(support, logq, torch.zeros_like(logq))
    kl = torch.where(support, pt * (torch.log(safe_pt) - safe_logq), torch.zeros_like(pt))
    return kl.sum() / n


def gaussian_kernel(x, y, *, sigma=1.0, metric="euclidean"):
    """Gaussian-kernel logits -d(x_i, y_j) / (2 sigma^2) (I-Con Gaussian): d = squared Euclidean
    distance, 1 - cos, or -x.y."""
    if metric == "euclidean":
        d = _sq_dists(x, y)
    elif metric == "cosine":
        d = 1.0 - _unit(x) @ _unit(y).T
    elif metric == "dot":
        d = -(x @ y.T)
    else:
        raise ValueError(f"metric must be 'euclidean', 'cosine' or 'dot', got {metric!r}")
    return -d / (2.0 * sigma * sigma)


def student_t_kernel(x, y, *, gamma=1.0, nu=1.0):
    """Student-t logits -log(1 + (d_ij / gamma)^nu), d = ||x_i - y_j||^2 (gamma = nu = 1: Cauchy),
    as -softplus(nu log(d / gamma)); 0 with gradient 0 at coincident points."""
    d = _sq_dists(x, y)
    nz = d > 0
    val = -_softplus(nu * torch.log(torch.where(nz, d, torch.ones_like(d)) / gamma))
    return torch.where(nz, val, torch.zeros_like(val))


def cluster_kernel(phi):
    """log q_ij = log sum_c phi_ic phi_jc / S_c, S_c = sum_k phi_kc (I-Con UniformCluster), as a
    log-sum-exp over clusters (phi > 0)."""
    lp = torch.log(phi)
    ls = torch.log(phi.sum(0))
    return torch.logsumexp(lp.unsqueeze(1) + lp.unsqueeze(0) - ls, dim=-1)


def _kl_rows(P, logq):
    """sum over entries with P > 0 of P (log P - log q) (0 log 0 = 0)."""
    sup = P > 0
    safe = torch.where(sup, P, torch.ones_like(P))
    return torch.where(sup, P * (torch.log(safe) - torch.where(sup, logq, torch.zeros_like(logq))),
                       torch.zeros_like(P)).sum()


def sne(y, P, *, kernel="gaussian"):
    """Conditional SNE, C = sum_i KL(P_i. || Q_i.) (a sum over rows, as the SNE paper): q_{j|i} a
    softmax over k != i of -||y_i - y_k||^2 (gaussian) or -log(1 + ||y_i - y_k||^2) (cauchy)."""
    d = _sq_dists(y, y)
    if kernel == "gaussian":
        logits = -d
    elif kernel == "cauchy":
        logits = -torch.log1p(d)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'cauchy', got {kernel!r}")
    logq = torch.log_softmax(logits.masked_fill(_eye(y.shape[0], y), float("-inf")), dim=1)
    return _kl_rows(P.detach(), logq)


def tsne(y, P):
    """Joint t-SNE objective KL(P || Q): w_ij = (1 + ||y_i - y_j||^2)^-1 (i != j),
    Q = w / sum_{k != l} w_kl, C = sum_{i != j} P_ij log(P_ij / Q_ij)."""
    n = y.shape[0]
    logw = (-torch.log1p(_sq_dists(y, y))).masked_fill(_eye(n, y), float("-inf"))
    logq = logw - torch.logsumexp(logw.reshape(-1), dim=0)
    return _kl_rows(P.detach(), logq)


# ----------------------------------------------------------------------------------------------------
# network layers

def linear(x, w, b):
    """x @ w + b on the last axis; w input-major (D_in, D_out) (``nn.Linear.weight`` is w^T)."""
    out = x @ w
    return out if b is None else out + b


def flatten(x):
    """(N, d_1, ..., d_k) -> (N, d_1 ... d_k), C order (``nn.Flatten``)."""
    return x.reshape(x.shape[0], -1)


def relu(x):
    """max(x, 0); derivative 0 at 0."""
    return torch.relu(x)


def gelu(x):
    """Exact (erf) GELU, x Phi(x)."""
    return F.gelu(x, approximate="none")


def sigmoid(x):
    """1 / (1 + e^{-x})."""
    return torch.sigmoid(x)


def _channel_view(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def batch_norm(x, gamma, beta, *, eps=1e-5):
    """Training-mode BatchNorm: per-channel statistics over every axis but axis 1 (biased variance)."""
    axes = [0] + list(range(2, x.dim()))
    xc = x - x.mean(axes, keepdim=True)
    xh = xc / torch.sqrt(xc.pow(2).mean(axes, keepdim=True) + eps)
    return _channel_view(gamma, x) * xh + _channel_view(beta, x)


def batch_norm_eval(x, gamma, beta, running_mean, running_var, *, eps=1e-5):
    """Eval-mode BatchNorm: gamma (x - running_mean) / sqrt(running_var + eps) + beta (buffers detached)."""
    rm, rv = _channel_view(running_mean.detach(), x), _channel_view(running_var.detach(), x)
    return _channel_view(gamma, x) * (x - rm) / torch.sqrt(rv + eps) + _channel_view(beta, x)


def layer_norm(x, gamma, beta, *, eps=1e-5):
    """LayerNorm over the last axis (biased variance); gamma and/or beta may be None (no scale / shift)."""
    xc = x - x.mean(-1, keepdim=True)
    y = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if gamma is not None:
        y = gamma * y
    return y if beta is None else y + beta


def conv2d(x, w, b, *, stride=1, padding=0):
    """2-D cross-correlation, NCHW, ``nn.Conv2d`` layout; b may be None."""
    return F.conv2d(x, w, b, stride=stride, padding=padding)


def conv_transpose2d(x, w, b, *, stride=1, padding=0):
    """Transposed 2-D convolution, ``nn.ConvTranspose2d`` layout w (C_in, C_out, KH, KW), output_padding 0."""
    return F.conv_transpose2d(x, w, b, stride=stride, padding=padding)


def avg_pool2d(x, *, kernel=2, stride=None):
    """Average pooling, no padding, floor mode; stride defaults to kernel."""
    return F.avg_pool2d(x, kernel, stride=kernel if stride is None else stride)


def max_pool2d(x, *, kernel=2, stride=None):
    """Max pooling, no padding, floor mode; ties send the gradient to the first maximum."""
    return F.max_pool2d(x, kernel, stride=kernel if stride is None else stride)


def mse(x, target):
    """Mean squared error over every entry; target stop-gradient (``nn.MSELoss()`` on a detached target)."""
    return (x - target.detach()).pow(2).mean()


# ----------------------------------------------------------------------------------------------------
# attention

def embedding(ids, table):
    """table[ids] (``nn.Embedding``): out shape ids.shape + (D,)."""
    return table[ids.long()]


def scaled_dot_product_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(dh), masked keys -inf) v per (batch, head); key_mask (B, Lk) bool,
    True = may be attended."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, key_mask=None, *, n_heads):
    """timm/MAE multi-head self-attention: qkv = x w_qkv + b_qkv split as (3, heads, D/heads),
    per-head scaled dot-product attention, heads concatenated, then w_out, b_out (input-major weights)."""
    bsz, length, d = x.shape
    qkv = linear(x, w_qkv, b_qkv).reshape(bsz, length, 3, n_heads, d // n_heads).permute(2, 0, 3, 1, 4)
    o = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], key_mask)    # (B, H, L, dh)
    return linear(o.transpose(1, 2).reshape(bsz, length, d), w_out, b_out)


# ----------------------------------------------------------------------------------------------------
# masked modelling

def patchify(images, *, patch):
    """MAE patchify: (N, C, H, W) -> (N, h w, p p C), patches row-major, inside (row, column, channel)."""
    n, c, hh, ww = images.shape
    h, w = hh // patch, ww // patch
    x = images.reshape(n, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, h * w, patch * patch * c)


def gather_tokens(x, ids):
    """out[n, k] = x[n, ids[n, k]] (``torch.gather`` along the token axis)."""
    return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mae_loss(pred, target, mask, *, norm_pix=False):
    """MAE loss (models_mae.forward_loss, canonical §18): per-patch MSE averaged over the removed
    patches (mask 1/True); ``norm_pix`` standardises each target patch with sqrt(Var_u + 1e-6).
    target and mask are constants."""
    target = target.detach()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(
            target.var(-1, unbiased=True, keepdim=True) + 1e-6)
    m = mask.to(pred.dtype)
    e = (pred - target).pow(2).mean(-1)
    return (e * m).sum() / m.sum()


def masked_token_ce(logits, targets, mask):
    """BEiT: cross-entropy over the masked positions of the batch, F.cross_entropy(logits[mask], targets[mask])."""
    sel = mask.bool()
    return _ce(logits[sel], targets[sel])


def cosine_distill(pred, target):
    """BEiT v2 VQ-KD decoder loss: mean over rows of 1 - cos(pred, sg target), plain norms."""
    t = target.detach()
    cos = (_unit_plain(pred) * _unit_plain(t)).sum(-1)
    return (1.0 - cos).mean()


def vector_quantize(z, codebook):
    """VQ-KD quantiser (beit2 NormEMAVectorQuantizer): z^ = z/||z||, the nearest normalised code by cosine
    (first index on ties), straight-through out = z^ + sg(c^_idx - z^).  The codebook (EMA-updated)
    gets no gradient."""
    zh = _unit_plain(z)
    ch = _unit_plain(codebook.detach())
    idx = torch.argmax(zh.detach() @ ch.T, dim=-1)
    return zh + (ch[idx] - zh).detach()


OPS = {
    fn.__name__: fn
    for fn in (
        alignment, avg_pool2d, barlow_twins, barlow_twins_hsic, batch_norm, batch_norm_eval, batch_standardize,
        byol, clip, cluster_kernel, conv2d, conv_transpose2d, cosine_distill, cross_entropy, debiased_info_nce,
        dino, embedding, flatten, gather_tokens, gaussian_ib, gaussian_kernel, gelu, hsic, icon, info_nce,
        l2_normalize, layer_norm, linear, mae_loss, masked_token_ce, max_pool2d, mean_shift, moco_queue, moco_v3,
        mse, multi_head_attention, neg_cosine, nnclr, patchify, proto_nce, relu, scaled_dot_product_attention,
        sigmoid, simsiam, sne, student_t_kernel, supcon, supcon_in, tsne, uniformity, vector_quantize, vicreg,
    )
}
__all__ += sorted(OPS)
