"""Whole networks as sets of neurons (issue #28): a flow-matching generator whose denoiser is equivariant to
permuting each hidden layer's units, and the REPAIR blend baseline; main() compares them on a --networks run.

    python pdiff.py collect --networks 200 --run /work/runs/seeds200
    python experiments/neurons.py --run /work/runs/seeds200            # fit, sample 50, judge, Markdown table
    QUICK=1 python experiments/neurons.py --run RUN                     # tiny settings: well under a minute

The network (a chain of Linear or Conv2d layers with ReLUs between, a Linear last: mlp3, convnet3) is read as a
graph, never as one vector (a unit: a Linear's output, or a convolution's channel):
    hidden unit of layer 1       a token: its incoming weights (one per input pixel, or its kernel) and bias
    hidden unit of the last      a token: its bias and its outgoing weights (one per class, fixed identities)
    hidden layer
    W between hidden layers      edges: a (units_l, units_l-1) matrix between two sets of tokens, each edge a
                                 number (Linear) or a kernel's numbers (Conv2d)
    output bias                  a global vector (the classes are not interchangeable)
The denoiser (NeuronDenoiser) works on these sets with no position encoding: self-attention within a layer,
edge <-> token messages between layers, mean pooling into a global token; so permuting a layer's units permutes
its output the same way (checked numerically in test_pdiff.py). It needs no alignment and every neuron of every
training network is a sample of the same token distribution. Generated networks come out in an arbitrary frame;
main() aligns them to the reference network (pdiff.align_to) before the verdict's distances, as `--judge` does.

What each part sees (pdiff's split, Run.split): the generator, its Probes and pick_guidance, and every baseline are
made from the training networks alone (Run.training); the held-out networks (Run.units: whole seeds, all their
snapshots; --holdout as `pdiff fit --holdout`) are only the reference each group is judged against, as `pdiff
sample` judges (pdiff.measure_group, pdiff.describe, pdiff.judge, pdiff.verdict). Nothing here selects or tunes on
data: pick_guidance and the output-bias calibration read no data; REPAIR reads 500 training images (the split the
networks trained on, without collect's validation rows); the test set only grades. (The diagnostic row of mode
layers completes the held-out networks' own hidden layer 1: a diagnostic, never the group under test.)

Measurements: experiments/neurons.md (every number, setting and time).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pdiff  # noqa: E402


def layer_pairs(layout: pdiff.Layout) -> list[tuple[str, str]]:
    """(weight, bias) names of the weight layers of a Sequential MLP layout, in order (the MLP-only view this
    experiment takes; pdiff.symmetry reads any network's units from its module graph)."""
    return [(w, b) for w, b in zip(layout.names[::2], layout.names[1::2])]


def permute(p: dict, pairs: list, perms: list) -> dict:
    """An MLP's parameter dict with hidden layer l's units reordered by perms[l] (unit i becomes old unit
    perms[l][i]): the same function."""
    p = dict(p)
    for (w, b), (w_next, _), perm in zip(pairs, pairs[1:], perms):
        p[w], p[b], p[w_next] = p[w][perm], p[b][perm], p[w_next][:, perm]
    return p


# ----------------------------------------------------------------------------------------------------
# a network vector (D,) <-> its graph: tokens per hidden layer, edges between hidden layers, a global vector


class Graph:
    """The parts of a chain of Linear or Conv2d layers. Layers l = 0..L-1 are layer_pairs(layout): W_l (n_l, n_{l-1},
    *kernel), b_l (n_l); layers 0..L-2 have hidden (permutable) units (a Linear unit, or a convolution's channel).
    Token of hidden layer l: [b_l, W_0's row (flattened) if l = 0, W_{L-1}'s column if l = L-2]; edges: W_l for
    1 <= l <= L-2, each a vector of kernel values (one for Linear); global: b_{L-1}. The output layer is a Linear
    that reads one number per last hidden unit (after global pooling, for convolutions).
    net, in_shape: the network and the shape of one input, for forward() on convolutions (an MLP's forward is
    its matrix products, read from the layout alone, on flat inputs)."""

    def __init__(self, layout: pdiff.Layout, net: nn.Module = None, in_shape: tuple = None):
        self.layout, self.pairs = layout, layer_pairs(layout)
        shapes = [dict(zip(layout.names, layout.shapes))[w] for w, _ in self.pairs]
        self.units = [s[0] for s in shapes]  # n_l
        if len(self.pairs) < 2 or len(layout.names) != 2 * len(self.pairs) or len(shapes[-1]) != 2 or \
                any(len(s) not in (2, 4) for s in shapes) or any(s[1] != n for s, n in zip(shapes[1:], self.units)):
            raise ValueError("NeuronGenerator needs a chain of Linear or Conv2d layers (weights and biases, at least "
                             "2 layers), each reading one number or map per unit of the layer before, a Linear last")
        self.conv = any(len(s) == 4 for s in shapes)
        self.net, self.in_shape = net, (shapes[0][1],) if not self.conv else in_shape and tuple(in_shape)
        self.n_in, self.L = math.prod(shapes[0][1:]), len(self.pairs)  # numbers in a layer-1 unit's row
        self.edge_dims = [math.prod(s[2:]) for s in shapes[1:-1]]  # numbers per edge: 1, or a kernel's
        H = self.L - 1  # hidden layers
        self.token_dims = [1 + (self.n_in if l == 0 else 0) + (self.units[-1] if l == H - 1 else 0) for l in range(H)]
        self.n_out = self.units[-1]

    def forward(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D) raw networks on inputs (N, *in_shape) -> logits (B, N, n_out): an MLP's matrix products, or the
        network itself under vmap (convolutions)."""
        if not self.conv:
            p, h = self.layout.unflatten(x), inputs
            for l, (w, b) in enumerate(self.pairs):
                h = h @ p[w].transpose(-1, -2) + p[b][..., None, :]
                h = h.relu() if l < len(self.pairs) - 1 else h
            return h
        if self.net is None:
            raise ValueError("a convolutional network's forward (the functional loss, probes) needs Graph(net=...)")
        call = lambda v: torch.func.functional_call(self.net, self.layout.unflatten(v), (inputs,))
        return torch.func.vmap(call)(x)

    def features(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D) raw networks on inputs (N, *in_shape) -> what their output layer reads (B, N, n_last): the last
        hidden layer's activations (pooled, for convolutions: the output Linear's input, caught by a hook)."""
        if not self.conv:
            p, h = self.layout.unflatten(x), inputs
            for w, b in self.pairs[:-1]:
                h = (h @ p[w].transpose(-1, -2) + p[b][..., None, :]).relu()
            return h
        last = self.net.get_submodule(self.pairs[-1][0].rpartition(".")[0])

        def call(v):
            seen = []
            hook = last.register_forward_hook(lambda m, i, o: seen.append(i[0]))
            try:
                torch.func.functional_call(self.net, self.layout.unflatten(v), (inputs,))
            finally:
                hook.remove()
            return seen[0].flatten(1)
        return torch.cat([torch.func.vmap(call)(c) for c in x.split(8)])

    def split(self, x: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """(B, D) -> (tokens [(B, n_l, f_l)], edges [(B, n_l, n_{l-1}, k_l)], global (B, n_out))."""
        p, H = self.layout.unflatten(x), self.L - 1
        tokens = []
        for l in range(H):
            w, b = self.pairs[l]
            parts = [p[b][..., None]]
            if l == 0:
                parts.append(p[w].flatten(2))
            if l == H - 1:
                parts.append(p[self.pairs[-1][0]].transpose(-1, -2))  # (B, n_l, n_out): outgoing weights
            tokens.append(torch.cat(parts, -1))
        edges = [p[self.pairs[l][0]].flatten(3) if p[self.pairs[l][0]].dim() > 3 else p[self.pairs[l][0]][..., None]
                 for l in range(1, H)]
        return tokens, edges, p[self.pairs[-1][1]]

    def join(self, tokens: list, edges: list, glob: torch.Tensor) -> torch.Tensor:
        """split's inverse -> (B, D)."""
        H, p, shapes = self.L - 1, {}, dict(zip(self.layout.names, self.layout.shapes))
        for l in range(H):
            w, b = self.pairs[l]
            t, i = tokens[l], 1
            p[b] = t[..., 0]
            if l == 0:
                p[w], i = t[..., 1:1 + self.n_in].unflatten(-1, shapes[w][1:]), 1 + self.n_in
            if l == H - 1:
                p[self.pairs[-1][0]] = t[..., i:].transpose(-1, -2)
        for l in range(1, H):
            w = self.pairs[l][0]
            p[w] = edges[l - 1].unflatten(-1, shapes[w][2:]) if len(shapes[w]) > 2 else edges[l - 1][..., 0]
        p[self.pairs[-1][1]] = glob
        return self.layout.pack(p, batch=1)

    def rescale(self, x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
        """(B, D) with each hidden unit's incoming weights and bias times a factor exp(sigma N(0, 1)) of its own and
        its outgoing weights divided by it: the same function (ReLU is positively homogeneous)."""
        p = dict(self.layout.unflatten(x))
        for (w, b), (w_next, _) in zip(self.pairs, self.pairs[1:]):
            s = torch.exp(sigma * torch.randn(p[b].shape, generator=g))  # (B, n_l)
            p[w], p[b] = p[w] * s.view(*s.shape, *[1] * (p[w].dim() - 2)), p[b] * s
            p[w_next] = p[w_next] / s.view(len(s), 1, -1, *[1] * (p[w_next].dim() - 3))
        return self.layout.pack(p, batch=1)

    def permute(self, x: torch.Tensor, perms: list) -> torch.Tensor:
        """(B, D) with hidden layer l's units reordered by perms[l] (the same function): pdiff.permute per row."""
        return torch.stack([self.layout.pack(permute(self.layout.unflatten(v), self.pairs, perms)) for v in x])


# ----------------------------------------------------------------------------------------------------
# the denoiser: equivariant to permuting each hidden layer's units


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:  # (B,) in [0, 1] -> (B, dim)
    return pdiff.timestep_embedding(t * 1000, dim)


class Mlp(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class Block(nn.Module):
    """One round of messages: edges read their two end units and the global token; units read the mean of their
    incoming and outgoing edges, attend to the other units of their layer, and read the global token; the global
    token reads the mean of every layer's units. Every reduction over units is a mean or attention without
    positions: permuting a layer's units permutes the outputs alike."""

    def __init__(self, H: int, C: int, Ce: int, heads: int, products: bool = True):
        super().__init__()
        self.H = H
        self.edge_to = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))  # the unit an edge enters
        self.edge_from = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))  # the unit it leaves
        self.edge_mlp = nn.ModuleList(Mlp(Ce, 2 * Ce, Ce) for _ in range(H - 1))
        self.edge_norm = nn.ModuleList(nn.LayerNorm(Ce) for _ in range(H - 1))
        self.edge_g = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))
        # per hidden layer: messages from the edges to it (incoming) and from it (outgoing), as sums of 2 Ce
        self.msg = nn.ModuleList(nn.Linear(6 * Ce, C) for _ in range(H))
        # products: an edge reads its two units multiplicatively (a bilinear form, as W_l[j, i] relates unit j's
        # role to unit i's), and a unit reads its edges weighted by the features of the units at their other ends
        self.products = products
        self.edge_p = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))
        self.edge_q = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))
        self.val_up = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))  # features of the unit above
        self.val_down = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))  # features of the unit below
        self.attn = nn.ModuleList(nn.MultiheadAttention(C, heads, batch_first=True) for _ in range(H))
        self.norm1 = nn.ModuleList(nn.LayerNorm(C) for _ in range(H))
        self.norm2 = nn.ModuleList(nn.LayerNorm(C) for _ in range(H))
        self.mlp = nn.ModuleList(Mlp(2 * C, 2 * C, C) for _ in range(H))
        self.glob = Mlp((H + 1) * C, 2 * C, C)
        self.Ce = Ce

    def forward(self, h: list, e: list, g: torch.Tensor):  # h [(B, n_l, C)], e [(B, n_l, n_{l-1}, Ce)], g (B, C)
        H, Ce = len(h), self.Ce  # the layers present: the first len(h) (mode layers: those up to the one made)
        e_new = []
        for k in range(H - 1):  # edge between hidden layers k+1 (rows) and k (columns)
            to, fr = self.edge_to[k](h[k + 1]), self.edge_from[k](h[k])  # (B, n_{k+1}, Ce), (B, n_k, Ce)
            x = e[k] + to[:, :, None] + fr[:, None, :] + self.edge_g[k](g)[:, None, None]
            if self.products:
                x = x + self.edge_p[k](h[k + 1])[:, :, None] * self.edge_q[k](h[k])[:, None, :]
            e_new.append(e[k] + self.edge_mlp[k](self.edge_norm[k](x)))
        e = e_new
        out = []
        for l in range(H):
            B, n, C = h[l].shape
            inc = e[l - 1].mean(2) if l > 0 else h[l].new_zeros(B, n, Ce)  # (B, n_l, Ce): over the units below
            og = e[l].mean(1) if l < H - 1 else h[l].new_zeros(B, n, Ce)  # over the units above
            inc2 = e[l - 1].square().mean(2) if l > 0 else h[l].new_zeros(B, n, Ce)
            og2 = e[l].square().mean(1) if l < H - 1 else h[l].new_zeros(B, n, Ce)
            zero = h[l].new_zeros(B, n, Ce)
            inc_w = torch.einsum("bijc,bjc->bic", e[l - 1], self.val_down[l - 1](h[l - 1])) / h[l - 1].shape[1] \
                if l > 0 and self.products else zero  # sum over the units below, by edge and by their features
            og_w = torch.einsum("bjic,bjc->bic", e[l], self.val_up[l](h[l + 1])) / h[l + 1].shape[1] \
                if l < H - 1 and self.products else zero
            x = h[l] + self.msg[l](torch.cat([inc, og, inc2, og2, inc_w, og_w], -1))
            y = self.norm1[l](x)
            x = x + self.attn[l](y, y, y, need_weights=False)[0]
            x = x + self.mlp[l](torch.cat([self.norm2[l](x), g[:, None].expand(B, n, C)], -1))
            out.append(x)
        pooled = [x.mean(1) for x in out] + [g.new_zeros(g.shape)] * (self.H - H)  # absent layers: zeros
        g = g + self.glob(torch.cat([g] + pooled, -1))
        return out, e, g


