#!/usr/bin/python3
"""Independent numpy reference of the DeepSeek-V3 / V2 forward pass (float64 throughout).

It reads a HuggingFace model directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json), dequantises every stored tensor to float64 exactly (F32, BF16, F16,
F8_E4M3 with a 128x128 block `<name>_scale_inv`), and runs the forward pass of SPEC.md section 2:
embedding, RMSNorm, MLA (plain, non-absorbed), RoPE on interleaved pairs with YaRN, dense SwiGLU,
DeepSeekMoE with the V3 (sigmoid + noaux_tc) and V2 (softmax + greedy / group_limited_greedy)
routers, final norm, lm_head, and the multi-token-prediction modules (section 2.3).

It is written to be read: one function per op, the shapes in comments, no torch, no absorption,
no caching. It is the oracle the C implementation is tested against (tests/data, made by
tools/make_golden.py). Only the Python standard library and numpy are used.

CLI:
    /usr/bin/python3 tools/ref_model.py --model DIR --tokens 1,2,3 --out FILE [--mtp-out FILE]
writes the prefill logits as raw little-endian float32 [T][vocab]; --mtp-out writes the MTP
logits of module 1 [T-1][vocab], followed (when num_nextn_predict_layers > 1) by module k's
[T-k][vocab] rows for k = 2..D.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

# ---------------------------------------------------------------------------------------------
# Number formats
# ---------------------------------------------------------------------------------------------


def bf16_bits_to_f64(bits):
    """uint16 BF16 bit patterns -> float64 (exact: BF16 is the top half of an fp32)."""
    u32 = bits.astype(np.uint32) << np.uint32(16)
    return u32.view(np.float32).astype(np.float64)


def f64_to_bf16_bits(x):
    """float64 -> BF16 bits: first to fp32 (RNE), then fp32 -> BF16 round-to-nearest-even."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float64).astype(np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _e4m3_table():
    """The 256 E4M3 ("e4m3fn") code values: 1 sign, 4 exponent (bias 7), 3 mantissa bits.
    Exponent field 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN; there is no infinity."""
    t = np.empty(256, dtype=np.float64)
    for code in range(256):
        s = -1.0 if code & 0x80 else 1.0
        e = (code >> 3) & 0xF
        m = code & 0x7
        if e == 0xF and m == 0x7:
            t[code] = np.nan
        elif e == 0:
            t[code] = s * (m / 8.0) * 2.0 ** -6
        else:
            t[code] = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


E4M3_VALUES = _e4m3_table()
E4M3_MAX = 448.0
# Codes 0..126 are the non-negative finite values, strictly increasing with the code.
_E4M3_POS = E4M3_VALUES[:127].copy()


def e4m3_decode(codes):
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def e4m3_encode(x):
    """float64 -> E4M3 codes (uint8): round to nearest, ties to even (the even code, i.e. even
    mantissa), saturating to +-448. NaN input -> 0x7F."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.searchsorted(_E4M3_POS, a, side="left")          # first value >= a
    hi = np.minimum(hi, 126)
    lo = np.maximum(hi - 1, 0)
    vlo, vhi = _E4M3_POS[lo], _E4M3_POS[hi]
    exact = vhi == a
    dlo, dhi = a - vlo, vhi - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(exact, hi, np.where(pick_hi, hi, lo)).astype(np.uint8)
    code = np.where(np.signbit(x) & (code != 0), code | 0x80, code).astype(np.uint8)
    code = np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)
    return code


def fp8_block_dequant(codes, scale_inv, block=128):
    """W[r, c] = e4m3(codes[r, c]) * scale_inv[r // 128, c // 128] (edge blocks partial)."""
    w = e4m3_decode(codes)
    rows, cols = w.shape
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float64), block, axis=0), block, axis=1)
    return w * s[:rows, :cols]


