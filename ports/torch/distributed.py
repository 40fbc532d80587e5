"""PyTorch ports of the sharded losses of :mod:`refssl.distributed`, run under ``torch.distributed``.

Each ``*_rank`` function takes rank-local tensors, gathers what the official code gathers, and returns
the rank's loss; autograd plus the collectives' backward give each rank the gradient of its own rows.
Gradient-carrying gathers use ``torch.distributed.nn.functional.all_gather`` (its backward sums the
ranks' gradients and keeps the own slice); stop-gradient gathers (MoCo v3 keys, labels) use
``torch.distributed.all_gather``.  Written from the formulas (canonical-definitions §24), not from
refssl's code, so that ``tests/test_distributed_gloo.py`` is an independent check.

Run as a worker: ``python -m ports.torch.distributed --rank R --world K --port P --inputs IN.npz
--out OUT.npz`` (the test starts K of them on 127.0.0.1 with the gloo backend).
"""

from __future__ import annotations

import argparse
import datetime
import json

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.nn.functional as F

__all__ = ["gather_with_grad", "gather_no_grad", "info_nce_rank", "clip_rank", "supcon_rank",
           "moco_v3_rank", "barlow_twins_rank", "vicreg_rank", "dino_center_update", "main"]


def gather_with_grad(x):
    return torch.cat(dnn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x):
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _offset(n):
    return dist.get_rank() * n


def info_nce_rank(z1, z2, temperature=0.1):
    n = z1.shape[0]
    a_all, b_all = gather_with_grad(z1), gather_with_grad(z2)
    n_g = a_all.shape[0]
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    cols = F.normalize(torch.cat([a_all, b_all]), dim=1)
    logits = u @ cols.T / temperature
    g = _offset(n) + torch.arange(n)
    self_col = torch.cat([g, n_g + g])
    logits = logits.masked_fill(F.one_hot(self_col, 2 * n_g).bool(), float("-inf"))
    return F.cross_entropy(logits, torch.cat([n_g + g, g]))


def clip_rank(img, txt, logit_scale):
    """open_clip ClipLoss with gather_with_grad=True, local_loss=True."""
    i, t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    i_all, t_all = gather_with_grad(i), gather_with_grad(t)
    scale = logit_scale.exp()
    labels = _offset(img.shape[0]) + torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(scale * i @ t_all.T, labels) + F.cross_entropy(scale * t @ i_all.T, labels))


def supcon_rank(z, labels, temperature=0.1, base_temperature=None):
    base = temperature if base_temperature is None else base_temperature
    n, v, _ = z.shape
    z_all, y_all = gather_with_grad(z), gather_no_grad(labels)
    n_g = z_all.shape[0]
    anchors = F.normalize(torch.cat(torch.unbind(z, dim=1)), dim=1)          # view-major (v n, D)
    contrast = F.normalize(torch.cat(torch.unbind(z_all, dim=1)), dim=1)     # (v N_g, D)
    logits = anchors @ contrast.T / temperature
    self_col = (torch.arange(v)[:, None] * n_g + _offset(n) + torch.arange(n)[None, :]).reshape(-1)
    self_mask = F.one_hot(self_col, v * n_g).bool()
    pos = (labels.repeat(v)[:, None] == y_all.repeat(v)[None, :]) & ~self_mask
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    mean_pos = (pos * log_prob).sum(1) / pos.sum(1).clamp(min=1)
    return -(temperature / base) * mean_pos.mean()