class NeuronDenoiser(nn.Module):
    """Velocity of the flow for a batch of noisy networks in graph form, at times t (B,)."""

    def __init__(self, graph: Graph, *, width: int = 96, edge_width: int = 32, depth: int = 4, heads: int = 4,
                 products: bool = True):
        super().__init__()
        H, C, Ce = graph.L - 1, width, edge_width
        self.H, self.C = H, C
        self.tok_in = nn.ModuleList(nn.Linear(f, C) for f in graph.token_dims)
        self.tok_out = nn.ModuleList(nn.Sequential(nn.LayerNorm(C), nn.Linear(C, f)) for f in graph.token_dims)
        self.edge_in = nn.ModuleList(nn.Linear(k, Ce) for k in graph.edge_dims)
        self.edge_out = nn.ModuleList(nn.Sequential(nn.LayerNorm(Ce), nn.Linear(Ce, k)) for k in graph.edge_dims)
        self.glob_in = nn.Linear(graph.n_out, C)
        self.glob_out = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, graph.n_out))
        self.temb = Mlp(64, C, C)
        self.time_mix = nn.Linear(H * C, C)
        self.edge_t = nn.ModuleList(nn.Linear(C, Ce) for _ in range(H - 1))
        self.blocks = nn.ModuleList(Block(H, C, Ce, heads, products) for _ in range(depth))
        for head in [*self.tok_out, *self.edge_out, self.glob_out]:  # start at zero velocity
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, tokens: list, edges: list, glob, t: torch.Tensor):
        """The groups present: hidden layer l's units, the edges into them, and with the last hidden layer the
        output bias; the first P of the H (mode layers builds layer P - 1 given those before it; glob None unless
        P = H). t: (B,) one time for all, or (B, P) one per group: a clean group (t = 0) conditions the others."""
        B, P = tokens[0].shape[0], len(tokens)
        t = t[:, None].expand(B, P) if t.dim() == 1 else t
        tt = [self.temb(time_embedding(t[:, l], 64)) for l in range(P)]  # (B, C) each
        g = self.time_mix(torch.cat(tt + [tt[0].new_zeros(B, self.C)] * (self.H - P), -1))  # (B, C)
        g = g + self.glob_in(glob) if glob is not None else g
        h = [f(x) + g[:, None] + tt[l][:, None] for l, (f, x) in enumerate(zip(self.tok_in, tokens))]
        e = [f(x) + te(tt[k + 1])[:, None, None] for k, (f, te, x) in
             enumerate(zip(self.edge_in, self.edge_t, edges))]
        for block in self.blocks:
            h, e, g = block(h, e, g)
        return ([f(x) for f, x in zip(self.tok_out, h)], [f(x) for f, x in zip(self.edge_out, e)],
                self.glob_out(g) if glob is not None else None)


# ----------------------------------------------------------------------------------------------------
# the generator


class Saved:
    """A generator kept as its settings, its averaged denoiser and its standardisation (torch.save-able)."""

    def state_dict(self) -> dict:
        return {"settings": dict(self.settings), "net": self.ema.state_dict(), "stats": self.stats}

    def load_state_dict(self, state: dict):
        self.ema.load_state_dict(state["net"])
        self.net.load_state_dict(state["net"])
        self.stats = state["stats"]