# ---------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw little-endian data
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "F8_E4M3": np.uint8, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def read_safetensors(path):
    """Returns {name: (dtype_string, numpy array of the stored type)} (BF16 as uint16 bits,
    F8_E4M3 as uint8 codes)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError("%s: unsupported dtype %s" % (name, dt))
        b, e = info["data_offsets"]
        npdt = np.dtype(_ST_DTYPES[dt]).newbyteorder("<")
        arr = np.frombuffer(data[base + b:base + e], dtype=npdt).reshape(info["shape"])
        out[name] = (dt, arr)
    return out


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: (dtype_string, numpy array already of the stored type)}. Tensors are
    written in name order; the header is padded with spaces to a multiple of 8 bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, off = [], 0
    for name in sorted(tensors):
        dt, arr = tensors[name]
        npdt = np.dtype(_ST_DTYPES[dt]).newbyteorder("<")
        raw = np.ascontiguousarray(arr.astype(npdt)).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def stored_to_f64(dt, arr):
    if dt == "BF16":
        return bf16_bits_to_f64(arr)
    if dt == "F8_E4M3":
        return e4m3_decode(arr)
    return arr.astype(np.float64)


def load_weights(model_dir):
    """All tensors of a model directory as float64, FP8 weights dequantised with their
    `<name>_scale_inv` (the scale tensors themselves are consumed)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wmap = json.load(f)["weight_map"]
        files = sorted(set(wmap.values()))
    else:
        wmap, files = None, ["model.safetensors"]
    raw = {}
    for fn in files:
        part = read_safetensors(os.path.join(model_dir, fn))
        for name, v in part.items():
            if wmap is not None and wmap.get(name) != fn:
                raise ValueError("%s found in %s but the index says %s" % (name, fn, wmap.get(name)))
            raw[name] = v
    if wmap is not None:
        missing = set(wmap) - set(raw)
        if missing:
            raise ValueError("tensors in the index but in no shard: %s" % sorted(missing)[:5])
    w = {}
    for name, (dt, arr) in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if dt == "F8_E4M3":
            sdt, sarr = raw[name + "_scale_inv"]
            rows, cols = arr.shape
            assert sarr.shape == ((rows + 127) // 128, (cols + 127) // 128), name
            w[name] = fp8_block_dequant(arr, stored_to_f64(sdt, sarr))
        else:
            w[name] = stored_to_f64(dt, arr)
    return w


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    """x [T, d] -> x / sqrt(mean(x^2) + eps) * w."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def linear(x, w):
    """x [T, in], w [out, in] (HF layout) -> [T, out]."""
    return x @ w.T


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def yarn_get_mscale(scale, mscale):
    """m = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(beta_fast, beta_slow, dim, base, orig_max_pos):
    def corr_dim(n):
        return dim * math.log(orig_max_pos / (n * 2.0 * math.pi)) / (2.0 * math.log(base))
    low = math.floor(corr_dim(beta_fast))
    high = math.ceil(corr_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_params(cfg):
    """Returns (inv_freq [r/2], cos_sin_factor, softmax_scale) for the MLA of this config."""
    r = cfg["qk_rope_head_dim"]
    theta = float(cfg.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (np.arange(0, r, 2, dtype=np.float64) / r)      # f_i, i < r/2
    q_head_dim = cfg["qk_nope_head_dim"] + r
    softmax_scale = q_head_dim ** -0.5
    cs_factor = 1.0
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise NotImplementedError("rope_scaling type %r" % kind)
        factor = float(rs["factor"])
        low, high = yarn_correction_range(float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1)),
                                          r, theta, float(rs["original_max_position_embeddings"]))
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1.0 - ramp)
        mscale = float(rs.get("mscale", 1.0))
        mscale_all = float(rs.get("mscale_all_dim", 0.0))
        cs_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
        m = yarn_get_mscale(factor, mscale_all)
        softmax_scale = softmax_scale * m * m
    return inv_freq, cs_factor, softmax_scale


