"""Teacher-student and momentum-encoder losses: BYOL, SimSiam, negative cosine, cosine distillation, DINO,
Mean Shift, MoCo v3, MoCo v2 queue, NNCLR.

Where ports go wrong: a missing stop-gradient on targets, keys, queues and centers (every case checks
that no gradient reaches them), normalisation (large and small norms), single-sample batches, the
2τ factor and small temperatures, sharp teachers and large student logits in DINO, nearest-neighbour
bookkeeping (k = 1, a queue pointer that wraps).
"""

from __future__ import annotations

import numpy as np

from . import Family, example_where, row_scales, tight_views, unit_rows

F = Family("teacher_student", "predictions regressed or contrasted onto stop-gradient targets")


def _four(rng, n, d):
    return tuple(rng.standard_normal((n, d)) for _ in range(4))


# -------------------------------------------------------------------------------------- BYOL, SimSiam

@F.edge(("byol", "simsiam"), "n1", "N = 1, a single sample")
def _bs_n1(rng):
    return _four(rng, 1, 6), {}


@F.edge(("byol", "simsiam"), "large_norms", "row norms 1e2..1e4: only directions count")
def _bs_large(rng):
    return tuple(a * row_scales(rng, 5, 2, 4) for a in _four(rng, 5, 6)), {}


@F.edge(("byol", "simsiam"), "small_norms", "row norms 1e-4..1e-3, above the normalisation floors")
def _bs_small(rng):
    return tuple(a * row_scales(rng, 5, -4, -3) for a in _four(rng, 5, 6)), {}


@F.edge("byol", "aligned_pair", "p1[0] is parallel to t2[0]: that term is exactly 0, its gradient too")
def _byol_aligned(rng):
    p1, p2, t1, t2 = _four(rng, 4, 5)
    p1[0] = 3.0 * t2[0]
    return (p1, p2, t1, t2), {}


@F.edge("neg_cosine", "n1", "N = 1, a single pair")
def _nc_n1(rng):
    return (rng.standard_normal((1, 6)), rng.standard_normal((1, 6))), {}


@F.edge("neg_cosine", "large_norms", "row norms 1e2..1e4: only directions count")
def _nc_large(rng):
    p, z = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    return (p * row_scales(rng, 5, 2, 4), z * row_scales(rng, 5, 2, 4)), {}


@F.edge("cosine_distill", "tokens", "(B, L, D) token features: the mean runs over every leading position")
def _cd_tokens(rng):
    pred = rng.standard_normal((2, 5, 6))
    return (pred, pred + rng.standard_normal((2, 5, 6))), {}


@F.edge("cosine_distill", "large_norms", "row norms 1e2..1e4: only directions count")
def _cd_large(rng):
    pred = rng.standard_normal((5, 6))
    target = pred + rng.standard_normal((5, 6))
    return (pred * row_scales(rng, 5, 2, 4), target * row_scales(rng, 5, 2, 4)), {}


@F.edge("cosine_distill", "n1", "a single row")
def _cd_n1(rng):
    pred = rng.standard_normal((1, 8))
    return (pred, pred + rng.standard_normal((1, 8))), {}


# ---------------------------------------------------------------------------------------------- DINO

def _dino(rng, v_s, v_t, n, k, s_scale=0.3, t_scale=0.1):
    student = s_scale * rng.standard_normal((v_s, n, k))
    teacher = t_scale * rng.standard_normal((v_t, n, k))
    return student, teacher, 0.05 * rng.standard_normal((1, k))


@F.edge("dino", "multi_crop", "2 global + 4 local student crops, 2 teacher crops: 10 (teacher, student) pairs")
def _dino_multi(rng):
    return _dino(rng, 6, 2, 3, 5), {"student_temp": 0.1, "teacher_temp": 0.04}


@F.edge("dino", "single_teacher_view", "one teacher crop: pairs are (0, v) for v = 1..V_s-1")
def _dino_one(rng):
    return _dino(rng, 3, 1, 4, 5), {"student_temp": 0.1, "teacher_temp": 0.04}


@F.edge("dino", "sharp_teacher", "teacher_temp 0.02 with teacher logits ~0.5: nearly one-hot targets")
def _dino_sharp(rng):
    return _dino(rng, 3, 2, 4, 6, t_scale=0.5), {"student_temp": 0.1, "teacher_temp": 0.02}


@F.edge("dino", "large_student_logits",
        "student logits ~10 at student_temp 0.1: scaled logits ~100, exp overflows float32 without a shift")
def _dino_large(rng):
    return _dino(rng, 3, 2, 4, 6, s_scale=10.0), {"student_temp": 0.1, "teacher_temp": 0.04}


@F.edge("dino", "n1", "a batch of one image")
def _dino_n1(rng):
    return _dino(rng, 3, 2, 1, 5), {"student_temp": 0.1, "teacher_temp": 0.04}


# ---------------------------------------------------------------------------------------- Mean Shift