class NeuronGenerator(Saved):
    """Flow matching (x_t = (1 - t) x_0 + t eps, velocity eps - x_0) on networks in graph form, standardised per
    part: each token feature centred and scaled by its spread over all units of all training networks, edges and
    the global vector likewise (statistics that no permutation changes). fit() sees only the training networks'
    parameters: no data, no alignment (the denoiser is equivariant; aligned or not, it learns the same thing)."""

    DEFAULTS = dict(width=96, edge_width=32, depth=4, heads=4, steps=3000, batch=32, lr=1e-3, ema=0.999,
                    sample_steps=100, mode="joint", products=True, drop=0.0, guidance=0.0, cond_noise=0.0,
                    auto_guidance=False, first_batch=0, calibrate="", exposure_steps=0, exposure_share=0.5,
                    exposure_t=0.5, exposure_target="params", exposure_layers=1, func=0.0, eta=0.0, temperature=1.0,
                    auto_temperature=False, autoguidance=0.0, learn="all", rescale=0.0, func_from=0, seed=0)

    def __init__(self, layout: pdiff.Layout, *, width: int = 96, edge_width: int = 32, depth: int = 4,
                 heads: int = 4, steps: int = 3000, batch: int = 32, lr: float = 1e-3, ema: float = 0.999,
                 sample_steps: int = 100, mode: str = "joint", products: bool = True, drop: float = 0.0,
                 guidance: float = 0.0, cond_noise: float = 0.0, auto_guidance: bool = False, first_batch: int = 0,
                 calibrate: str = "", exposure_steps: int = 0, exposure_share: float = 0.5, exposure_t: float = 0.5,
                 exposure_target: str = "params", exposure_layers: int = 1, func: float = 0.0, eta: float = 0.0,
                 temperature: float = 1.0,
                 auto_temperature: bool = False, autoguidance: float = 0.0, learn: str = "all",
                 rescale: float = 0.0, func_from: int = 0, seed: int = 0, net: nn.Module = None,
                 in_shape: tuple = None):
        """mode: joint (every layer denoised at once) or layers (hidden layer 1, then layer 2 given layer 1, ...:
        each group learnt with the groups before it clean). drop (layers): the share of training cases in which
        the layers before are pure noise instead, so that sample() can guide each layer toward the ones before it
        (classifier-free guidance, weight `guidance`: v = (1 + w) v(given them) - w v(not)). cond_noise (layers):
        the layers before are learnt from at noise levels up to this (t in [0, cond_noise]) and sample() shows
        them at cond_noise / 2, so a layer is made for what the earlier ones are, not for their last details
        (conditioning augmentation, Ho et al. 2021, "Cascaded Diffusion Models"). auto_guidance: fit() ends by
        choosing `guidance` with pick_guidance (from the training networks only). first_batch (layers): this many
        more networks per step learn hidden layer 1 alone (its tokens only: cheap). calibrate: "" or "bias": sample()
        ends by setting each network's output bias so that its mean prediction on probe inputs equals the training
        networks' (Probes: inputs synthesised from the training networks alone, no data); "readout": by refitting
        each network's output layer (weights and bias) to the training networks' mean prediction on each probe
        input (Probes.readout: a fitted part, from no data; the blends are given the same fitting).
        exposure_steps (layers): after fit, this many more steps in which a share `exposure_share` of the networks
        learning a later layer see, instead of their own hidden layer 1, that layer re-made by the model (noised to t0
        ~ U[0.2 t, t], t = exposure_t, and denoised by its layer-1 stage: SDEdit), so that the later layers are learnt
        for first layers like the generator's own (exposure_target params: the targets stay the network's own later
        layers; function: those networks learn through the functional loss alone, toward the network's own function,
        so that the later layers are made to compute, with the re-made first layer, what the network computes, not to
        copy layers that fit another first layer). exposure_layers: how many hidden layers the re-made networks
        bring (1: hidden layer 1, as above; more: layers 1..k re-made one after another by sample()'s SDEdit, t0 in
        {0.2, 0.47, 0.73, 1} x exposure_t, and a network learning layer s sees the re-made layers before it), so that
        the last stage (the last hidden layer with the output layer) is learnt for hidden layers like the
        generator's own. func: the weight of
        a functional loss beside the velocity's: the network with the group being learnt replaced by its predicted
        clean value (x_0 = x_t - t v) against the network itself, as logits on 256 of the probe inputs (Probes:
        synthesised from the training networks, no data), squared error over the logits' variance, weighted by
        (1 - t) so that it counts where the prediction can be sharp; networks whose earlier layers were dropped
        (guidance) are left out of it. eta: the sampler's stochasticity (0: Euler steps of the ODE; 1: ancestral
        steps, each re-drawing the share of noise that DDPM's posterior would, as DDIM's eta).
        temperature: the scale of the noise hidden layer 1 starts from (1: the flow's own; flows that fit imperfectly
        make their samples too alike, a temperature above 1 spreads them; the noise a stochastic step re-draws for
        it is scaled alike). auto_temperature (mode layers): fit() ends by choosing it with pick_temperature (from
        the training networks only). autoguidance: hidden layer 1 (made first, unconditioned: classifier-free guidance
        has nothing to guide it with) guided by a worse model of itself (guide_with: the same networks, fitted
        shorter), v = (1 + w) v - w v(worse) (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
        Itself", arXiv 2406.02507): where the worse model errs, the good one errs alike and more mildly, and the
        difference points toward the data. learn (mode layers): all, or first: fit() learns hidden layer 1 alone,
        every step (a first-layer model: its whole compute on the 32 tokens of 65 numbers that a shared model gives
        a third of its steps to), or later: the layers after it alone (given the training networks' own layer 1);
        first_from joins a first-layer model to a model of the later layers. rescale: each step's networks are
        drawn anew under the ReLU's scale symmetry (Graph.rescale, log-factors of spread `rescale`): the same
        functions, so that a later layer is learnt for many more first layers than the training networks have
        (the first layer's own distribution widens with it: Neurons' first-layer model keeps 0).
        func_from (mode layers): the first group the functional loss applies to (0: every one; 1: the layers after
        hidden layer 1, whose size it inflates on convolutions, E39).
        net, in_shape: the network and one input's shape, which a convolutional network's forward needs (Graph)."""
        if exposure_target not in ("params", "function") or (exposure_target == "function" and not func):
            raise ValueError("exposure_target: params, or function (with func > 0)")
        if exposure_layers < 1:
            raise ValueError("exposure_layers: at least 1 (how many hidden layers the exposure steps re-make)")
        if learn not in ("all", "first", "later") or (learn != "all" and mode != "layers"):
            raise ValueError("learn: all, or first / later (with mode layers)")
        if mode not in ("joint", "layers"):
            raise ValueError(f"mode: joint or layers, not {mode}")
        self.graph = Graph(layout, net, in_shape)
        self.settings = dict(width=width, edge_width=edge_width, depth=depth, heads=heads, steps=steps, batch=batch,
                             lr=lr, ema=ema, sample_steps=sample_steps, mode=mode, products=products, drop=drop,
                             guidance=guidance, cond_noise=cond_noise, auto_guidance=auto_guidance,
                             first_batch=first_batch, calibrate=calibrate, exposure_steps=exposure_steps,
                             exposure_share=exposure_share, exposure_t=exposure_t,
                             exposure_target=exposure_target, exposure_layers=exposure_layers, func=func, eta=eta,
                             temperature=temperature, auto_temperature=auto_temperature,
                             autoguidance=autoguidance, learn=learn, rescale=rescale, func_from=func_from, seed=seed)
        torch.manual_seed(seed)
        self.net = NeuronDenoiser(self.graph, width=width, edge_width=edge_width, depth=depth, heads=heads,
                                  products=products)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.stats = None  # per part: (mean, std)
        self.worse = None  # the averaged denoiser of a worse model of the same networks (autoguidance)
        self.first = None  # the averaged denoiser of a first-layer model of the same networks (first_from)

    def guide_with(self, worse: "NeuronGenerator") -> "NeuronGenerator":
        """worse: a generator of the same layout fitted on the same networks (the same standardisation), worse
        (shorter or smaller): hidden layer 1 is guided away from its errors (autoguidance, see __init__)."""
        self._same(worse, "autoguidance needs a worse model")
        self.worse = worse.ema
        return self

    def first_from(self, first: "NeuronGenerator") -> "NeuronGenerator":
        """first: a generator of the same networks (fitted with learn first: hidden layer 1 alone) that makes hidden
        layer 1 in sample(); this model makes the later layers for it (autoguidance, when set, guides the first)."""
        self._same(first, "a first-layer model must be")
        self.first = first.ema
        return self

    @property
    def layer1(self) -> nn.Module:  # the denoiser that makes hidden layer 1
        return self.ema if self.first is None else self.first

    def _same(self, other: "NeuronGenerator", what: str):
        if not all(torch.equal(a[0], b[0]) for a, b in zip(self.stats["tokens"], other.stats["tokens"])):
            raise ValueError(f"{what} of the same networks (their standardisation differs)")

    # standardisation, invariant to permutations: token features over (networks, units), edges and global scalars
    def set_stats(self, x: torch.Tensor):
        tokens, edges, glob = self.graph.split(x)
        tok = [(t.mean((0, 1)), t.std((0, 1)).clamp_min(1e-3 * t.std().item() + 1e-12)) for t in tokens]
        edg = [(e.mean((0, 1, 2)), e.std((0, 1, 2))) for e in edges]  # per kernel position
        self.stats = {"tokens": tok, "edges": edg, "glob": (glob.mean(0), glob.std(0).clamp_min(1e-6))}

    def per_part(self, v: torch.Tensor) -> tuple:
        """(B, H) values per group -> the parts' shape (tokens, edges, glob), each (B, 1, ...) to broadcast."""
        H = self.graph.L - 1
        return ([v[:, l, None, None] for l in range(H)], [v[:, k + 1, None, None, None] for k in range(H - 1)],
                v[:, H - 1, None])

    def encode(self, x: torch.Tensor) -> tuple:  # (B, D) raw -> standardised parts
        tokens, edges, glob = self.graph.split(x)
        s = self.stats
        return ([(t - m) / sd for t, (m, sd) in zip(tokens, s["tokens"])],
                [(e - m) / sd for e, (m, sd) in zip(edges, s["edges"])], (glob - s["glob"][0]) / s["glob"][1])

    def decode(self, tokens, edges, glob) -> torch.Tensor:  # standardised parts -> (B, D) raw
        s = self.stats
        return self.graph.join([t * sd + m for t, (m, sd) in zip(tokens, s["tokens"])],
                               [e * sd + m for e, (m, sd) in zip(edges, s["edges"])],
                               glob * s["glob"][1] + s["glob"][0])

    def fit(self, originals: torch.Tensor, progress=None, checkpoint: Path = None) -> "NeuronGenerator":
        """originals (K, D): the training networks' raw parameters. progress(step, loss) is called now and then.
        checkpoint: a file the training writes now and then and resumes from (see _train)."""
        cfg = self.settings
        self.set_stats(originals)
        if cfg["calibrate"] or cfg["func"]:
            self.stats["probes"] = Probes(self.graph, seed=cfg["seed"]).fit(originals).state()
        self._train(originals, cfg["steps"], cfg["lr"], cfg["seed"], progress, checkpoint=checkpoint)
        if cfg["exposure_steps"] and cfg["mode"] == "layers":
            self.exposure(originals, progress)
        if cfg["auto_temperature"]:
            self.settings["temperature"] = self.pick_temperature(originals)
        if cfg["auto_guidance"]:
            self.settings["guidance"] = self.pick_guidance(originals)
        return self

    def exposure(self, originals: torch.Tensor, progress=None):
        """The exposure_steps more steps (see __init__), from the averaged (EMA) model, at a third of the rate."""
        cfg = self.settings
        g = torch.Generator().manual_seed(cfg["seed"] + 17)
        if cfg["exposure_layers"] == 1:
            pool = torch.stack([self.renoise_first(originals, cfg["exposure_t"] * (0.2 + 0.8 * torch.rand(
                len(originals), generator=g)), g) for _ in range(4)], 1)  # (K, 4, D): 4 re-made first layers each
        else:  # the first exposure_layers hidden layers re-made, from 4 noise levels
            pool = torch.stack([self.sample(len(originals), g, given=originals, stop=cfg["exposure_layers"],
                                            t0=cfg["exposure_t"] * f, steps=50, calibrate=False)
                                for f in (0.2, 0.47, 0.73, 1.0)], 1)
        self.net.load_state_dict(self.ema.state_dict())
        self._train(originals, cfg["exposure_steps"], cfg["lr"] / 3, cfg["seed"] + 1, progress, pool=pool,
                    share=cfg["exposure_share"])

    @torch.no_grad()
    def renoise_first(self, x: torch.Tensor, t0: torch.Tensor, g: torch.Generator, steps: int = 50) -> torch.Tensor:
        """x (B, D) raw with hidden layer 1 noised to t0 (B,) and denoised by the model's layer-1 stage (SDEdit;
        a first-layer model's where one is joined: first_from), the other layers kept."""
        H = self.graph.L - 1
        parts = self.encode(x)
        y = _first(parts, 1, H)
        y = _map2(lambda a, n: _mix(a, n, t0.view(-1, *[1] * (a.dim() - 1))), y, _like(y, g))
        for i in range(steps):  # each network from its own t0 down to 0 in `steps` Euler steps
            t, dt = t0 * (1 - i / steps), t0 / steps
            v = self.layer1(*y, t[:, None])
            y = _map2(lambda a, u: a - dt.view(-1, *[1] * (a.dim() - 1)) * u, y, v)
        return self.decode(*_put(parts, y, 1, H))

    def _train(self, originals, steps: int, lr: float, seed: int, progress=None, pool=None, share: float = 0.0,
               checkpoint: Path = None, every: int = 250):
        """pool (K, C, D): other versions of each network's hidden layer 1 (exposure); with probability `share`
        a network learning a later layer sees one of them in place of its own. checkpoint: every `every` steps the
        training's whole state (models, optimiser, schedule, random stream) goes to this file; a file there from
        the same settings and networks is resumed from, and the result is the uninterrupted run's."""
        cfg = self.settings
        x0 = self.encode(originals)
        K = len(originals)
        if pool is not None:  # (K, C, ...) parts
            pool = _map(lambda a: a.unflatten(0, pool.shape[:2]), self.encode(pool.flatten(0, 1)))
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        warm, total = max(1, steps // 20), steps  # linear warm-up, then cosine to 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
            math.pi * min(1.0, s / total)))))
        H = self.graph.L - 1
        logits = None  # the training networks' logits on every probe input, the functional loss's targets: a
        if cfg["func"] and pool is None:  # network's own function (no exposure swap), computed once
            pr = Probes.load(self.graph, self.stats["probes"])
            with torch.no_grad():
                logits = torch.cat([pr.forward(c, pr.x) for c in originals.split(8)])
        start, key = 0, {"settings": dict(self.settings), "steps": steps,
                      "originals": hashlib.sha1(originals.contiguous().numpy().tobytes()).hexdigest()}
        if checkpoint and Path(checkpoint).exists():
            saved = torch.load(checkpoint, weights_only=False)
            saved["key"]["settings"] = {**self.DEFAULTS, **saved["key"]["settings"]}  # (settings added since)
            if saved["key"] != key:
                raise ValueError(f"{checkpoint} is another fit's checkpoint (other settings or networks)")
            for m, k in ((self.net, "net"), (self.ema, "ema"), (opt, "opt"), (sched, "sched")):
                m.load_state_dict(saved[k])
            g.set_state(saved["g"])
            start = saved["step"] + 1
        for step in range(start, steps):
            if checkpoint and step > start and step % every == 0:
                state = {"key": key, "step": step - 1, "g": g.get_state(), "net": self.net.state_dict(),
                         "ema": self.ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
                torch.save(state, f"{checkpoint}.tmp")
                os.replace(f"{checkpoint}.tmp", checkpoint)  # never a half-written checkpoint
            idx = torch.randint(0, K, (cfg["batch"],), generator=g)
            B = cfg["batch"]
            t = torch.rand(B, generator=g)[:, None].expand(B, H).clone()  # (B, H): joint, one time for all
            stage = torch.full((B,), H - 1)  # the last group a network's loss counts: all of them (joint)
            if cfg["mode"] == "layers":  # one group learnt, those before it clean, those after it absent
                stage = torch.randint(int(cfg["learn"] == "later"), 1 if cfg["learn"] == "first" else H, (B,),
                                      generator=g)
                ids = torch.arange(H)[None]
                before = torch.zeros(B, 1) if not cfg["cond_noise"] else \
                    cfg["cond_noise"] * torch.rand(B, 1, generator=g)  # conditioning augmentation (cascades)
                if cfg["drop"]:  # dropped: the layers before it unseen, for guidance (classifier-free)
                    before = torch.where(torch.rand(B, 1, generator=g) < cfg["drop"], 1.0, before)
                t = torch.where(ids < stage[:, None], before, t)
            weight = (torch.arange(H)[None] == stage[:, None]).float() if cfg["mode"] == "layers" else torch.ones(B, H)
            parts0 = own = _index(x0, idx) if not cfg["rescale"] else \
                self.encode(self.graph.rescale(originals[idx], cfg["rescale"], g))
            if pool is not None:  # exposure: the first layer as the model re-makes it, for later layers' learning
                swap = (stage > 0) & (torch.rand(B, generator=g) < share)
                c = torch.randint(0, pool[0][0].shape[1], (B,), generator=g)
                alt, k = _map(lambda a: a[idx, c], pool), cfg["exposure_layers"]
                now = lambda l, a: (swap & (l < stage) & (l < k)).view(-1, *[1] * (a.dim() - 1))
                parts0 = ([torch.where(now(l, a), a, o) for l, (a, o) in enumerate(zip(alt[0], parts0[0]))],
                          [torch.where(now(l + 1, a), a, o) for l, (a, o) in enumerate(zip(alt[1], parts0[1]))],
                          parts0[2])
                if cfg["exposure_target"] == "function":  # their velocity's targets fit another first layer
                    weight = weight * (~swap).float()[:, None]
            eps = _like(parts0, g)
            xt = _map3(lambda a, n, tt: _mix(a, n, tt), parts0, eps, self.per_part(t))
            target = _map2(lambda a, n: n - a, parts0, eps)
            se, count, fl = 0.0, 0.0, 0.0
            for s in stage.unique().tolist():  # the networks learning group s: groups after it are left out
                rows, P = (stage == s).nonzero()[:, 0], s + 1
                pick = lambda parts: _first(_index(parts, rows), P, H)
                pred = self.net(*pick(xt), t[rows, :P])
                a, b = _se(pred, pick(target), _first(self.per_part(weight[rows]), P, H))
                se, count = se + a, count + b
                if cfg["func"] and s >= cfg["func_from"]:
                    want = logits[idx] if logits is not None else own if cfg[
                        "exposure_target"] == "function" else parts0
                    fl = fl + self.functional(parts0, xt, pred, t, rows, s, g, want=want) * len(rows) / B
            if cfg["mode"] == "layers" and cfg["first_batch"]:  # more networks for hidden layer 1 alone (cheap:
                rows = torch.randint(0, K, (cfg["first_batch"],), generator=g)  # its tokens only)
                t1 = torch.rand(len(rows), 1, generator=g)
                p0 = _first(_index(x0, rows), 1, H)
                e0 = _like(p0, g)
                pred = self.net(*_map2(lambda a, n: _mix(a, n, t1[:, :, None]), p0, e0), t1)
                a, b = _se(pred, _map2(lambda a, n: n - a, p0, e0), _map(lambda a: torch.ones(()), p0))
                se, count = se + a, count + b
            loss = se / count + cfg["func"] * fl
            _update(self.net, self.ema, opt, sched, loss, step, cfg["ema"])
            if progress and (step % 100 == 0 or step == steps - 1):
                progress(step, loss.item())

    def functional(self, parts0, xt, pred, t, rows, s: int, g: torch.Generator, want=None) -> torch.Tensor:
        """The functional loss (see __init__, func) of the networks `rows` learning group s (joint: s = H - 1 and
        every group predicted): their logits on probe inputs with group s (joint: all) from the predicted x_0,
        against the networks `want` (default parts0: the networks themselves; or a tensor (B, every probe input,
        n_out): their logits)."""
        H, P = self.graph.L - 1, s + 1
        joint = self.settings["mode"] == "joint"
        x0_hat = _map3(lambda a, v, tt: a - tt * v, _first(_index(xt, rows), P, H), pred,
                       _first(self.per_part(t[rows]), P, H))
        true = _index(parts0, rows)
        tok, edg = list(true[0]), list(true[1])
        for l in range(0 if joint else s, P):
            tok[l] = x0_hat[0][l]
            if l >= 1:
                edg[l - 1] = x0_hat[1][l - 1]
        glob = x0_hat[2] if P == H else true[2]
        pr = Probes.load(self.graph, self.stats["probes"])
        pick = torch.randint(0, len(pr.x), (256,), generator=g)
        got = pr.forward(self.decode(tok, edg, glob), pr.x[pick])
        want = want[rows][:, pick] if torch.is_tensor(want) else \
            pr.forward(self.decode(*_index(parts0 if want is None else want, rows)), pr.x[pick])
        seen = (t[rows, :s] < 1).all(1).float() if s else torch.ones(len(rows))  # earlier layers not dropped
        err = (got - want).square().mean((1, 2)) / want.var((1, 2)).clamp_min(1e-8)
        return ((1 - t[rows, s]) * seen * err).mean()

    def step(self, y: torch.Tensor, v: torch.Tensor, t: float, t2: float, g: torch.Generator,
             scale: float = 1.0) -> torch.Tensor:
        """One reverse step of the flow from time t to t2 < t for y with velocity v: Euler (eta 0), or DDIM's
        stochastic step in the flow's terms (alpha = 1 - t, sigma = t): x_0 and the noise as v predicts them, the
        noise partly re-drawn (eta 1: the share DDPM's posterior re-draws), the new noise times `scale`."""
        eta = self.settings["eta"]
        if not eta or t2 <= 0:
            return y + (t2 - t) * v
        x0, eps = y - t * v, y + (1 - t) * v
        s = eta * t2 * max(0.0, 1 - ((1 - t) * t2 / ((1 - t2) * t)) ** 2) ** 0.5
        return (1 - t2) * x0 + (t2 ** 2 - s ** 2) ** 0.5 * eps + s * scale * torch.randn(y.shape, generator=g)

    # what pick_temperature picks from (below 1 for a first layer already too wide, as autoguidance makes it)
    TEMPERATURES = (0.8, 0.85, 0.9, 0.94, 0.96, 0.98, 1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.15)

    def spread(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """(B, D) raw -> (B,) the squared distance of each network's hidden layer 1 to mean's (D,), its units matched
        to mean's one to one (linear assignment: any frame), each part scaled by the training networks' spread."""
        from scipy.optimize import linear_sum_assignment  # scikit-learn's scipy

        a, b = self.encode(x)[0][0], self.encode(mean[None])[0][0]  # hidden layer 1's tokens
        cost = torch.cdist(a, b.expand(len(a), -1, -1)).square()  # (B, n_1, n_1)
        return torch.stack([c[linear_sum_assignment(c.numpy())].sum() for c in cost])

    @torch.no_grad()
    def pick_temperature(self, originals: torch.Tensor, n: int = 64, steps: int = None, whole=None) -> float:
        """The temperature whose hidden layers 1 lie as far from the training networks' mean layer 1 as the training
        networks' own (each against the mean of the others; units matched one to one, so any frame; no held-out
        network, no data): the median spread (see spread) compared, the closest on TEMPERATURES. This is the
        statistic the verdict's blend test reads for that layer, matched on the training networks: what it buys is
        spread, and accuracy at that spread is what the verdict then tells. whole = (measure, target): the same
        for whole networks instead (n // 2 of them, finished and calibrated): measure(x (B, D) raw) -> (B,) their
        distances to the training networks' mean in the caller's frame, target the distance an independent network
        has (autoguidance spreads the later layers too, which layer 1's statistic does not see)."""
        K, total, kept = len(originals), originals.sum(0), self.settings["temperature"]
        if whole is None:
            target = torch.stack([self.spread(x[None], (total - x) / (K - 1)) for x in originals]).median()
            measure = lambda x: self.spread(x, total / K)
        else:
            (measure, target), n = whole, n // 2
        steps, scores = steps or min(50, self.settings["sample_steps"]), {}
        for T in self.TEMPERATURES:
            self.settings["temperature"] = T
            x = self.sample(n, torch.Generator().manual_seed(self.settings["seed"] + 9), steps=steps,
                            stop=None if whole else 1, calibrate=whole is not None)
            scores[T] = (measure(x).median() / target).log().abs().item()
        self.settings["temperature"], self.temperature_scores = kept, scores
        return min(scores, key=scores.get)

    GUIDANCE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # what pick_guidance chooses from

    @torch.no_grad()
    def pick_guidance(self, originals: torch.Tensor, n: int = 32, steps: int = None) -> float:
        """The guidance weight whose networks have the training networks' size: per tensor, the RMS of its values
        (no permutation changes it; no held-out network, no data), the weight with the smallest mean |log ratio|
        of generated to training RMS. Flows that fit imperfectly shrink their samples; guidance grows them."""
        rms = lambda x: torch.stack([v.flatten(1).square().mean(1).sqrt().mean()
                                     for v in self.graph.layout.unflatten(x).values()])  # (tensors,)
        target, scores, steps = rms(originals), {}, steps or min(50, self.settings["sample_steps"])
        for w in self.GUIDANCE:
            x = self.sample(n, torch.Generator().manual_seed(self.settings["seed"] + 7), steps=steps, guidance=w,
                            calibrate=False)
            scores[w] = (rms(x) / target).log().abs().mean().item()
        self.guidance_scores = scores
        return min(scores, key=scores.get)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, *, steps: int = None, given: torch.Tensor = None,
               start: int = 0, stop: int = None, guidance: float = None, calibrate: bool = True,
               tick=None, fixed: torch.Tensor = None, t0: float = 1.0) -> torch.Tensor:
        """-> (n, D) raw parameter vectors (in an arbitrary frame: align them before comparing vectors).
        Steps of the flow (step: Euler's, or stochastic with eta) from t = 1 (noise) to t = 0. given (n, D) and
        start (mode layers): the hidden layers before `start` taken from `given`, the rest generated for them (a
        diagnostic: completion); stop (mode layers): the layers from `stop` on left as noise (pick_temperature reads
        hidden layer 1 alone); fixed (D,) 1 / 0: the parameters of `given` kept within the layers generated too (each
        step puts them back where the flow's straight path from them to their noise is: inpainting); t0 < 1: the
        layers generated start from given's, noised to time t0 (SDEdit), not from noise."""
        steps = steps or self.settings["sample_steps"]
        guidance = self.settings["guidance"] if guidance is None else guidance
        if guidance and not self.settings["drop"]:
            raise ValueError("guidance needs a model trained with drop > 0 (layers before a layer sometimes unseen)")
        B = n
        shapes = self.encode(torch.zeros(1, self.graph.layout.D))
        x = _map(lambda a: torch.randn((B, *a.shape[1:]), generator=generator), shapes)
        x = ([x[0][0] * self.settings["temperature"]] + x[0][1:], x[1], x[2])  # hidden layer 1's start: temperature
        if start:
            if self.settings["mode"] != "layers":
                raise ValueError("completion needs mode layers (a model trained with clean earlier layers)")
            keep = self.per_part(torch.tensor([[float(l < start) for l in range(self.graph.L - 1)]]).expand(B, -1))
            x = _map3(lambda a, k, m: a * (1 - m) + k * m, x, self.encode(given), keep)
        ts, H = torch.linspace(t0, 0, steps + 1), self.graph.L - 1
        if fixed is not None:
            known, held, noise = self.encode(given), self.graph.split(fixed[None].float()), x
        if t0 < 1:
            x = _map2(lambda k, a: _mix(k, a, t0), self.encode(given), x)
        stages = [list(range(H))] if self.settings["mode"] == "joint" else [[l] for l in range(start, stop or H)]
        for groups in stages:  # joint: every group at once; layers: one after another, given the ones before
            P, first = max(groups) + 1, min(groups)  # the groups present, the first one made now
            mask = _first(self.per_part(torch.tensor([[float(l in groups) for l in range(H)]]).expand(B, H)), P, H)
            temps = ([self.settings["temperature"] if l == 0 else 1.0 for l in range(P)], [1.0] * (P - 1), 1.0)
            y = _first(x, P, H)
            tau = self.settings["cond_noise"] / 2 if first > 0 else 0.0  # the layers before, seen a little noised:
            if tau:  # as they were in training (the cascade's conditioning augmentation); the output keeps them clean
                before = _first(self.per_part(torch.tensor([[float(l < first) for l in range(H)]]).expand(B, H)), P, H)
                seen_y = _map2(lambda a, m: a + m * tau * (torch.randn(a.shape, generator=generator) - a), y, before)
            w = guidance if first > 0 else 0.0
            if w:  # the unconditional pass sees the layers before as pure noise (t = 1)
                seen = _first(self.per_part(torch.tensor([[float(l >= first) for l in range(H)]]).expand(B, H)), P, H)
                blind = _map(lambda a: torch.randn(a.shape, generator=generator), y)
            for i in range(steps):
                t = torch.tensor([[ts[i].item() if l in groups else tau for l in range(P)]]).expand(B, P)
                y_in = _map3(lambda a, c, m: a * (1 - m) + c * m, y, seen_y, before) if tau else y
                v = (self.layer1 if first == 0 else self.ema)(*y_in, t)
                ag = self.settings["autoguidance"] if first == 0 and self.worse is not None else 0.0
                if ag:  # hidden layer 1: guided away from the worse model's velocity
                    v = _map2(lambda c, u: (1 + ag) * c - ag * u, v, self.worse(*y_in, t))
                if w:
                    tu = torch.where(torch.arange(P)[None] < first, 1.0, t)
                    vu = self.ema(*_map3(lambda a, b, m: a * m + b * (1 - m), y, blind, seen), tu)
                    v = _map2(lambda c, u: (1 + w) * c - w * u, v, vu)
                y = _mapn(lambda a, u, m, T: a + m * (self.step(a, u, ts[i].item(), ts[i + 1].item(), generator,
                                                                T) - a), y, v, mask, temps)
                if fixed is not None:
                    y = _mapn(lambda a, m, f, k, e: a + m * f * (_mix(k, e, ts[i + 1]) - a), y, mask,
                              *(_first(q, P, H) for q in (held, known, noise)))
                if tick is not None and groups == stages[-1]:  # (a progress bar of `steps`: the last stage's)
                    tick()
            x = _put(x, y, P, H)
        x = self.decode(*x)
        if calibrate and self.settings["calibrate"]:
            x = Probes.load(self.graph, self.stats["probes"]).apply(x, self.settings["calibrate"])
        return x


class Neurons(nn.Module):
    """NeuronGenerator as a pdiff generator: `pdiff fit --generator experiments/neurons.py:Neurons` fits it to a
    `collect --networks` run of an MLP or a chain of convolutions (convnet3; pdiff hands it the network, which the
    functional loss and the probes run), and `pdiff sample` judges its networks with pdiff's verdict, baselines and
    --export (its networks come in an arbitrary frame: ALIGNED = False, so sample aligns them to the collection's
    reference as it aligns --judge files). Settings: DEFAULTS (E8's at 3,000 steps: layers one after another,
    guidance 1, the output bias calibrated on probe inputs synthesised from the training networks; with E17's
    functional loss, func 5); first_steps > 0: hidden layer 1 made by a first-layer model of its own (learn
    first, fitted first for that many steps, the same settings otherwise; E31), the shared model making the layers
    after it. A subclass with other DEFAULTS is another generator. The model file holds the averaged denoisers and
    the standardisation (and the probes) as buffers. It runs on the CPU."""

    DEFAULTS = {**NeuronGenerator.DEFAULTS, "edge_width": 24, "mode": "layers", "drop": 0.1, "guidance": 1.0,
                "calibrate": "bias", "func": 5.0, "first_steps": 0}
    ALIGNED = False

    def __init__(self, layout: pdiff.Layout, K: int, s: dict, *, condition: bool = False, net: nn.Module = None,
                 shape: tuple = None):
        super().__init__()
        if condition:
            raise pdiff.PdiffError("the neuron generator does not learn accuracies: fit it without --condition", 2)
        s = {**NeuronGenerator.DEFAULTS, "first_steps": 0, **s}  # a model file from before a setting: its default
        self.s, self.T = s, s["sample_steps"]
        kept = {k: s[k] for k in NeuronGenerator.DEFAULTS}
        try:
            self.gen = NeuronGenerator(layout, **kept, net=net, in_shape=shape)
        except ValueError as e:
            raise pdiff.PdiffError(f"the neuron generator: {e}", 2)
        self.ema = self.gen.ema  # the model file's denoiser (the trained one is not kept)
        self.first = None
        if s["first_steps"]:  # its denoiser in the file too; the settings that pick something pick on the whole
            self.first = NeuronGenerator(layout, **kept | dict(learn="first", steps=s["first_steps"], rescale=0.0,
                                                                auto_temperature=False, auto_guidance=False),
                                         net=net, in_shape=shape)
            self.first_ema = self.gen.first = self.first.ema
        g = self.gen.graph
        shapes = {f"tokens{l}": (d,) for l, d in enumerate(g.token_dims)} | \
            {f"edges{k}": () if d == 1 else (d,) for k, d in enumerate(g.edge_dims)} | {"glob": (g.n_out,)}
        for name, shape in shapes.items():
            self.register_buffer(name + "_mean", torch.zeros(shape))
            self.register_buffer(name + "_std", torch.ones(shape))
        self.register_buffer("temperature", torch.tensor(float(s["temperature"])))  # as fit() left it (auto)
        if s["calibrate"]:
            self.register_buffer("probes_x", torch.zeros(Probes(g).mixes, *g.in_shape))
            self.register_buffer("probes_target", torch.zeros(g.n_out))
        if s["calibrate"] == "readout":
            self.register_buffer("probes_soft", torch.zeros(Probes(g).mixes, g.n_out))
        self.finish = self.calibrated if s["calibrate"] else None  # (pdiff sample gives the blends the same)

    def to(self, *args, **kwargs):  # NeuronGenerator makes its tensors on the CPU: it stays there
        return self

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # a file from before the
        return super().load_state_dict({"temperature": self.temperature.clone(), **state}, strict, assign)  # buffer

    def bind(self, originals: torch.Tensor, rows: list):
        pass

    def fit(self, layout: pdiff.Layout, originals: torch.Tensor, rows: list, *, loop, accuracies=None):
        prog, x = loop.prog, originals[rows].float().cpu()
        bar = lambda name, total: None if prog is None else (lambda step, loss, task=prog.add_task(
            name, total=total): prog.update(task, completed=step + 1))
        if self.first is not None:  # before the shared model, whose temperature is then picked for this layer 1
            self.first.fit(x, progress=bar("neurons: hidden layer 1", self.s["first_steps"]))
        self.gen.fit(x, progress=bar("neurons: fit", self.s["steps"]))
        st = self.gen.stats
        for name, (m, sd) in [*((f"tokens{l}", v) for l, v in enumerate(st["tokens"])),
                              *((f"edges{k}", v) for k, v in enumerate(st["edges"])), ("glob", st["glob"])]:
            getattr(self, name + "_mean").copy_(m.reshape(getattr(self, name + "_mean").shape))
            getattr(self, name + "_std").copy_(sd.reshape(getattr(self, name + "_std").shape))
        self.temperature.fill_(self.gen.settings["temperature"])
        if self.s["calibrate"]:
            self.probes_x.copy_(st["probes"]["x"])
            self.probes_target.copy_(st["probes"]["target"])
        if self.s["calibrate"] == "readout":
            self.probes_soft.copy_(st["probes"]["soft"])

    def stats(self) -> dict:  # the buffers as NeuronGenerator reads them
        pair = lambda name: (getattr(self, name + "_mean"), getattr(self, name + "_std"))
        g = self.gen.graph
        return {"tokens": [pair(f"tokens{l}") for l in range(g.L - 1)], "edges": [pair(f"edges{k}") for k in
                                                                                 range(g.L - 2)],
                "glob": pair("glob")} | ({"probes": {"x": self.probes_x, "target": self.probes_target,
                                                     "soft": getattr(self, "probes_soft", None)}}
                                         if self.s["calibrate"] else {})

    @torch.no_grad()
    def calibrated(self, sets: torch.Tensor) -> torch.Tensor:  # draw()'s last step alone (finish, for the blends)
        return Probes.load(self.gen.graph, self.stats()["probes"]).apply(sets.float(), self.s["calibrate"])

    @torch.no_grad()
    def draw(self, n: int, g: torch.Generator, *, sampler="ddpm", steps=None, eta=0.0, tick=None, trace=None,
             target=None, guidance=0.0) -> torch.Tensor:
        """-> (n, D) raw networks (its codes are the networks themselves), `steps` Euler steps of the flow (ddpm: the
        model's sample_steps; the sampler makes no other difference)."""
        if target is not None:
            raise pdiff.PdiffError("the neuron generator has no --target-accuracy (it is fitted without --condition)", 2)
        self.gen.stats, self.gen.settings["temperature"] = self.stats(), self.temperature.item()
        return self.gen.sample(n, g, steps=steps, tick=tick)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()

    def encode(self, sets: torch.Tensor):  # no latents to plot
        return None

    def reconstructions(self, originals: torch.Tensor) -> dict:  # no autoencoder: nothing to round-trip
        return {}


class ConvNeurons(Neurons):
    """Neurons with the recipe measured on convnet3 (neurons.md E39): the functional loss at weight 1 and not on
    hidden layer 1 (at weight 5 and on every layer it inflates convolutional networks as the fit goes on: 51 % at
    1,000 steps, 16 % at 4,000), guidance 0.5 (1 inflates the later layers' kernels), batches of 32 at twice the
    rate, 8,000 steps, edges of width 48 (they carry 3x3 kernels; 90.67 % with the output bias calibrated, 83.98
    not; at width 24 87.88 / 80.36; without the functional loss 82.31 / 66.85: neurons.md E40-E41), and the output
    layer refitted on the probes (calibrate readout: 96.80; the generated output layer is what was off: E42), which
    pdiff sample gives the blends too (finish)."""

    DEFAULTS = {**Neurons.DEFAULTS, "func": 1.0, "func_from": 1, "guidance": 0.5, "batch": 32, "lr": 2e-3,
                "steps": 8000, "edge_width": 48, "calibrate": "readout"}


# ----------------------------------------------------------------------------------------------------
# probes: inputs synthesised from the training networks (no data), to calibrate a generated network's output bias


class Probes:
    """Model inversion of the training networks: `m` inputs, each pushed (Adam on cross-entropy, an L2 penalty
    `wd` on the inputs) toward one class (m / classes per class) by the training networks together; then `mixes`
    random convex combinations of two of them, inputs between the classes. target: the training networks' mean
    predicted class distribution on those inputs; soft: their mean predicted distribution on each input. calibrate()
    sets a network's output bias so that its own mean prediction on them equals the target (prior matching: iterate
    b <- b + log(target / mean softmax)), which fits 10 numbers per network to one class-frequency statistic, never
    to per-input answers. readout() refits a network's whole output layer to the per-input answers (soft): a
    readout distilled from the training networks on the synthesised inputs, for the network's own features."""

    def __init__(self, graph: Graph, *, m: int = 200, steps: int = 300, wd: float = 0.1, mixes: int = 2000,
                 seed: int = 0, box: tuple = None, uniform: bool = False, tv: float = 0.0, image: tuple = None):
        """Image priors (output_study.py probes; none helped, E44): box (lo, hi), the inputs clamped to it after each
        step (uniform: drawn in it to start); tv, a total-variation penalty on the inputs seen as `image`."""
        if uniform and not box:
            raise ValueError("Probes: a uniform start is drawn in box (lo, hi): give box")
        self.graph, self.layout, self.pairs = graph, graph.layout, graph.pairs
        self.m, self.steps, self.wd, self.mixes, self.seed = m, steps, wd, mixes, seed
        self.box, self.uniform, self.tv, self.image = box, uniform, tv, image
        self.x = self.target = self.soft = None

    def forward(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:  # (B, D) raw, (N, *in) -> (B, N, out)
        return self.graph.forward(x, inputs)

    def fit(self, originals: torch.Tensor) -> "Probes":  # sets self.x (mixes) and self.classes (the m inputs)
        g = torch.Generator().manual_seed(self.seed + 13)
        n_out = self.graph.n_out
        P = torch.rand if self.uniform else torch.randn
        P = P(self.m, *self.graph.in_shape, generator=g)
        if self.uniform:
            P = self.box[0] + (self.box[1] - self.box[0]) * P
        P.requires_grad_(True)
        y = torch.arange(self.m) % n_out
        opt = torch.optim.Adam([P], 0.05)
        for _ in range(self.steps):
            idx = torch.randint(0, len(originals), (16,), generator=g)
            lg = self.forward(originals[idx], P)
            loss = F.cross_entropy(lg.reshape(-1, n_out), y.repeat(len(idx))) + self.wd * P.square().mean()
            if self.tv:
                im = P.reshape(-1, *self.image)
                loss = loss + self.tv * (im.diff(dim=-2).square().mean() + im.diff(dim=-1).square().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.box:
                with torch.no_grad():
                    P.clamp_(*self.box)
        P = self.classes = P.detach()
        a = torch.rand(self.mixes, *[1] * (P.dim() - 1), generator=g)
        i, j = torch.randint(0, self.m, (2, self.mixes), generator=g)
        self.x = a * P[i] + (1 - a) * P[j]
        return self.answers(originals)

    @torch.no_grad()
    def answers(self, originals: torch.Tensor) -> "Probes":  # sets target and soft: the originals' on self.x
        self.soft = torch.stack([self.forward(c, self.x).softmax(-1).sum(0) for c in originals.split(8)]).sum(0) \
            / len(originals)
        self.target = self.soft.mean(0)
        return self

    def state(self) -> dict:
        return {"x": self.x, "target": self.target, "soft": self.soft}

    @classmethod
    def load(cls, graph: Graph, state: dict) -> "Probes":
        pr = cls(graph)
        pr.x, pr.target, pr.soft = state["x"], state["target"], state.get("soft")  # (older files: no soft)
        return pr

    def apply(self, x: torch.Tensor, how: str) -> torch.Tensor:  # the calibration `how` names: bias or readout
        return self.readout(x) if how == "readout" else self.calibrate(x)

    def readout(self, x: torch.Tensor, iters: int = 100, loss=None) -> torch.Tensor:
        """(B, D) raw -> the same networks with each one's output layer (weights and bias) refitted, from where it
        is, so that its predicted distribution on each probe input is the training networks' mean one (soft):
        cross-entropy, L-BFGS, no penalty. The hidden layers are left as they are; a network with NaN stays so.
        loss(logits (N, out)) -> scalar: another loss to fit (output_study.py compares some)."""
        loss = loss or (lambda z: F.cross_entropy(z, self.soft))
        p = self.layout.unflatten(x.clone())
        wn, bn = self.pairs[-1]
        with torch.no_grad():
            feats = self.graph.features(x.nan_to_num(), self.x)
        for i in torch.isfinite(x).all(1).nonzero().flatten().tolist():
            W, b = p[wn][i].clone().requires_grad_(True), p[bn][i].clone().requires_grad_(True)
            opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

            def step():
                opt.zero_grad()
                l = loss(feats[i] @ W.T + b)
                l.backward()
                return l
            with torch.enable_grad():
                opt.step(step)
            p[wn][i], p[bn][i] = W.detach(), b.detach()
        return self.layout.pack(p, batch=1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, iters: int = 100) -> torch.Tensor:
        p = self.layout.unflatten(x.clone())
        bname = self.pairs[-1][1]
        lg = self.forward(x, self.x) - p[bname][:, None]  # logits without the output bias
        b = p[bname].clone()
        for _ in range(iters):
            b = b + (self.target / (lg + b[:, None]).softmax(-1).mean(1)).log()
        b = b - (b - p[bname]).mean(-1, keepdim=True)  # a shift common to all classes changes no prediction
        p[bname] = b
        return self.layout.pack(p, batch=1)


# ----------------------------------------------------------------------------------------------------
# the output stage: the output layer generated for given hidden layers, read through the last hidden layer's
# units' templates


class OutputDenoiser(nn.Module):
    """Velocity for the output layer (each last-hidden unit's outgoing weights, one per class, and the output
    bias) given per-unit condition features: a transformer over the units plus one global token (the output
    bias), no positions, so permuting the units permutes the output alike."""

    def __init__(self, f_cond: int, n_out: int, *, width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        self.cond_in, self.z_in = nn.Linear(f_cond, width), nn.Linear(n_out, width)
        self.g_in, self.g_type = nn.Linear(n_out, width), nn.Parameter(torch.zeros(width))
        self.temb = Mlp(64, width, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.z_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_out))
        self.g_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_out))
        for head in (self.z_out, self.g_out):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, cond, z, g, t):  # (B, n, f), (B, n, n_out), (B, n_out), (B,)
        te = self.temb(time_embedding(t, 64))[:, None]
        h = torch.cat([(self.g_in(g) + self.g_type)[:, None], self.cond_in(cond) + self.z_in(z)], 1) + te
        h = self.body(h)
        return self.z_out(h[:, 1:]), self.g_out(h[:, 0])


