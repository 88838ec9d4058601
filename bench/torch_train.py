"""Training throughput of the same model in PyTorch, for bench_torch.sh: the DeepSeek-V3 layout of a
HuggingFace config.json (MLA with q_lora, DeepSeekMoE with sigmoid routing over groups and the
auxiliary-loss-free bias, one MTP module) written the usual way — experts looped over with index
gathers, attention as two batched products — trained with the objective dsv3 trains with (main
cross-entropy + λ · MTP cross-entropy + the sequence-wise balance loss, AdamW, clipping, the bias
update), in fp32 or with bf16 autocast. Prints one line: precision, median step time, tokens/s.

usage: python3 torch_train.py CONFIG fp32|bf16 [--batch 8] [--seq 256] [--steps 6] [--warm 2] [--threads 2]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dt)


def linear(i, o):
    return nn.Linear(i, o, bias=False)


def rope(x, cos, sin):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the position's angles; x (..., T, heads, r)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H, self.nope, self.r, self.v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.L, eps = c["kv_lora_rank"], c["rms_norm_eps"]
        d, qr, qk = c["hidden_size"], c["q_lora_rank"], self.nope + self.r
        self.q_a_proj, self.q_a_layernorm, self.q_b_proj = linear(d, qr), RMSNorm(qr, eps), linear(qr, self.H * qk)
        self.kv_a_proj_with_mqa, self.kv_a_layernorm = linear(d, self.L + self.r), RMSNorm(self.L, eps)
        self.kv_b_proj = linear(self.L, self.H * (self.nope + self.v))
        self.o_proj = linear(self.H * self.v, d)
        self.scale = qk ** -0.5

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, self.H, self.nope + self.r)
        q_nope, q_pe = q.split([self.nope, self.r], -1)
        kva = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kva.split([self.L, self.r], -1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, self.H, self.nope + self.v)
        k_nope, v = kv.split([self.nope, self.v], -1)
        k_pe = rope(k_pe.unsqueeze(2), cos, sin).expand(B, T, self.H, self.r)
        q = torch.cat((q_nope, rope(q_pe, cos, sin)), -1).transpose(1, 2)
        k = torch.cat((k_nope, k_pe), -1).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)).float() * self.scale
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1).to(v.dtype)
        o = (p @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, self.H * self.v)
        return self.o_proj(o)


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f = c["hidden_size"], c["moe_intermediate_size"]
        self.Nr, self.K, self.G, self.kg = c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
        self.scaling = c["routed_scaling_factor"]
        self.experts = nn.ModuleList(SwiGLU(d, f) for _ in range(self.Nr))
        self.shared_experts = SwiGLU(d, f * c["n_shared_experts"])
        self.gate = linear(d, self.Nr)
        self.register_buffer("bias", torch.zeros(self.Nr))  # e_score_correction_bias: steers selection only
        self.load = torch.zeros(self.Nr)

    def forward(self, x, alpha):
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        with torch.autocast("cpu", enabled=False):  # the router stays fp32
            s = torch.sigmoid(F.linear(xf.float(), self.gate.weight.float()))
        with torch.no_grad():
            sel = s + self.bias
            g = sel.view(-1, self.G, self.Nr // self.G).topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(g).scatter_(1, g.topk(self.kg, -1).indices, 1.0)
            masked = sel.masked_fill(keep.repeat_interleave(self.Nr // self.G, 1) == 0, float("-inf"))
            idx = masked.topk(self.K, -1).indices
        w = s.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.scaling
        y = self.shared_experts(xf)
        for e in range(self.Nr):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = y.index_add(0, tok, (self.experts[e](xf[tok]) * w[tok, slot, None]).to(y.dtype))
        self.load += torch.bincount(idx.flatten(), minlength=self.Nr).float()
        # sequence-wise balance loss: α Σ_i f_i P_i per sequence
        f = torch.zeros(B, self.Nr).scatter_add_(1, idx.view(B, -1), torch.ones(B, T * self.K)) * self.Nr / (self.K * T)
        P = (s / s.sum(-1, keepdim=True)).view(B, T, self.Nr).mean(1)
        return y.view(B, T, d), alpha * (f * P).sum(-1).mean()


class Layer(nn.Module):
    def __init__(self, c, moe):
        super().__init__()
        eps = c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps), RMSNorm(c["hidden_size"], eps)
        self.self_attn = MLA(c)
        self.mlp = MoE(c) if moe else SwiGLU(c["hidden_size"], c["intermediate_size"])

    def forward(self, x, cos, sin, alpha):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.post_attention_layernorm(x), alpha)
            return x + y, aux
        return x + self.mlp(self.post_attention_layernorm(x)), 0.0


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, eps, V = c["hidden_size"], c["rms_norm_eps"], c["vocab_size"]
        self.embed_tokens = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Layer(c, i >= c["first_k_dense_replace"]) for i in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(d, eps)
        self.lm_head = linear(d, V)
        # MTP module 1: eh_proj over [enorm(emb) ; hnorm(h)], a decoder layer, its own norm; the
        # embedding and head shared with the main model
        self.enorm, self.hnorm, self.eh_proj = RMSNorm(d, eps), RMSNorm(d, eps), linear(2 * d, d)
        self.mtp_layer, self.mtp_norm = Layer(c, True), RMSNorm(d, eps)
        r = c["qk_rope_head_dim"]
        self.inv_freq = c["rope_theta"] ** (-torch.arange(0, r, 2).float() / r)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=c["initializer_range"])

    def angles(self, T):
        a = torch.arange(T).float()[:, None] * self.inv_freq[None, :]
        return a.cos()[:, None, :], a.sin()[:, None, :]  # (T, 1, r/2): broadcast over heads

    def forward(self, tok, lam, alpha):
        inp, tgt = tok[:, :-1], tok[:, 1:]
        T = inp.shape[1]
        cos, sin = self.angles(T)
        x, aux = self.embed_tokens(inp), 0.0
        for layer in self.layers:
            x, a = layer(x, cos, sin, alpha)
            aux = aux + a
        h = self.norm(x)
        loss = F.cross_entropy(self.lm_head(h).float().flatten(0, 1), tgt.flatten())
        # MTP: row i combines (t_{i+1}, h_i) and predicts t_{i+2}
        m = self.eh_proj(torch.cat((self.enorm(self.embed_tokens(tok[:, 1:T])), self.hnorm(h[:, : T - 1])), -1))
        m, a = self.mtp_layer(m, cos[: T - 1], sin[: T - 1], alpha)
        mtp = F.cross_entropy(self.lm_head(self.mtp_norm(m)).float().flatten(0, 1), tok[:, 2:].flatten())
        return loss + lam * mtp + aux + a


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with open(a.config) as f:
        c = json.load(f)
    torch.manual_seed(1)
    model = Model(c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    moes = [mod for mod in model.modules() if isinstance(mod, MoE)]
    B, T, V = a.batch, a.seq, c["vocab_size"]
    times = []
    for step in range(a.warm + a.steps):
        tok = (torch.arange(B * (T + 1)) * 7919 + step * 104729).remainder(V).view(B, T + 1)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for mod in moes:
            mod.load.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = model(tok, 0.3, 1e-4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing: b_i += γ sign(mean load − load_i)
            for mod in moes:
                mod.bias += 1e-3 * torch.sign(mod.load.mean() - mod.load)
        if step >= a.warm:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(f"pytorch {torch.__version__} {a.precision}: {t:.3f} s per step of {B}x{T}, {B * T / t:.0f} tokens/s "
          f"(threads {torch.get_num_threads()}, loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
