"""Cross-device negatives: 2 CPU processes (gloo) == 1 process on the doubled batch."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from hmcl_cli.losses import HMCLLoss, PairBatch
from hmcl_cli.recipe import LossConfig
from hmcl_cli.training.distributed import average_gradients, gather_plain, gather_sizes, gather_with_grad

CFG = LossConfig(contrastive_weight=1.0, classification_weight=0.3, ranking_weight=0.5, temperature=0.1)


def _data():
    g = torch.Generator().manual_seed(0)
    xq, xc = torch.randn(8, 6, generator=g), torch.randn(16, 6, generator=g)
    # anchor i owns candidates 2i (pos) and 2i+1 (weak for even i, neg for odd i)
    pa = torch.arange(8).repeat_interleave(2)
    pc = torch.arange(16)
    lvl = torch.tensor([2, 1, 2, 0] * 4)
    score = torch.tensor([4.5, 3.0, 5.0, 1.0] * 4)
    return xq, xc, pa, pc, lvl, score


def _loss(w, xq, xc, pa, pc, lvl, score, qh, ch, gather=False):
    q, c = F.normalize(xq @ w, dim=-1), F.normalize(xc @ w, dim=-1)
    if gather:
        rank = dist.get_rank()
        qs, cs, ps = gather_sizes(q.size(0), q.device), gather_sizes(c.size(0), c.device), gather_sizes(pa.size(0), pa.device)
        pa, pc = gather_plain(pa + sum(qs[:rank]), ps), gather_plain(pc + sum(cs[:rank]), ps)
        lvl, score, qh, ch = gather_plain(lvl, ps), gather_plain(score, ps), gather_plain(qh, qs), gather_plain(ch, cs)
        q, c = gather_with_grad(q, qs), gather_with_grad(c, cs)
    torch.manual_seed(0)
    loss_fn = HMCLLoss(CFG, dim=4)
    total, _ = loss_fn(PairBatch(q, c, pa, pc, lvl, score, qh, ch))
    return total


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    xq, xc, pa, pc, lvl, score = _data()
    w = torch.nn.Parameter(torch.linspace(-1, 1, 24).view(6, 4))
    sl_q, sl_c, sl_p = slice(4 * rank, 4 * rank + 4), slice(8 * rank, 8 * rank + 8), slice(8 * rank, 8 * rank + 8)
    loss = _loss(w, xq[sl_q], xc[sl_c], pa[sl_p] - 4 * rank, pc[sl_p] - 8 * rank, lvl[sl_p], score[sl_p],
                 torch.arange(8)[sl_q], torch.arange(100, 116)[sl_c], gather=True)
    loss.backward()
    average_gradients([w])
    out[rank] = (loss.detach(), w.grad.clone())
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_doubled_batch():
    xq, xc, pa, pc, lvl, score = _data()
    w = torch.nn.Parameter(torch.linspace(-1, 1, 24).view(6, 4))
    ref = _loss(w, xq, xc, pa, pc, lvl, score, torch.arange(8), torch.arange(100, 116))
    ref.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        loss, grad = out[rank]
        assert torch.allclose(loss, ref.detach(), atol=1e-6), rank
        assert torch.allclose(grad, w.grad, atol=1e-6), rank