def apply_rope_interleaved(x, positions, inv_freq, cs_factor):
    """x [T, ..., r]: rotate the interleaved pairs (x[2i], x[2i+1]) by angle pos * f_i; cos and
    sin carry the YaRN factor m(mscale)/m(mscale_all_dim)."""
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]      # [T, r/2]
    cos = np.cos(ang) * cs_factor
    sin = np.sin(ang) * cs_factor
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (inv_freq.shape[0],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * cos - xo * sin
    out[..., 1::2] = xe * sin + xo * cos
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Model:
    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.w = weights
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.inv_freq, self.cs_factor, self.softmax_scale = rope_params(cfg)
        self.trace = None   # when a list, router decisions are appended to it

    @classmethod
    def from_dir(cls, model_dir):
        return cls(load_config(model_dir), load_weights(model_dir))

    # -- attention ---------------------------------------------------------------------------

    def mla(self, p, x, positions):
        """Multi-head latent attention, plain (non-absorbed) form. x [T, d] -> [T, d]."""
        c, w = self.cfg, self.w
        T = x.shape[0]
        H = c["num_attention_heads"]
        dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        kvr = c["kv_lora_rank"]
        if c.get("q_lora_rank"):
            cq = rms_norm(linear(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], self.eps)
            q = linear(cq, w[p + "q_b_proj.weight"])                               # [T, H*(dn+dr)]
        else:
            q = linear(x, w[p + "q_proj.weight"])
        q = q.reshape(T, H, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        kv_a = linear(x, w[p + "kv_a_proj_with_mqa.weight"])                      # [T, kvr+dr]
        c_kv, k_pe = kv_a[:, :kvr], kv_a[:, kvr:]
        c_kv = rms_norm(c_kv, w[p + "kv_a_layernorm.weight"], self.eps)
        kv = linear(c_kv, w[p + "kv_b_proj.weight"]).reshape(T, H, dn + dv)         # per head [k_nope | v]
        k_nope, v = kv[..., :dn], kv[..., dn:]
        q_pe = apply_rope_interleaved(q_pe, positions, self.inv_freq, self.cs_factor)  # [T, H, dr]
        k_pe = apply_rope_interleaved(k_pe, positions, self.inv_freq, self.cs_factor)  # [T, dr], shared
        scores = (np.einsum("thd,shd->hts", q_nope, k_nope)
                  + np.einsum("thd,sd->hts", q_pe, k_pe)) * self.softmax_scale       # [H, T, T]
        causal = np.tril(np.ones((T, T), dtype=bool))
        scores = np.where(causal[None], scores, -np.inf)
        probs = softmax(scores, axis=-1)
        o = np.einsum("hts,shd->thd", probs, v).reshape(T, H * dv)
        return linear(o, w[p + "o_proj.weight"])

    # -- feed-forward ------------------------------------------------------------------------

    def swiglu(self, p, x):
        w = self.w
        return linear(silu(linear(x, w[p + "gate_proj.weight"])) * linear(x, w[p + "up_proj.weight"]),
                      w[p + "down_proj.weight"])

    def is_moe_layer(self, layer):
        c = self.cfg
        return (bool(c.get("n_routed_experts")) and layer >= c.get("first_k_dense_replace", 0)
                and layer % c.get("moe_layer_freq", 1) == 0)

    def route(self, logits, bias):
        """Router of one token. logits [N_r] -> (expert ids, gate weights, decision record)."""
        return route(self.cfg, logits, bias)

    def moe(self, p, x, layer):
        c, w = self.cfg, self.w
        logits = linear(x, w[p + "gate.weight"])                                    # [T, N_r]
        bias = w.get(p + "gate.e_score_correction_bias")
        y = np.zeros_like(x)
        for t in range(x.shape[0]):
            ids, gates, rec = self.route(logits[t], bias)
            if self.trace is not None:
                rec["layer"], rec["pos"] = layer, t
                self.trace.append(rec)
            for e, g in zip(ids, gates):
                y[t] += g * self.swiglu(p + "experts.%d." % e, x[t:t + 1])[0]
        if c.get("n_shared_experts"):
            y += self.swiglu(p + "shared_experts.", x)
        return y

    # -- decoder layer -----------------------------------------------------------------------

    def decoder_layer(self, layer, x, positions):
        w, p = self.w, "model.layers.%d." % layer
        x = x + self.mla(p + "self_attn.", rms_norm(x, w[p + "input_layernorm.weight"], self.eps), positions)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
        if self.is_moe_layer(layer):
            x = x + self.moe(p + "mlp.", h, layer)
        else:
            x = x + self.swiglu(p + "mlp.", h)
        return x

    def forward(self, tokens):
        """Main model. tokens [T] -> (logits [T, V], h [T, d] = output AFTER model.norm)."""
        w = self.w
        tokens = np.asarray(tokens, dtype=np.int64)
        x = w["model.embed_tokens.weight"][tokens]
        positions = np.arange(len(tokens))
        for layer in range(self.cfg["num_hidden_layers"]):
            x = self.decoder_layer(layer, x, positions)
        h = rms_norm(x, w["model.norm.weight"], self.eps)
        return linear(h, w["lm_head.weight"]), h

    def mtp(self, tokens, h_main):
        """MTP modules (SPEC 2.3). Returns a list over k = 1..D of logits [T-k, V].
        Module k (HF layer L = num_hidden_layers + k - 1), row i (i = 0..T-1-k):
            h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])   (embedding half first)
        then a full decoder layer over the rows causally at RoPE positions 0..T-1-k, then
        shared_head.norm and shared_head.head; row i predicts t_{i+k+1}. h^0 = main output after
        model.norm; h^k (passed to module k+1) = module k's output after shared_head.norm."""
        w, c = self.w, self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        outs, h_prev = [], h_main
        for k in range(1, c.get("num_nextn_predict_layers", 0) + 1):
            L = c["num_hidden_layers"] + k - 1
            p = "model.layers.%d." % L
            n = T - k
            if n <= 0:
                break
            emb = w[p + "embed_tokens.weight"][tokens[k:k + n]]                    # [n, d]
            e = rms_norm(emb, w[p + "enorm.weight"], self.eps)
            hh = rms_norm(h_prev[:n], w[p + "hnorm.weight"], self.eps)
            x = linear(np.concatenate([e, hh], axis=-1), w[p + "eh_proj.weight"])  # [n, d]
            x = self.decoder_layer(L, x, np.arange(n))
            hk = rms_norm(x, w[p + "shared_head.norm.weight"], self.eps)
            outs.append(linear(hk, w[p + "shared_head.head.weight"]))
            h_prev = hk
        return outs


def route(cfg, logits, bias=None):
    """DeepSeekMoE router for one token (SPEC 2.2). logits [N_r] (float64).
    Returns (ids, weights, record) where record holds the selection margins used by
    tools/make_golden.py to reject near-ties."""
    N = logits.shape[0]
    K = cfg["num_experts_per_tok"]
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or n_group
    method = cfg.get("topk_method", "greedy")
    sf = cfg.get("scoring_func", "softmax")
    if sf == "sigmoid":
        s = sigmoid(logits)
    elif sf == "softmax":
        s = softmax(logits)
    else:
        raise NotImplementedError(sf)
    rec = {"method": method}
    if method == "noaux_tc":
        sel = s + (bias if bias is not None else 0.0)
        gsize = N // n_group
        g = sel.reshape(n_group, gsize)
        group_scores = np.sort(g, axis=-1)[:, -2:].sum(-1)      # sum of the top-2 of each group
    elif method == "group_limited_greedy":
        sel = s
        gsize = N // n_group
        group_scores = sel.reshape(n_group, gsize).max(-1)
    elif method == "greedy":
        sel = s
        group_scores = None
    else:
        raise NotImplementedError(method)
    cand = np.ones(N, dtype=bool)
    if group_scores is not None and n_group > 1 and topk_group < n_group:
        order = np.argsort(-group_scores, kind="stable")
        kept = order[:topk_group]
        gs = np.sort(group_scores)[::-1]
        rec["group_margin"] = float(gs[topk_group - 1] - gs[topk_group])
        gmask = np.zeros(n_group, dtype=bool)
        gmask[kept] = True
        cand = np.repeat(gmask, N // n_group)
    masked = np.where(cand, sel, -np.inf)
    ids = np.argsort(-masked, kind="stable")[:K]
    cs = np.sort(sel[cand])[::-1]
    if cs.shape[0] > K:
        rec["expert_margin"] = float(cs[K - 1] - cs[K])
    # Gate weights come from the ORIGINAL scores s (the V3 bias only steers selection),
    # renormalised to sum 1 when norm_topk_prob, then times routed_scaling_factor.
    # (HF's V2 code skips the factor when norm_topk_prob is true; every V2 config we test has
    # norm_topk_prob false, where both readings agree.)
    weights = s[ids]
    if K > 1 and cfg.get("norm_topk_prob", False):
        weights = weights / weights.sum()
    weights = weights * float(cfg.get("routed_scaling_factor", 1.0))
    rec["ids"] = [int(i) for i in ids]
    # coverage facts (used by make_golden.py to make sure the features matter)
    if group_scores is not None and n_group > 1 and topk_group < n_group:
        rec["changed_by_group_limit"] = set(np.argsort(-sel, kind="stable")[:K]) != set(ids)
    if method == "noaux_tc" and bias is not None:
        rec["changed_by_bias"] = set(route(cfg, logits, None)[0]) != set(ids)
    return ids, weights, rec


def run(model_dir, tokens):
    """-> (logits [T, V], [mtp logits of module k, [T-k, V]], model)."""
    m = Model.from_dir(model_dir)
    logits, h = m.forward(tokens)
    return logits, m.mtp(tokens, h), m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--out", required=True, help="logits, raw float32 LE [T][vocab]")
    ap.add_argument("--mtp-out", help="MTP logits, raw float32 LE [T-1][vocab] (module 1, then k=2..D)")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",") if t.strip() != ""]
    m = Model.from_dir(a.model)
    logits, h = m.forward(tokens)
    logits.astype("<f4").tofile(a.out)
    if a.mtp_out:
        outs = m.mtp(tokens, h)
        if not outs:
            sys.exit("--mtp-out: this model has no MTP module (num_nextn_predict_layers = 0)")
        np.concatenate(outs, axis=0).astype("<f4").tofile(a.mtp_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