@F.edge("mean_shift", "k1", "k = 1: the only neighbour is the target itself (BYOL-style 2 - 2 cos)")
def _msf_k1(rng):
    return example_where("mean_shift", rng, lambda a, kw: kw["k"] == 1 and a[0].shape[0] >= 3)


@F.edge("mean_shift", "pointer_wraps", "ptr + N > M: the enqueued targets wrap around the end of the bank")
def _msf_wrap(rng):
    return example_where("mean_shift", rng, lambda a, kw: kw["ptr"] + a[0].shape[0] > a[2].shape[0]
                         and kw["k"] >= 2 and a[0].shape[0] >= 2)


@F.edge("mean_shift", "k_large", "k >= 4 neighbours out of a bank of at least 8")
def _msf_klarge(rng):
    return example_where("mean_shift", rng, lambda a, kw: kw["k"] >= 4 and a[2].shape[0] >= 8)


# ------------------------------------------------------------------------------------ MoCo v3 and queue

def _queries_keys(rng, n, d, tight=False):
    if tight:
        q1, q2 = tight_views(rng, n, d)
        k1, k2 = tight_views(rng, n, d)
        return q1, q2, k1, k2
    b = rng.standard_normal(d)
    b /= np.linalg.norm(b)
    keys = b + 0.5 * rng.standard_normal((2 * n, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)), rng.standard_normal((n, d)), keys[:n], keys[n:]


@F.edge("moco_v3", "tau_0.01", "temperature 0.01: logits near 100 (float32 overflow without a max shift)")
def _v3_tau(rng):
    return _queries_keys(rng, 5, 8, tight=True), {"temperature": 0.01}


@F.edge("moco_v3", "n2", "N = 2: one negative key per query")
def _v3_n2(rng):
    return _queries_keys(rng, 2, 5), {"temperature": 0.2}


@F.edge("moco_v3", "tau_1", "temperature 1.0, the official ResNet-50 setting")
def _v3_t1(rng):
    return _queries_keys(rng, 6, 6), {"temperature": 1.0}


@F.edge("moco_v3", "duplicate_keys", "key 1 repeats key 0 in both views: a negative equal to the positive")
def _v3_dup(rng):
    q1, q2, k1, k2 = _queries_keys(rng, 5, 6)
    k1[1], k2[1] = k1[0], k2[0]
    return (q1, q2, k1, k2), {"temperature": 0.2}


def _moco_queue(rng, n, d, size, tight=False):
    if tight:  # queries, keys and queue around one direction: logits ~1/tau, softmax unsaturated
        a, b = tight_views(rng, n + size, d)
        return a[:n], b[:n], unit_rows(b[n:])
    b = rng.standard_normal(d)
    b /= np.linalg.norm(b)
    keys = b + 0.5 * rng.standard_normal((n + size, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)), keys[:n], unit_rows(keys[n:])


@F.edge("moco_queue", "tau_0.01", "temperature 0.01: logits near 100 (float32 overflow without a max shift)")
def _mq_tau(rng):
    return _moco_queue(rng, 4, 8, 6, tight=True), {"temperature": 0.01}


@F.edge("moco_queue", "n1", "a single query against its key and the queue")
def _mq_n1(rng):
    return _moco_queue(rng, 1, 6, 5), {"temperature": 0.2}


@F.edge("moco_queue", "queue_of_one", "K = 1: one negative per query")
def _mq_k1(rng):
    return _moco_queue(rng, 4, 5, 1), {"temperature": 0.2}


@F.edge("moco_queue", "large_norms", "query and key norms 1e2..1e4 (normalised in the loss; the queue as stored)")
def _mq_large(rng):
    q, k, queue = _moco_queue(rng, 4, 6, 5)
    return (q * row_scales(rng, 4, 2, 4), k * row_scales(rng, 4, 2, 4), queue), {"temperature": 0.2}


@F.edge("moco_queue", "duplicate_queue_rows", "queue rows 0 and 1 coincide: the same negative twice")
def _mq_dup(rng):
    q, k, queue = _moco_queue(rng, 4, 6, 5)
    queue[1] = queue[0]
    return (q, k, queue), {"temperature": 0.2}


# --------------------------------------------------------------------------------------------- NNCLR

@F.edge("nnclr", "n2", "N = 2: one negative prediction per neighbour")
def _nn_n2(rng):
    return example_where("nnclr", rng, lambda a, kw: a[0].shape[0] == 2)


@F.edge("nnclr", "tau_0.05", "temperature 0.05 (the registry's smallest), support of at least 6 rows")
def _nn_tau(rng):
    args, _ = example_where("nnclr", rng, lambda a, kw: a[0].shape[0] >= 3 and a[4].shape[0] >= 6)
    return args, {"temperature": 0.05}


@F.edge("nnclr", "shared_neighbour", "both views' lookups of sample 0 return the same support row")
def _nn_shared(rng):
    def same(a, kw):
        s = unit_rows(a[4])
        return a[0].shape[0] >= 3 and np.argmax(unit_rows(a[2][:1]) @ s.T) == np.argmax(unit_rows(a[3][:1]) @ s.T)
    return example_where("nnclr", rng, same)