class OutputStage(Saved):
    """p(output layer | hidden layers) as a flow (x_t = (1 - t) x_0 + t eps). What the last hidden layer's unit j
    computes, in pixel terms and without data: its excitatory and inhibitory templates over the inputs
    (relu(W) @ T and relu(-W) @ T, T the layer below's templates, the first layer's own weights), its bias and
    the bias it inherits (W @ b_below), and its incoming weights' norm. fit() sees the training networks only."""

    def __init__(self, layout: pdiff.Layout, *, width: int = 128, depth: int = 4, heads: int = 4,
                 steps: int = 3000, batch: int = 32, lr: float = 1e-3, ema: float = 0.999, sample_steps: int = 100,
                 probes: torch.Tensor = None, seed: int = 0):
        """probes (m, n_in): inputs (Probes' class inputs, no data) on which each last-hidden unit's responses
        are added to its features: what it computes, read functionally."""
        self.pairs, self.layout, self.probes = layer_pairs(layout), layout, probes
        self.settings = dict(width=width, depth=depth, heads=heads, steps=steps, batch=batch, lr=lr, ema=ema,
                             sample_steps=sample_steps, seed=seed)
        shapes = dict(zip(layout.names, layout.shapes))
        n_in, n_out = shapes[self.pairs[0][0]][1], shapes[self.pairs[-1][0]][0]
        torch.manual_seed(seed)
        self.net = OutputDenoiser(2 * n_in + 3 + (0 if probes is None else len(probes)), n_out, width=width, depth=depth, heads=heads)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.stats = None

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) raw -> (B, n_last, 2 n_in + 3) raw features
        p = self.layout.unflatten(x)
        T, c = p[self.pairs[0][0]], p[self.pairs[0][1]]  # templates (B, n, n_in) and biases of hidden layer 1
        for w, b in self.pairs[1:-1]:
            W = p[w]
            new_c = W @ c[..., None]
            T_pos, T_neg = W.clamp_min(0) @ T, (-W).clamp_min(0) @ T
            T, c = T_pos - T_neg, new_c[..., 0] + p[b]
        if len(self.pairs) == 2:  # one hidden layer: its own weights
            T_pos, T_neg, W = T, torch.zeros_like(T), T
        feats = [T_pos, T_neg, c[..., None], p[self.pairs[-2][1]][..., None], W.norm(dim=-1, keepdim=True)]
        if self.probes is not None:
            h = self.probes
            for w, b in self.pairs[:-1]:
                h = (h @ p[w].transpose(-1, -2) + p[b][..., None, :]).relu()  # (B, m, n_last) at the end
            feats.append(h.transpose(-1, -2))
        return torch.cat(feats, -1)

    def parts(self, x):  # (B, D) -> (outgoing weights (B, n_last, n_out), output bias (B, n_out)), raw
        p = self.layout.unflatten(x)
        return p[self.pairs[-1][0]].transpose(-1, -2), p[self.pairs[-1][1]]

    def fit(self, originals: torch.Tensor, progress=None) -> "OutputStage":
        cfg, K = self.settings, len(originals)
        f = self.features(originals)
        z, gb = self.parts(originals)
        self.stats = dict(f=(f.mean((0, 1)), f.std((0, 1)).clamp_min(1e-6)), z=(z.mean((0, 1)), z.std((0, 1))),
                          g=(gb.mean(0), gb.std(0).clamp_min(1e-6)))
        st = self.stats
        f, z, gb = (f - st["f"][0]) / st["f"][1], (z - st["z"][0]) / st["z"][1], (gb - st["g"][0]) / st["g"][1]
        g = torch.Generator().manual_seed(cfg["seed"] + 11)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg["lr"], weight_decay=0.0)
        warm, total = max(1, cfg["steps"] // 20), cfg["steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
            math.pi * min(1.0, s / total)))))
        for step in range(total):
            idx = torch.randint(0, K, (cfg["batch"],), generator=g)
            t = torch.rand(len(idx), generator=g)
            ez, eg = torch.randn(z[idx].shape, generator=g), torch.randn(gb[idx].shape, generator=g)
            vz, vg = self.net(f[idx], _mix(z[idx], ez, t[:, None, None]), _mix(gb[idx], eg, t[:, None]), t)
            loss = ((vz - (ez - z[idx])).square().sum() + (vg - (eg - gb[idx])).square().sum()) / \
                (z[idx].numel() + gb[idx].numel())
            _update(self.net, self.ema, opt, sched, loss, step, cfg["ema"])
            if progress and (step % 500 == 0 or step == total - 1):
                progress(step, loss.item())
        return self

    @torch.no_grad()
    def complete(self, x: torch.Tensor, generator: torch.Generator, steps: int = None) -> torch.Tensor:
        """(B, D) raw networks -> the same with the output layer generated for their hidden layers."""
        st, B, steps = self.stats, len(x), steps or self.settings["sample_steps"]
        f = (self.features(x) - st["f"][0]) / st["f"][1]
        z0, g0 = self.parts(x)
        z, gb = torch.randn(z0.shape, generator=generator), torch.randn(g0.shape, generator=generator)
        ts = torch.linspace(1, 0, steps + 1)
        for i in range(steps):
            vz, vg = self.ema(f, z, gb, ts[i].expand(B))
            z, gb = z + (ts[i + 1] - ts[i]) * vz, gb + (ts[i + 1] - ts[i]) * vg
        p = self.layout.unflatten(x.clone())
        p[self.pairs[-1][0]] = (z * st["z"][1] + st["z"][0]).transpose(-1, -2)
        p[self.pairs[-1][1]] = gb * st["g"][1] + st["g"][0]
        return self.layout.pack(p, batch=1)



