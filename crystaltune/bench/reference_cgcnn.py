"""A re-implementation of the reference CGCNN's *training path* as the throughput baseline.

Same algorithm as txie-93/cgcnn: per-crystal items (atom features (n, 92), Gaussian-expanded
neighbour features (n, 12, 41), neighbour indices (n, 12)) cached after the first access like its
``lru_cache``d dataset, a per-crystal Python collate (``collate_pool``), and dense convolutions that
concatenate ``[atom_i, atom_j, e_ij]`` for every (atom, neighbour) slot. Written here so the
benchmark compares algorithms on the same machine, data and threads.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..featurizers.node import node_table
from ..graphs.store import GraphStore


class RefConvLayer(nn.Module):
    def __init__(self, atom_fea_len: int, nbr_fea_len: int):
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, 2 * atom_fea_len)
        self.sigmoid, self.softplus1 = nn.Sigmoid(), nn.Softplus()
        self.bn1, self.bn2 = nn.BatchNorm1d(2 * atom_fea_len), nn.BatchNorm1d(atom_fea_len)
        self.softplus2 = nn.Softplus()

    def forward(self, atom_in_fea, nbr_fea, nbr_fea_idx):
        n, m = nbr_fea_idx.shape
        atom_nbr_fea = atom_in_fea[nbr_fea_idx, :]
        total = torch.cat([atom_in_fea.unsqueeze(1).expand(n, m, self.atom_fea_len), atom_nbr_fea, nbr_fea], dim=2)
        total = self.fc_full(total)
        total = self.bn1(total.view(-1, self.atom_fea_len * 2)).view(n, m, self.atom_fea_len * 2)
        filt, core = total.chunk(2, dim=2)
        summed = torch.sum(self.sigmoid(filt) * self.softplus1(core), dim=1)
        return self.softplus2(atom_in_fea + self.bn2(summed))


class RefCGCNN(nn.Module):
    def __init__(self, orig_atom_fea_len=92, nbr_fea_len=41, atom_fea_len=64, n_conv=3, h_fea_len=128):
        super().__init__()
        self.embedding = nn.Linear(orig_atom_fea_len, atom_fea_len)
        self.convs = nn.ModuleList(RefConvLayer(atom_fea_len, nbr_fea_len) for _ in range(n_conv))
        self.conv_to_fc = nn.Linear(atom_fea_len, h_fea_len)
        self.conv_to_fc_softplus = nn.Softplus()
        self.fc_out = nn.Linear(h_fea_len, 1)

    def forward(self, atom_fea, nbr_fea, nbr_fea_idx, crystal_atom_idx):
        atom_fea = self.embedding(atom_fea)
        for conv in self.convs:
            atom_fea = conv(atom_fea, nbr_fea, nbr_fea_idx)
        crys = torch.cat([torch.mean(atom_fea[idx], dim=0, keepdim=True) for idx in crystal_atom_idx], dim=0)
        crys = self.conv_to_fc_softplus(self.conv_to_fc(self.conv_to_fc_softplus(crys)))
        return self.fc_out(crys)


def reference_items(store: GraphStore, index: np.ndarray, target: str, m: int = 12):
    """Per-crystal tensors as the reference dataset's __getitem__ returns them."""
    table = torch.from_numpy(np.nan_to_num(node_table("cgcnn")))
    centres = torch.arange(0, 8.2, 0.2)
    items = []
    for g in index:
        gr = store.graph(int(g))
        n = len(gr["z"])
        dist = torch.from_numpy(gr["dist"].astype(np.float64)).view(n, m)
        nbr = torch.from_numpy(gr["src"].astype(np.int64)).view(n, m)
        fea = torch.exp(-((dist[..., None] - centres) ** 2) / 0.2**2).float()
        items.append((table[torch.from_numpy(gr["z"].astype(np.int64))], fea, nbr,
                      torch.tensor([float(store.props[target][g])])))
    return items


def collate_pool(items):
    """The reference collate: a Python loop over crystals, offsets added per crystal."""
    atoms, nbrs, idxs, crystal_atom_idx, targets = [], [], [], [], []
    base = 0
    for atom_fea, nbr_fea, nbr_idx, target in items:
        n = atom_fea.shape[0]
        atoms.append(atom_fea)
        nbrs.append(nbr_fea)
        idxs.append(nbr_idx + base)
        crystal_atom_idx.append(torch.LongTensor(np.arange(n) + base))
        targets.append(target)
        base += n
    return torch.cat(atoms), torch.cat(nbrs), torch.cat(idxs), crystal_atom_idx, torch.stack(targets)


def train_throughput(store: GraphStore, index: np.ndarray, target: str, epochs: int, batch_size: int,
                     atom_fea_len=64, h_fea_len=128, n_conv=3, seed: int = 0) -> list[float]:
    """graphs/s of each epoch (SGD, MSE, normalised targets, the reference's defaults)."""
    torch.manual_seed(seed)
    items = reference_items(store, index, target)
    y = torch.stack([it[3] for it in items])
    mean, std = y.mean(), y.std()
    model = RefCGCNN(atom_fea_len=atom_fea_len, n_conv=n_conv, h_fea_len=h_fea_len)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rates = []
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(items))
        t0 = time.perf_counter()
        model.train()
        seen = 0
        bs = min(batch_size, len(order))  # drop the last partial batch, as our loop does
        for s in range(0, len(order) - bs + 1, bs):
            atom, nbr, idx, cidx, tgt = collate_pool([items[i] for i in order[s:s + bs]])
            loss = nn.functional.mse_loss(model(atom, nbr, idx, cidx), (tgt - mean) / std)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += bs
        rates.append(seen / (time.perf_counter() - t0))
    return rates