def moco_v3_rank(q1, q2, k1, k2, temperature=1.0):
    """facebookresearch/moco-v3 builder.contrastive_loss: keys gathered without gradient."""
    def ce(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        k_all = gather_no_grad(k)
        labels = _offset(q.shape[0]) + torch.arange(q.shape[0])
        return F.cross_entropy(q @ k_all.T / temperature, labels) * (2 * temperature)
    return ce(q1, k2) + ce(q2, k1)


def barlow_twins_rank(z1, z2, lambd=0.0051, eps=1e-5, raw_all_reduce=False):
    """SyncBN statistics (from the gradient-carrying gather), local correlation / N_g, summed over
    ranks by a differentiable all_reduce, or, ``raw_all_reduce=True``, by an in-place
    torch.distributed.all_reduce with no backward as the official code."""
    def bn(z):
        z_all = gather_with_grad(z)
        return (z - z_all.mean(0)) / torch.sqrt(z_all.var(0, unbiased=False) + eps), z_all.shape[0]
    b1, n_g = bn(z1)
    b2, _ = bn(z2)
    c = b1.T @ b2 / n_g
    if raw_all_reduce:
        dist.all_reduce(c)
    else:
        c = dnn.all_reduce(c)
    on = torch.diagonal(c)
    off = c - torch.diag(on)
    return ((on - 1) ** 2).sum() + lambd * (off ** 2).sum()


def vicreg_rank(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, batch_size=None):
    """facebookresearch/vicreg VICReg.forward with FullGatherLayer."""
    repr_loss = F.mse_loss(x, y)
    x, y = gather_with_grad(x), gather_with_grad(y)
    bs = x.shape[0] if batch_size is None else batch_size
    d = x.shape[1]
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + eps), torch.sqrt(y.var(0) + eps)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    off = ~torch.eye(d, dtype=torch.bool)
    cov_x, cov_y = x.T @ x / (bs - 1), y.T @ y / (bs - 1)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


@torch.no_grad()
def dino_center_update(center, teacher, momentum=0.9):
    """DINOLoss.update_center: teacher (V_t n, K) local rows; all-reduced sum / (rows x world)."""
    s = teacher.sum(dim=0, keepdim=True)
    dist.all_reduce(s)
    return center * momentum + s / (teacher.shape[0] * dist.get_world_size()) * (1 - momentum)


# ------------------------------------------------------------------------------------------ worker
_LOSSES = {"info_nce": (info_nce_rank, ("z1", "z2")), "clip": (clip_rank, ("img", "txt")),
           "supcon": (supcon_rank, ("z", "labels")), "moco_v3": (moco_v3_rank, ("q1", "q2", "k1", "k2")),
           "barlow_twins": (barlow_twins_rank, ("z1", "z2")),
           "barlow_twins_raw": (barlow_twins_rank, ("z1", "z2")),
           "vicreg": (vicreg_rank, ("x", "y"))}
_NO_GRAD = {"labels", "k1", "k2"}


def _run(inputs: dict, rank: int, world: int) -> dict:
    out = {}
    for case in sorted({k.split("/")[0] for k in inputs}):
        hyper = json.loads(str(inputs[f"{case}/hyper"]))
        if case == "dino_center":
            teacher = torch.from_numpy(inputs["dino_center/teacher"])       # (V_t, N_g, K)
            local = teacher.chunk(world, dim=1)[rank].reshape(-1, teacher.shape[-1])
            out["dino_center/center"] = dino_center_update(
                torch.from_numpy(inputs["dino_center/center"]), local, **hyper).numpy()
            continue
        fn, names = _LOSSES[case]
        args = []
        for nm in names:
            t = torch.from_numpy(inputs[f"{case}/{nm}"]).chunk(world, dim=0)[rank].clone()
            args.append(t if nm in _NO_GRAD else t.requires_grad_(True))
        extra = {}
        if case == "clip":
            extra["logit_scale"] = torch.from_numpy(inputs["clip/logit_scale"]).clone().requires_grad_(True)
        if case == "barlow_twins_raw":
            hyper = dict(hyper, raw_all_reduce=True)
        loss = fn(*args, **extra, **hyper)
        loss.backward()
        out[f"{case}/loss"] = loss.detach().numpy()
        for nm, t in list(zip(names, args)) + list(extra.items()):
            if t.requires_grad:
                out[f"{case}/grad/{nm}"] = t.grad.numpy()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                            world_size=a.world, timeout=datetime.timedelta(seconds=a.timeout))
    try:
        with np.load(a.inputs) as f:
            inputs = {k: f[k] for k in f.files}
        np.savez(a.out, **_run(inputs, a.rank, a.world))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