# helpers over (tokens list, edges list, glob) triples
def _map(f, parts):
    tokens, edges, glob = parts
    return [f(a) for a in tokens], [f(a) for a in edges], None if glob is None else f(glob)


def _map2(f, p, q):
    return _mapn(f, p, q)


def _map3(f, p, q, r):
    return _mapn(f, p, q, r)


def _mapn(f, *ps):  # f over the matching parts of several (tokens, edges, glob)
    return ([f(*a) for a in zip(*(p[0] for p in ps))], [f(*a) for a in zip(*(p[1] for p in ps))],
            None if ps[0][2] is None else f(*(p[2] for p in ps)))


def _first(parts, P: int, H: int):  # the first P groups of H
    return parts[0][:P], parts[1][:P - 1], parts[2] if P == H else None


def _put(parts, part, P: int, H: int):  # parts with its first P groups replaced by part's
    return (part[0] + parts[0][P:], part[1] + parts[1][P - 1:], part[2] if P == H else parts[2])


def _index(parts, idx):
    return _map(lambda a: a[idx], parts)


def _like(parts, g):
    return _map(lambda a: torch.randn(a.shape, generator=g), parts)


def _mix(a, n, t):  # t broadcasts
    return (1 - t) * a + t * n


def _update(net: nn.Module, ema: nn.Module, opt, sched, loss: torch.Tensor, step: int, decay: float):
    """One optimizer step (gradients clipped to norm 1), the schedule's, and the averaged copy's (EMA with warm-up)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        d = min(decay, (1 + step) / (10 + step))
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - d)


def _se(pred, target, weight) -> tuple:
    """(sum of squared errors, parameters counted) over the parts, weighted (0 / 1) per network and group."""
    flat = lambda p: p[0] + p[1] + ([p[2]] if p[2] is not None else [])
    se = sum(((p - q).square() * w).sum() for p, q, w in zip(flat(pred), flat(target), flat(weight)))
    count = sum((w * torch.ones_like(q)).sum() for q, w in zip(flat(target), flat(weight)))
    return se, count


# ----------------------------------------------------------------------------------------------------
# REPAIR (Jordan et al., arXiv 2211.08403): a blend's hidden units rescaled to their parents' statistics


def pre_activations(layout: pdiff.Layout, p: dict, x: torch.Tensor, l: int, net: nn.Module = None) -> torch.Tensor:
    """Layer l's pre-activations, one column per unit: an MLP given as a parameter dict (layer_pairs order, ReLU
    between layers) on flat inputs x (N, n_in) -> (N, n_l); or, given the network itself (convolutions), its layer
    l's output caught on the way (N, n_l, *map) -> (N * positions, n_l), every position of a channel a sample."""
    pairs = layer_pairs(layout)
    if net is None:
        h = x
        for w, b in pairs[:l]:
            h = (h @ p[w].T + p[b]).relu()
        return h @ p[pairs[l][0]].T + p[pairs[l][1]]
    seen = []
    hook = net.get_submodule(pairs[l][0].rpartition(".")[0]).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        torch.func.functional_call(net, p, (x,))
    finally:
        hook.remove()
    return seen[0].transpose(0, 1).flatten(1).T


