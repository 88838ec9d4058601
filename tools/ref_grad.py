#!/usr/bin/env python3
"""Golden training gradients for dsv3's C training model (src/train), from torch autograd in float64.

For each case this script draws a tiny random DeepSeek-V3/V2 checkpoint and a micro-batch of token
windows, runs an independent float64 implementation of the training objective (SPEC.md §2, §2.3,
§2.4; documented in src/train/train_model.h) and writes, under tests/data/train_grad/<case>/:

  config.json         HF config of the checkpoint
  model.safetensors   the weights, F32 (MTP copies of the embedding and head included, byte-identical)
  grads.safetensors   d(loss)/d(weight) for every trained tensor, F32 (same names; the MTP copies and
                      e_score_correction_bias are not trained tensors and are left out)
  golden.json         made_by, case, B, T, tokens (B windows of T+1 ids), mtp_lambda, seq_aux_alpha,
                      losses {loss, main, mtp, balance}, routing margins, seed

The objective: main = mean CE over B*T positions; mtp = (1/D) sum_k mean CE of module k over its
B*(T-k) rows (module k combines Emb(t[i+k]) with h^{k-1}[i], h^0 = main output after model.norm,
h^k = module k output after shared_head.norm, and predicts t[i+k+1]); balance = sum over MoE layers
(main, then MTP) of the mean over sequences of alpha * sum_i f_i P_i (f constant); loss = main +
lambda * mtp + balance. Expert selection is not differentiated; gates flow into the router.

Seeds are redrawn until every routing decision (group choice and expert choice) has a float64 margin
above 1e-3, so float32 arithmetic makes the same choices, and every expert receives a token. Run with Debian's python3-torch:

    /usr/bin/python3 tools/ref_grad.py            # all cases  (--case v3 ...)

Deterministic: the same files every run.
"""
import argparse
import json
import math
import os
import struct

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "train_grad")

BASE = dict(rope_theta=10000.0, rms_norm_eps=1e-6, moe_layer_freq=1, bos_token_id=0, eos_token_id=1,
            max_position_embeddings=64, hidden_act="silu", attention_bias=False, initializer_range=0.02,
            torch_dtype="float32", use_cache=True)

CASES = {
    # V3: q_lora, sigmoid + noaux_tc with a non-zero bias, 4 groups keep 2 (top-2 sums), normalised
    # gates x 2.5, 1 shared expert, layer 0 dense, YaRN, one MTP module
    "v3": dict(model_type="deepseek_v3", vocab_size=48, hidden_size=24, num_hidden_layers=2, first_k_dense_replace=1,
               intermediate_size=32, moe_intermediate_size=8, num_attention_heads=2, q_lora_rank=12,
               kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
               n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="noaux_tc",
               scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
               rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
               tie_word_embeddings=False, B=2, T=7, mtp_lambda=0.3, seq_aux_alpha=0.05),
    # V2-Lite: plain q_proj, softmax + greedy, no bias, 2 shared experts, raw gates, no MTP, v != nope
    "v2lite": dict(model_type="deepseek_v2", vocab_size=40, hidden_size=24, num_hidden_layers=2,
                   first_k_dense_replace=1, intermediate_size=32, moe_intermediate_size=8, num_attention_heads=2,
                   q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6,
                   n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1,
                   topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                   num_nextn_predict_layers=0, rope_scaling=None, tie_word_embeddings=False, B=2, T=6,
                   mtp_lambda=0.0, seq_aux_alpha=0.05),
    # two chained MTP modules, tied embeddings, softmax + group_limited_greedy, every layer MoE
    "mtp2": dict(model_type="deepseek_v3", vocab_size=32, hidden_size=16, num_hidden_layers=1,
                 first_k_dense_replace=0, intermediate_size=24, moe_intermediate_size=6, num_attention_heads=2,
                 q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=True,
                 routed_scaling_factor=1.5, num_nextn_predict_layers=2, rope_scaling=None, tie_word_embeddings=True,
                 B=2, T=6, mtp_lambda=0.5, seq_aux_alpha=0.1),
}