@torch.no_grad()
def unit_stats(networks: torch.Tensor, layout: pdiff.Layout, x: torch.Tensor, net: nn.Module = None) -> list:
    """Each hidden layer's (means, stds) of its units' pre-activations on x, (m, n_l) each, for networks (m, D)."""
    ms = lambda z: torch.stack([z.mean(0), z.std(0)])  # reduced at once: a convnet's z is large
    zs = [torch.stack([ms(pre_activations(layout, layout.unflatten(v), x, l, net)) for v in networks])
          for l in range(len(layer_pairs(layout)) - 1)]  # (m, 2, n_l) a layer
    return [(z[:, 0], z[:, 1]) for z in zs]


@torch.no_grad()
def repair(blend: torch.Tensor, parents: torch.Tensor, layout: pdiff.Layout, x: torch.Tensor,
           net: nn.Module = None, stats: list = None) -> torch.Tensor:
    """REPAIR one blend (D,) of aligned parents (m, D) on inputs x (a few training batches, prepped; flat for an
    MLP, images with `net`, the network, for convolutions): layer by layer, each hidden unit's pre-activation is
    shifted and scaled (its incoming weights and bias) so its mean and std on x equal the mean of its parents' means
    and stds (a channel's over every position). Later layers see the repaired earlier ones. The output layer is left
    as it is. stats: the parents' unit_stats, where the caller has them (a parent's are the same in every blend).
    -> (D,)."""
    pairs = layer_pairs(layout)
    q = layout.unflatten(blend.clone())
    stats = stats or unit_stats(parents, layout, x, net)
    for l, (w, b) in enumerate(pairs[:-1]):
        mu_t, sd_t = stats[l][0].mean(0), stats[l][1].mean(0)  # the target: the parents' mean statistics
        z = pre_activations(layout, q, x, l, net)
        mu, sd = z.mean(0), z.std(0)
        s = sd_t / sd.clamp_min(1e-8)
        q[w] = q[w] * s.view(-1, *[1] * (q[w].dim() - 1))
        q[b] = (q[b] - mu) * s + mu_t
    return layout.pack(q)


def repair_inputs(run: pdiff.Run, n: int = 500, seed: int = 0, flat: bool = True) -> torch.Tensor:
    """n training images (seeded pick), prepped (and flattened, for an MLP): the `few training batches` REPAIR
    reads."""
    idx = torch.randperm(len(run.data.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        x = run.prep(run.data.x_train[idx])
    return x.flatten(1) if flat else x


# ----------------------------------------------------------------------------------------------------
# the comparison


def rank(run, gen, x_train: torch.Tensor, sets: torch.Tensor, path: str) -> dict:
    """Diagnostic (reads the test set, picks nothing): can a score without data pick the more accurate of the
    generated networks? Each network's agreement with the training networks' mean prediction on probe inputs
    (Probes: synthesised from the training networks) against its test accuracy: Spearman's rho, and the test median
    (torch's: the lower middle) of the top third by it, of the top third by validation accuracy, and of the first
    third drawn (a third at random)."""
    from scipy.stats import spearmanr  # scikit-learn's scipy
    pr = Probes.load(gen.graph, gen.stats["probes"]) if "probes" in gen.stats else Probes(gen.graph).fit(x_train)
    with torch.no_grad():
        mean = pr.forward(x_train, pr.x).softmax(-1).mean(0).argmax(-1)
        agree = (pr.forward(sets, pr.x).argmax(-1) == mean).float().mean(1)
    d = run.data
    test = pdiff.evaluate(run.net, run.prep, run.layout, sets, d.x_test, d.y_test, path=path).float().mean(1) * 100
    val = pdiff.validation_accuracy(run, pdiff.Group(len(sets), lambda i: sets[i]), path)
    third = max(1, len(sets) // 3)
    top = lambda score: test[score.argsort(descending=True)[:third]].median().item()
    return {"rho": float(spearmanr(agree, test)[0]), "probes": top(agree), "validation": top(val),
            "random": test[:third].median().item(), "n": len(sets)}


def judge_group(run, ruler, path, sets, ref, near):
    """-> one table row's numbers for raw sets (n, D), already in the aligned frame, as `pdiff sample` judges a
    group: pdiff.measure_group (test accuracy, per-model numbers of the finite sets, exact copies) and
    pdiff.describe (the label from pdiff.judge against ref = (the held-out originals' numbers, their units)).
    near: the held-out originals' 5th percentile of the nearest ratio; "copies" is the share of the finite sets
    below it (near-copies, this table's own column; exact copies make the label `copying`)."""
    g = pdiff.measure_group(run, ruler, pdiff.Group(len(sets), lambda i: sets[i]), path, keep=False)
    row = pdiff.describe(g, run, ref)
    m, ok = g.m, len(g.m["accuracy"]) > 0
    med = lambda v: v.quantile(0.5).item() if ok else math.nan
    return row | {"n": len(sets), "to_mean": med(m["to_mean"]), "nearest_ratio": med(m["nearest_ratio"]),
                  "max_iou": m["max_iou"].mean().item() if ok else math.nan,
                  "near_copies": (m["nearest_ratio"] < near).double().mean().item() if ok else math.nan}


def load_generator(run: pdiff.Run, file: Path, **changed) -> NeuronGenerator:
    """A generator saved by --save-model, as it was fitted (`changed` aside), for the run's network."""
    state = torch.load(file, weights_only=False)
    kept = {k: v for k, v in state["settings"].items() if k in NeuronGenerator.DEFAULTS}  # (older files')
    gen = NeuronGenerator(run.layout, **(kept | changed), net=run.net, in_shape=run.prep.shape)
    gen.load_state_dict(state)
    return gen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=None, help="held-out networks, as `pdiff fit --holdout` (a "
                    "share below 1, else a count; default pdiff's FitConfig().holdout)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="NeuronGenerator settings, e.g. steps=3000 width=64 lr=1e-3")
    ap.add_argument("--no-baselines", action="store_true", help="only the generated rows (the baselines' numbers "
                    "do not change between generators)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the generated networks' ablation rows (not "
                    "calibrated; held-out layer 1 completed): with --min-accuracy the first draws until n networks "
                    "without the calibration reach it, at most 20 n")
    ap.add_argument("--save", type=Path, default=None, help="write the generated (aligned) sets here (.pt)")
    ap.add_argument("--save-model", type=Path, default=None, help="write the generator's state_dict here (.pt)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="the fit's state goes to this file every 250 "
                    "steps; run the same command again to resume from it (it is removed when the fit ends)")
    ap.add_argument("--load-model", type=Path, default=None, help="a saved generator instead of fitting one "
                    "(--set then changes sampling settings only: sample_steps, guidance, eta, temperature, ...; and "
                    "exposure_steps fine-tunes it)")
    ap.add_argument("--worse-model", type=Path, default=None, help="with --load-model: a saved generator of the "
                    "same networks, fitted shorter, that guides hidden layer 1 (--set autoguidance=W)")
    ap.add_argument("--first-model", type=Path, default=None, help="with --load-model: a saved generator of the "
                    "same networks fitted with learn=first (hidden layer 1 alone) that makes hidden layer 1")
    ap.add_argument("--whole-temperature", action="store_true", help="pick hidden layer 1's temperature on whole "
                    "networks' distance to the training networks' mean (pick_temperature's whole), not layer 1's")
    ap.add_argument("--rank", action="store_true", help="diagnostic: how well a data-free score (agreement with "
                    "the training networks on probe inputs) ranks the generated networks by test accuracy (rank())")
    ap.add_argument("--min-accuracy", type=float, default=None, help="as `pdiff sample --min-accuracy`: draw n "
                    "networks at a time (at most 20 n) until n reach this validation accuracy (%%); every baseline "
                    "is picked alike from as many draws of its own; the test set only grades")
    args = ap.parse_args(argv)
    quick = os.environ.get("QUICK") == "1"
    torch.set_num_threads(int(os.environ.get("NEURONS_THREADS", 1)))  # 2 threads on 2 shared cores: 40x slower
    n = args.n or (10 if quick else 50)
    settings = dict(width=32, edge_width=8, depth=2, steps=60, batch=16, sample_steps=20) if quick else {}
    for kv in args.set:
        k, v = kv.split("=")
        kind = type(NeuronGenerator.DEFAULTS[k])
        settings[k] = v.lower() in ("1", "true", "yes") if kind is bool else kind(v)

    run = pdiff.open_run(args.run, model=None)
    if run.collection.kind != "networks" or not run.collection.aligned:
        sys.exit("neurons.py compares whole networks in the aligned frame: collect with --networks (mlp3 aligns by "
                 "default)")
    if args.holdout is not None:  # as `pdiff fit --holdout`: whole held-out networks, never the reference
        run.split = pdiff.holdout(run.collection, len(run.snapshots), args.holdout)
    # the split is pdiff's (Run.split): the generator, Probes, pick_guidance and every baseline see the training
    # networks only; the held-out networks (whole seeds, all their snapshots: Run.units) are only the reference
    ruler, train, held = run.ruler(), run.training, run.held_out
    if not run.units:
        sys.exit("neurons.py judges against held-out networks: --holdout must keep some")
    per = run.collection.per_network
    x_train = run.snapshots[train]
    m_held, held_row = pdiff.held_out_group(run, ruler)
    n_held = len(run.units)
    ref_vec = run.reference  # the alignment reference (network 0, a training network, or their MergeMany mean)
    spec = pdiff.symmetry(run.net, run.prep.shape)  # its hidden units, read from the graph (weight matching)
    path = pdiff.eval_path(run.net, run.prep, run.layout, run.data.x_test)

    rows = {}
    near = m_held["nearest_ratio"][m_held["nearest_ratio"].isfinite()].quantile(0.05).item()
    rows["held-out originals"] = held_row | {
        "n": len(held), "label": held_row.get("label", "-"), "to_mean": m_held["to_mean"].median().item(),
        "nearest_ratio": m_held["nearest_ratio"].median().item(), "max_iou": m_held["max_iou"].mean().item(),
        "near_copies": None}
    judge = lambda sets: judge_group(run, ruler, path, sets, (m_held, n_held), near)

    load = lambda file, **changed: load_generator(run, file, **changed)

    if args.load_model:
        sampling = ("sample_steps", "guidance", "eta", "temperature", "auto_temperature", "auto_guidance",
                    "calibrate", "exposure_steps", "exposure_share", "exposure_t", "exposure_target", "exposure_layers",
                    "autoguidance")
        gen = load(args.load_model, **{k: v for k, v in settings.items() if k in sampling})
        if args.worse_model:
            gen.guide_with(load(args.worse_model))
        if args.first_model:
            gen.first_from(load(args.first_model))
        fit_s = float("nan")
        if "exposure_steps" in settings and gen.settings["exposure_steps"]:  # fine-tune the loaded model
            t0 = time.perf_counter()
            gen.exposure(x_train, progress=lambda s, l: print(f"exposure step {s} loss {l:.4f}", file=sys.stderr))
            fit_s = time.perf_counter() - t0
            if args.save_model:  # the fine-tuned model
                torch.save(gen.state_dict(), args.save_model)
        if gen.settings["calibrate"] and "probes" not in gen.stats:
            gen.stats["probes"] = Probes(gen.graph, seed=gen.settings["seed"]).fit(x_train).state()
        if gen.settings["calibrate"] == "readout" and gen.stats["probes"].get("soft") is None:  # an older file's
            gen.stats["probes"] = Probes.load(gen.graph, gen.stats["probes"]).answers(x_train).state()
        if gen.settings["auto_temperature"] and "temperature" not in settings and not args.whole_temperature:
            gen.settings["temperature"] = gen.pick_temperature(x_train)  # (a value given wins)
        if gen.settings["auto_guidance"] and "guidance" not in settings:
            gen.settings["guidance"] = gen.pick_guidance(x_train)
    else:
        gen = NeuronGenerator(run.layout, seed=args.seed, **settings, net=run.net, in_shape=run.prep.shape)
        t0 = time.perf_counter()
        gen.fit(x_train, progress=lambda s, l: print(f"step {s} loss {l:.4f}", file=sys.stderr) if not quick else None,
                checkpoint=args.checkpoint)
        fit_s = time.perf_counter() - t0
        if args.save_model:
            torch.save(gen.state_dict(), args.save_model)
        if args.checkpoint:
            args.checkpoint.unlink(missing_ok=True)
            Path(f"{args.checkpoint}.tmp").unlink(missing_ok=True)  # a kill while writing one leaves it
    if args.whole_temperature:  # whole networks as far from the training networks' mean as an independent one: the
        K = len(train)  # training networks' own distance (to a mean they are part of) times sqrt((K + 1) / (K - 1))
        dist = lambda x: pdiff.products(pdiff.align_to(x, ref_vec, run.layout, spec), ruler.originals, ruler.mean,
                                        ruler.std, ruler.rows)[1].sqrt()
        target = ruler.gram.diagonal().sqrt().median().item() * ((K + 1) / (K - 1)) ** 0.5
        gen.settings["temperature"] = gen.pick_temperature(x_train, whole=(dist, target))
    val = lambda sets: pdiff.validation_accuracy(run, pdiff.Group(len(sets), lambda i: sets[i]), path)

    def pick(make) -> tuple:  # make(i): round i's n raw networks -> (n networks, drawn), as pdiff.generated picks
        if args.min_accuracy is None:
            return make(0), n
        kept, rounds = [], 0
        while sum(map(len, kept)) < n and rounds < pdiff.MAX_ROUNDS:
            sets, rounds = make(rounds), rounds + 1
            kept.append(sets[val(sets) >= args.min_accuracy])
        return torch.cat(kept)[:n], rounds * n

    def alike(sets: torch.Tensor) -> torch.Tensor:  # a baseline's draws, picked by pdiff's own rule (selected)
        if args.min_accuracy is None:
            return sets
        kept = pdiff.selected(run, pdiff.Group(len(sets), lambda i: sets[i]), args.min_accuracy, n, path)
        return kept.make(list(range(kept.n)))

    draws = lambda i, **kw: gen.sample(n, torch.Generator().manual_seed(args.seed + 1 + 1000 * i), **kw)
    t0 = time.perf_counter()
    raw, drawn = pick(draws)
    sample_s = time.perf_counter() - t0
    sets = pdiff.align_to(raw, ref_vec, run.layout, spec)
    if args.save:
        torch.save(sets, args.save)
    chosen = f", {len(sets)} of {drawn} drawn" if args.min_accuracy is not None else ""
    rows["generated (neurons)"] = judge(sets) | {"seconds": f"fit {fit_s:.0f} s, sample {sample_s:.1f} s{chosen}"}
    if gen.settings["calibrate"] and not args.no_ablations:  # ablation: the same networks, not calibrated
        plain, _ = pick(lambda i: draws(i, calibrate=False))
        rows["generated, not calibrated"] = judge(pdiff.align_to(plain, ref_vec, run.layout, spec))
    if gen.settings["mode"] == "layers" and not args.no_ablations:  # diagnostic: held-out layer 1, the rest made
        done = gen.sample(len(held), torch.Generator().manual_seed(args.seed + 3), given=run.snapshots[held], start=1)
        rows["diagnostic: held-out layer 1, rest generated"] = judge(pdiff.align_to(done, ref_vec, run.layout, spec))
    if args.save_model:
        torch.save(gen.state_dict(), args.save_model)

    g = torch.Generator().manual_seed(args.seed + 2)
    m = min(16, len(train))
    if not args.no_baselines:  # each from as many draws as the generated networks took (all kept without selection)
        picks = [torch.randperm(len(train), generator=g)[:m] for _ in range(drawn)]
        avg = torch.stack([x_train[p].mean(0) for p in picks])
        rows[f"average of {m}"] = judge(alike(avg))
        rows["ensemble (weight average)"] = judge(alike(x_train.mean(0, keepdim=True)))
        how = gen.settings["calibrate"]
        cal = how and (lambda x: Probes.load(gen.graph, gen.stats["probes"]).apply(x, how))
        if how:  # the blends given the generated networks' calibration too (bias, or readout refitted)
            rows[f"average of {m}, calibrated"] = judge(alike(cal(avg)))
            rows["ensemble, calibrated"] = judge(alike(cal(x_train.mean(0, keepdim=True))))
        net = gen.graph.net if gen.graph.conv else None  # convolutions: the network itself gives the statistics
        xr = repair_inputs(run, seed=args.seed, flat=net is None)
        st = unit_stats(x_train, run.layout, xr, net)  # each training network's, once
        fixed = torch.stack([repair(a, x_train[p], run.layout, xr, net, [(mu[p], sd[p]) for mu, sd in st])
                             for a, p in zip(avg, picks)])
        rows[f"REPAIR'd average of {m} [data: 500 training images]"] = judge(alike(fixed))
        if how == "readout":  # the best blend given the same readout as well
            rows[f"REPAIR'd average of {m}, calibrated [data: 500 training images]"] = judge(alike(cal(fixed)))
        sd = x_train.std(0)
        gauss = x_train.mean(0) + sd * torch.randn(drawn, x_train.shape[1], generator=g)
        rows["gaussian (per coordinate)"] = judge(alike(gauss))
        if how:
            rows["gaussian, calibrated"] = judge(alike(cal(gauss)))

    print(f"run {args.run}: {len(train)} training / {n_held} held-out networks, D = {run.layout.D}; "
          f"generator {gen.settings}\n")
    if hasattr(gen, "temperature_scores"):
        what = "whole-network distance to" if args.whole_temperature else "hidden-layer-1 spread around"
        print(f"pick_temperature (|log| of generated to training {what} their mean, per temperature): " + ", ".join(
            f"{T:g}: {v:.4f}" for T, v in gen.temperature_scores.items()) + "\n")
    if hasattr(gen, "guidance_scores"):
        print("pick_guidance (mean |log RMS ratio| to the training networks, per weight): " + ", ".join(
            f"{w:g}: {v:.4f}" for w, v in gen.guidance_scores.items()) + "\n")
    print("| group | n | median % | best % | label | to_mean (held-out) | nearest ratio | max IoU | copies | "
          "exact copies | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    h = rows["held-out originals"]
    num = lambda v, f: "-" if v is None or v != v else format(v, f)
    for name, r in rows.items():
        cp = "-" if r["near_copies"] is None else f"{100 * r['near_copies']:.0f} %"
        failed = f", {r['failed']} failed" if r.get("failed") else ""
        print(f"| {name} | {r['n']} | {num(r['median'], '.2f')} | {num(r['best'], '.2f')} | {r.get('label', '-')} | "
              f"{num(r['to_mean'], '.1f')} ({h['to_mean']:.1f}) | {num(r['nearest_ratio'], '.3f')} | "
              f"{num(r['max_iou'], '.3f')} | {cp} | {r.get('copies', '-') if name != 'held-out originals' else '-'} | "
              f"{r.get('seconds', '')}{failed} |")
    gen_row = rows["generated (neurons)"]
    t = gen_row.get("tests", {})
    print("\ngenerated, per test (median vs held-out, Holm p): " + "; ".join(
        f"{k} {v['median']} vs {v['held_out']} p={v['p']:.2g}" for k, v in t.items()))
    base = {k: r for k, r in rows.items() if k not in ("held-out originals", "generated (neurons)",
                                                        "generated, not calibrated") and not k.startswith("diagnostic")}
    v = pdiff.verdict(gen_row, base, n_held, "generated (neurons)", pdiff.reference(run))
    gen_row["verdict"] = v
    print(f"verdict (pdiff.verdict against the rows above; no noise curve here): {v['label']}: {v['text']}")
    if args.rank:
        r = gen_row["rank"] = rank(run, gen, x_train, raw, path)
        print(f"rank (diagnostic, {r['n']} networks): probe agreement vs test accuracy, Spearman {r['rho']:.2f}; "
              f"test median of the top third by it {r['probes']:.2f} %, by validation accuracy "
              f"{r['validation']:.2f} %, a third at random {r['random']:.2f} %")
    return rows


if __name__ == "__main__":
    main()