def tensor_list(c):
    """(name, shape, kind) in the order of src/model/tensors.c; kind: linear, embed, router, norm, bias."""
    d, H = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = []

    def ffn(p, inter):
        out.extend([(p + ".gate_proj.weight", (inter, d), "linear"), (p + ".up_proj.weight", (inter, d), "linear"),
                    (p + ".down_proj.weight", (d, inter), "linear")])

    def layer(i):
        p = "model.layers.%d" % i
        out.append((p + ".input_layernorm.weight", (d,), "norm"))
        if c["q_lora_rank"]:
            out.append((p + ".self_attn.q_a_proj.weight", (c["q_lora_rank"], d), "linear"))
            out.append((p + ".self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), "norm"))
            out.append((p + ".self_attn.q_b_proj.weight", (H * qk, c["q_lora_rank"]), "linear"))
        else:
            out.append((p + ".self_attn.q_proj.weight", (H * qk, d), "linear"))
        out.append((p + ".self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], d), "linear"))
        out.append((p + ".self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],), "norm"))
        out.append((p + ".self_attn.kv_b_proj.weight", (H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), "linear"))
        out.append((p + ".self_attn.o_proj.weight", (d, H * c["v_head_dim"]), "linear"))
        out.append((p + ".post_attention_layernorm.weight", (d,), "norm"))
        if not is_moe(c, i):
            ffn(p + ".mlp", c["intermediate_size"])
            return
        out.append((p + ".mlp.gate.weight", (c["n_routed_experts"], d), "router"))
        if c["topk_method"] == "noaux_tc":
            out.append((p + ".mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), "bias"))
        for e in range(c["n_routed_experts"]):
            ffn(p + ".mlp.experts.%d" % e, c["moe_intermediate_size"])
        if c["n_shared_experts"]:
            ffn(p + ".mlp.shared_experts", c["n_shared_experts"] * c["moe_intermediate_size"])

    V = c["vocab_size"]
    out.append(("model.embed_tokens.weight", (V, d), "embed"))
    for i in range(c["num_hidden_layers"]):
        layer(i)
    for k in range(c["num_nextn_predict_layers"]):
        li = c["num_hidden_layers"] + k
        out.append(("model.layers.%d.embed_tokens.weight" % li, (V, d), "copy_embed"))
        out.append(("model.layers.%d.enorm.weight" % li, (d,), "norm"))
        out.append(("model.layers.%d.hnorm.weight" % li, (d,), "norm"))
        out.append(("model.layers.%d.eh_proj.weight" % li, (d, 2 * d), "linear"))
        layer(li)
        out.append(("model.layers.%d.shared_head.norm.weight" % li, (d,), "norm"))
        out.append(("model.layers.%d.shared_head.head.weight" % li, (V, d), "copy_head"))
    out.append(("model.norm.weight", (d,), "norm"))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (V, d), "embed"))
    return out


def is_moe(c, i):
    return c["n_routed_experts"] > 0 and i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0


def draw_weights(c, rng):
    """float32 numpy weights: linears ~ N(0, 1/sqrt(fan_in)) so activations stay O(1), embedding and head
    N(0, 0.3), norms 1 + N(0, 0.2), router bias N(0, 0.1)."""
    w = {}
    for name, shape, kind in tensor_list(c):
        if kind.startswith("copy"):
            continue
        if kind == "norm":
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif kind == "bias":
            a = 0.1 * rng.standard_normal(shape)
        elif kind == "embed":
            a = 0.3 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / math.sqrt(shape[1])
        w[name] = a.astype(np.float32)
    return w


def yarn_m(factor, mscale):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(c, T):
    r = c["qk_rope_head_dim"]
    theta = c["rope_theta"]
    freq = np.array([theta ** (-2.0 * i / r) for i in range(r // 2)])
    rs = c.get("rope_scaling")
    factor = rs["factor"] if rs else 1.0
    mscale = 1.0
    if rs and factor > 1:
        L0 = rs["original_max_position_embeddings"]

        def corr(n):
            return r * math.log(L0 / (2 * math.pi * n)) / (2 * math.log(theta))

        low = max(math.floor(corr(rs.get("beta_fast", 32))), 0)
        high = min(math.ceil(corr(rs.get("beta_slow", 1))), r - 1)
        if high == low:
            high += 0.001
        ramp = np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
        freq = freq / factor * ramp + freq * (1 - ramp)
        mscale = yarn_m(factor, rs.get("mscale", 1.0)) / yarn_m(factor, rs.get("mscale_all_dim", 0.0))
    ang = np.outer(np.arange(T), freq)
    return torch.tensor(np.cos(ang) * mscale), torch.tensor(np.sin(ang) * mscale)


def softmax_scale(c):
    s = 1.0 / math.sqrt(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    rs = c.get("rope_scaling")
    if rs and rs["factor"] > 1:
        m = yarn_m(rs["factor"], rs.get("mscale_all_dim", 0.0))
        s *= m * m
    return s


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, cos, sin):
    """x (..., T, [heads,] r): interleaved pairs rotated by position; cos/sin (T, r/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    if x.dim() == 4:  # (B, T, H, r)
        cos, sin = cos[:, None, :], sin[:, None, :]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack([y0, y1], dim=-1).flatten(-2)


def route(c, logits, bias, margins):
    """logits (n, N_r) → scores s (n, N_r) and the chosen experts (n, K), chosen from detached values."""
    if c["scoring_func"] == "sigmoid":
        s = torch.sigmoid(logits)
    else:
        s = torch.softmax(logits, dim=-1)
    sel = s.detach().clone()
    if c["topk_method"] == "noaux_tc" and bias is not None:
        sel = sel + bias.detach()
    n, Nr = sel.shape
    G, K = c["n_group"], c["num_experts_per_tok"]
    allowed = torch.ones(n, Nr, dtype=torch.bool)
    if c["topk_method"] != "greedy" and G > 1:
        g = sel.view(n, G, Nr // G)
        if c["topk_method"] == "noaux_tc":
            gs = g.topk(2, dim=-1).values.sum(-1)
        else:
            gs = g.max(dim=-1).values
        order = gs.sort(dim=-1, descending=True).values
        tg = c["topk_group"]
        margins.extend((order[:, tg - 1] - order[:, tg]).tolist())
        keep = gs.topk(tg, dim=-1).indices
        gmask = torch.zeros(n, G, dtype=torch.bool)
        gmask.scatter_(1, keep, True)
        allowed = gmask.repeat_interleave(Nr // G, dim=1)
    masked = torch.where(allowed, sel, torch.full_like(sel, -1e30))
    order = masked.sort(dim=-1, descending=True).values
    if K < int(allowed[0].sum()):
        margins.extend((order[:, K - 1] - order[:, K]).tolist())
    idx = masked.topk(K, dim=-1).indices
    return s, idx


def swiglu_ffn(p, x, w):
    return (torch.nn.functional.silu(x @ w[p + ".gate_proj.weight"].T) * (x @ w[p + ".up_proj.weight"].T)) @ w[p + ".down_proj.weight"].T


def decoder_layer(c, w, i, x, cos, sin, margins, balances, alpha):
    """x (B, T, d) → (B, T, d); appends this layer's balance loss (mean over sequences) to balances."""
    p = "model.layers.%d" % i
    B, T, d = x.shape
    H, nope, r, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    L, eps = c["kv_lora_rank"], c["rms_norm_eps"]
    h = rms(x, w[p + ".input_layernorm.weight"], eps)
    if c["q_lora_rank"]:
        q = rms(h @ w[p + ".self_attn.q_a_proj.weight"].T, w[p + ".self_attn.q_a_layernorm.weight"], eps)
        q = q @ w[p + ".self_attn.q_b_proj.weight"].T
    else:
        q = h @ w[p + ".self_attn.q_proj.weight"].T
    q = q.view(B, T, H, nope + r)
    q_nope, q_pe = q[..., :nope], rope(q[..., nope:], cos[:T], sin[:T])
    kva = h @ w[p + ".self_attn.kv_a_proj_with_mqa.weight"].T
    ckv = rms(kva[..., :L], w[p + ".self_attn.kv_a_layernorm.weight"], eps)
    k_pe = rope(kva[..., L:], cos[:T], sin[:T])  # (B, T, r), one key shared by the heads
    kv = (ckv @ w[p + ".self_attn.kv_b_proj.weight"].T).view(B, T, H, nope + v)
    k_nope, val = kv[..., :nope], kv[..., nope:]
    scores = (torch.einsum("bthi,bshi->bhts", q_nope, k_nope) + torch.einsum("bthi,bsi->bhts", q_pe, k_pe)) * softmax_scale(c)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshi->bthi", probs, val).reshape(B, T, H * v)
    x = x + o @ w[p + ".self_attn.o_proj.weight"].T
    h = rms(x, w[p + ".post_attention_layernorm.weight"], eps)
    if not is_moe(c, i):
        return x + swiglu_ffn(p + ".mlp", h, w)
    flat = h.reshape(B * T, d)
    s, idx = route(c, flat @ w[p + ".mlp.gate.weight"].T, w.get(p + ".mlp.gate.e_score_correction_bias"), margins)
    gates = s.gather(1, idx)
    if c["norm_topk_prob"]:
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
    gates = gates * c["routed_scaling_factor"]
    y = torch.zeros_like(flat)
    for e in range(c["n_routed_experts"]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            y = y.index_add(0, rows, gates[rows, slot][:, None] * swiglu_ffn(p + ".mlp.experts.%d" % e, flat[rows], w))
    if c["n_shared_experts"]:
        y = y + swiglu_ffn(p + ".mlp.shared_experts", flat, w)
    if alpha > 0:
        Nr, K = c["n_routed_experts"], c["num_experts_per_tok"]
        per_seq = []
        for b in range(B):
            sb, ib = s[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
            counts = torch.zeros(Nr).index_add(0, ib.reshape(-1), torch.ones(ib.numel()))
            f = (Nr / (K * T)) * counts  # a constant: no gradient
            P = (sb / sb.sum(-1, keepdim=True)).mean(0)
            per_seq.append(alpha * (f * P).sum())
        balances.append(torch.stack(per_seq).mean())
    return x + y.view(B, T, d)


def objective(c, w, tokens, lam, alpha):
    """Returns (loss, parts, margins); tokens (B, T+1) long."""
    B, T1 = tokens.shape
    T = T1 - 1
    eps = c["rms_norm_eps"]
    cos, sin = rope_tables(c, T)
    margins, balances = [], []
    emb = w["model.embed_tokens.weight"]
    head = emb if c["tie_word_embeddings"] else w["lm_head.weight"]
    x = emb[tokens[:, :T]]
    for i in range(c["num_hidden_layers"]):
        x = decoder_layer(c, w, i, x, cos, sin, margins, balances, alpha)
    h = rms(x, w["model.norm.weight"], eps)
    ce = torch.nn.functional.cross_entropy
    V = c["vocab_size"]
    main = ce((h @ head.T).reshape(-1, V), tokens[:, 1:].reshape(-1))
    D = c["num_nextn_predict_layers"]
    mtp = torch.zeros(())
    if D > 0 and lam > 0:
        for k in range(1, D + 1):
            li = c["num_hidden_layers"] + k - 1
            p = "model.layers.%d" % li
            Tk = T - k
            e = rms(emb[tokens[:, k:k + Tk]], w[p + ".enorm.weight"], eps)
            hh = rms(h[:, :Tk], w[p + ".hnorm.weight"], eps)
            xk = torch.cat([e, hh], dim=-1) @ w[p + ".eh_proj.weight"].T  # the embedding half first
            xk = decoder_layer(c, w, li, xk, cos, sin, margins, balances, alpha)
            h = rms(xk, w[p + ".shared_head.norm.weight"], eps)
            mtp = mtp + ce((h @ head.T).reshape(-1, V), tokens[:, k + 1:k + 1 + Tk].reshape(-1))
        mtp = mtp / D
    balance = torch.stack(balances).sum() if balances else torch.zeros(())
    loss = main + lam * mtp + balance
    return loss, dict(main=main.item(), mtp=mtp.item(), balance=balance.item(), loss=loss.item()), margins


def write_safetensors(path, tensors):
    header, off, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_case(name):
    spec = dict(CASES[name])
    B, T, lam, alpha = spec.pop("B"), spec.pop("T"), spec.pop("mtp_lambda"), spec.pop("seq_aux_alpha")
    c = dict(BASE)
    c.update(spec)
    c["architectures"] = ["DeepseekV3ForCausalLM" if c["model_type"] == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    for seed in range(1000):
        rng = np.random.default_rng(1000 * (list(CASES).index(name) + 1) + seed)
        w32 = draw_weights(c, rng)
        tokens = rng.integers(2, c["vocab_size"], size=(B, T + 1))
        tokens[:, 0] = c["bos_token_id"]
        w = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in w32.items()}
        loss, parts, margins = objective(c, w, torch.tensor(tokens), lam, alpha)
        loss.backward()
        # every expert must receive a token (else its gradient is trivially zero)
        unused = [k for k, t in w.items() if t.grad is None and not k.endswith("e_score_correction_bias")]
        if min(margins) > 1e-3 and not unused:
            break
    else:
        raise SystemExit("%s: no seed gives routing margins above 1e-3 with every expert used" % name)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    model = dict(w32)
    for tname, shape, kind in tensor_list(c):
        if kind == "copy_embed":
            model[tname] = w32["model.embed_tokens.weight"]
        elif kind == "copy_head":
            model[tname] = w32["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
    write_safetensors(os.path.join(out, "model.safetensors"), model)
    grads = {k: t.grad.numpy() for k, t in w.items() if not k.endswith("e_score_correction_bias")}
    write_safetensors(os.path.join(out, "grads.safetensors"), grads)
    golden = dict(made_by="tools/ref_grad.py", reference="torch %s autograd, float64" % torch.__version__.split("+")[0],
                  case=name, seed=int(1000 * (list(CASES).index(name) + 1) + seed), B=B, T=T,
                  tokens=tokens.tolist(), mtp_lambda=lam, seq_aux_alpha=alpha, losses=parts,
                  min_routing_margin=min(margins), routing_decisions=len(margins))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
        f.write("\n")
    print("%s: loss %.6f (main %.6f, mtp %.6f, balance %.6f), min margin %.2e" %
          (name, parts["loss"], parts["main"], parts["mtp"], parts["balance"], min(margins)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES))
    args = ap.parse_args()
    for name in args.case or list(CASES):
        make_case(name)


if __name__ == "__main__":
    main()
