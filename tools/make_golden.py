#!/usr/bin/python3
"""Makes the golden test data in tests/data/<case>/: small random DeepSeek-V3/V2 checkpoints in
HuggingFace format and their logits from the numpy reference tools/ref_model.py (float64).

    /usr/bin/python3 tools/make_golden.py [--out tests/data] [--case NAME ...]

Deterministic: every case draws its weights and tokens from numpy's default_rng(seed). A seed is
accepted only when, in float64, every position's top-1 logit beats the top-2 by more than
3e-3 * max|logit| of the row (main and MTP rows), and every router decision (the topk_group-th
vs the next group score, the K-th vs the (K+1)-th expert selection score among the candidates)
has a margin above 1e-3, and the routing features are exercised (the bias, where there is one,
and the group limit, where there is one, change the chosen experts of at least one token);
otherwise the next seed is tried. The seed used is recorded in golden.json. See tests/data/README.md for the cases and the file formats.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_model as R  # noqa: E402

LOGIT_GAP_REL = 3e-3
ROUTE_MARGIN = 1e-3
MAX_ATTEMPTS = 200

V3_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096, "type": "yarn"}
FP8_QCFG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}


def hf_config(**kw):
    """A complete HF-style DeepSeek config (V3 defaults, every key of SPEC section 1)."""
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "kv_lora_rank": 32,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 10,
        "moe_layer_freq": 1,
        "n_group": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(V3_YARN),
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": 16,
        "vocab_size": 256,
    }
    c.update(kw)
    c["num_key_value_heads"] = c["num_attention_heads"]
    return dict(sorted(c.items()))


# dtype policy: a function (tensor name) -> "F32" | "BF16" | "F16" | "FP8"


def is_norm(name):
    return name.endswith("norm.weight") or name.endswith("layernorm.weight")


def is_fp8_linear(name):
    """The linear weights the released V3 checkpoint stores as F8_E4M3 (SPEC 3.2)."""
    if not name.endswith(".weight"):
        return False
    if ".self_attn." in name:
        return not is_norm(name)
    if ".mlp." in name:
        return name.split(".")[-2] in ("gate_proj", "up_proj", "down_proj")
    return False


def policy_v3_bf16(name):
    return "F32" if name.endswith("e_score_correction_bias") else "BF16"


def policy_v2lite(name):
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "F32"
    return "F16"


def policy_f32(name):
    return "F32"


def policy_fp8(name):
    if name.endswith("e_score_correction_bias"):
        return "F32"
    return "FP8" if is_fp8_linear(name) else "BF16"


CASES = {
    "v3": dict(
        desc="DeepSeek-V3 style: q_lora, sigmoid + noaux_tc (bias), 4 groups keep 2, 16 experts top-4, "
             "1 shared, first layer dense, YaRN (V3 values), MTP depth 1, BF16 (bias F32)",
        cfg=hf_config(),
        policy=policy_v3_bf16, seed=1000, T=12),
    "v2lite": dict(
        desc="DeepSeek-V2-Lite style: plain q_proj, softmax + greedy, n_group 1, no bias, 2 shared "
             "experts, norm_topk_prob false, factor 1.0, no rope_scaling, v_head_dim != qk_nope, no MTP, "
             "F16 weights with F32 embeddings/lm_head",
        cfg=hf_config(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                      vocab_size=320, q_lora_rank=None, v_head_dim=12, n_routed_experts=8,
                      n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
                      topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                      routed_scaling_factor=1.0, rope_scaling=None, num_nextn_predict_layers=0,
                      max_position_embeddings=4096, torch_dtype="float16"),
        policy=policy_v2lite, seed=2000, T=14),
    "v2group": dict(
        desc="DeepSeek-V2 style group routing: q_lora, softmax + group_limited_greedy (group score = "
             "max), 2 groups keep 1, 8 experts top-2, factor 4.0, YaRN factor 16 from 256 positions "
             "(ramp low 0, high 4: it matters at short range) with mscale 1.0 != mscale_all_dim "
             "0.707 (cos/sin factor 1.0679), rope dim 16, no MTP, F32",
        cfg=hf_config(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                      vocab_size=288, num_hidden_layers=2, intermediate_size=64,
                      moe_intermediate_size=8, num_attention_heads=2, q_lora_rank=24,
                      kv_lora_rank=24, qk_rope_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                      num_experts_per_tok=2, n_group=2, topk_group=1,
                      topk_method="group_limited_greedy", scoring_func="softmax",
                      norm_topk_prob=False, routed_scaling_factor=4.0,
                      rope_scaling=dict(V3_YARN, factor=16, original_max_position_embeddings=256,
                                        mscale=1.0, mscale_all_dim=0.707),
                      num_nextn_predict_layers=0, torch_dtype="float32"),
        policy=policy_f32, seed=3000, T=10),
    "fp8": dict(
        desc="DeepSeek-V3 FP8 checkpoint: every attention / dense / expert / shared-expert linear "
             "F8_E4M3 with 128x128 weight_scale_inv (partial edge blocks; intermediate 136 gives "
             "2-block scale grids [2,1] and [1,2]); embeddings, heads, norms, router BF16, bias F32; "
             "8 experts in 4 groups keep 2, top-2; MTP depth 1",
        cfg=hf_config(num_hidden_layers=2, intermediate_size=136, moe_intermediate_size=12,
                      num_attention_heads=2, q_lora_rank=40, kv_lora_rank=32, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=4, topk_group=2,
                      quantization_config=dict(FP8_QCFG)),
        policy=policy_fp8, seed=4000, T=12),
}
# Derived cases: written from another case's weights and tokens, same golden logits.
DERIVED = {
    "v3_sharded": dict(base="v3", desc="case v3 split into 3 shards with model.safetensors.index.json"),
    "fp8_f32": dict(base="fp8", desc="case fp8 with every FP8 weight dequantised to F32 (no scale "
                                     "tensors, no quantization_config); same golden logits"),
}

# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------


def tensor_names_shapes(c):
    """[(name, shape, kind)] of a DeepSeek checkpoint; kind picks the init."""
    d, V, H = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kvr, qr = c["kv_lora_rank"], c.get("q_lora_rank")
    out = [("model.embed_tokens.weight", (V, d), "embed"), ("model.norm.weight", (d,), "norm"),
           ("lm_head.weight", (V, d), "head")]
    n_layers = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
    for L in range(n_layers):
        p = "model.layers.%d." % L
        out += [(p + "input_layernorm.weight", (d,), "norm"),
                (p + "post_attention_layernorm.weight", (d,), "norm")]
        a = p + "self_attn."
        if qr:
            out += [(a + "q_a_proj.weight", (qr, d), "lin"), (a + "q_a_layernorm.weight", (qr,), "norm"),
                    (a + "q_b_proj.weight", (H * (dn + dr), qr), "lin")]
        else:
            out += [(a + "q_proj.weight", (H * (dn + dr), d), "lin")]
        out += [(a + "kv_a_proj_with_mqa.weight", (kvr + dr, d), "lin"),
                (a + "kv_a_layernorm.weight", (kvr,), "norm"),
                (a + "kv_b_proj.weight", (H * (dn + dv), kvr), "lin"),
                (a + "o_proj.weight", (d, H * dv), "lin")]
        m = p + "mlp."
        moe = (L >= c["first_k_dense_replace"] and L % c.get("moe_layer_freq", 1) == 0)
        if moe:
            N, I = c["n_routed_experts"], c["moe_intermediate_size"]
            out += [(m + "gate.weight", (N, d), "router")]
            if c["topk_method"] == "noaux_tc":
                out += [(m + "gate.e_score_correction_bias", (N,), "bias")]
            for e in range(N):
                q = m + "experts.%d." % e
                out += [(q + "gate_proj.weight", (I, d), "lin"), (q + "up_proj.weight", (I, d), "lin"),
                        (q + "down_proj.weight", (d, I), "lin")]
            if c.get("n_shared_experts"):
                I2 = I * c["n_shared_experts"]
                q = m + "shared_experts."
                out += [(q + "gate_proj.weight", (I2, d), "lin"), (q + "up_proj.weight", (I2, d), "lin"),
                        (q + "down_proj.weight", (d, I2), "lin")]
        else:
            I = c["intermediate_size"]
            out += [(m + "gate_proj.weight", (I, d), "lin"), (m + "up_proj.weight", (I, d), "lin"),
                    (m + "down_proj.weight", (d, I), "lin")]
        if L >= c["num_hidden_layers"]:   # MTP module extras
            out += [(p + "embed_tokens.weight", (V, d), "mtp_embed"), (p + "enorm.weight", (d,), "norm"),
                    (p + "hnorm.weight", (d,), "norm"), (p + "eh_proj.weight", (d, 2 * d), "lin"),
                    (p + "shared_head.norm.weight", (d,), "norm"),
                    (p + "shared_head.head.weight", (V, d), "mtp_head")]
    return out


def random_weights(c, rng):
    """float64 'intended' values (before the storage rounding)."""
    w = {}
    d = c["hidden_size"]
    for name, shape, kind in tensor_names_shapes(c):
        if kind == "embed":
            w[name] = rng.normal(0.0, 1.0, shape)
        elif kind == "head":
            w[name] = rng.normal(0.0, 2.5 / math.sqrt(d), shape)
        elif kind == "norm":
            w[name] = 1.0 + 0.15 * rng.normal(0.0, 1.0, shape)
        elif kind == "lin":
            w[name] = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape)
        elif kind == "router":
            w[name] = rng.normal(0.0, 1.5 / math.sqrt(shape[1]), shape)
        elif kind == "bias":
            w[name] = rng.normal(0.0, 0.1, shape)
        elif kind in ("mtp_embed", "mtp_head"):
            pass   # byte-identical copies, filled below
        else:
            raise ValueError(kind)
    for name, shape, kind in tensor_names_shapes(c):
        if kind == "mtp_embed":
            w[name] = w["model.embed_tokens.weight"].copy()
        elif kind == "mtp_head":
            w[name] = w["lm_head.weight"].copy()
    return w


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def round_up_16bit_significand(s):
    """Round a positive scale UP to 16 significant bits: then code (<= 4 significant bits) times
    scale is exact in fp32, so a dequantising reader gets the same weights in fp32 or float64."""
    m, e = math.frexp(s)                    # s = m * 2^e, 0.5 <= m < 1
    return math.ldexp(math.ceil(m * 65536.0) / 65536.0, e)


def fp8_quantise(w, rng):
    """Per 128x128 block: scale = max(amax, 1e-4)/448 (rounded up to 16 significant bits, fp32),
    codes = E4M3(w / scale) with RNE and saturation. Before quantising, every block is scaled by
    its own random factor in [0.5, 2] and a few entries are made tiny (subnormal codes), so that
    a reader using the wrong block's scale, or mishandling subnormals, is caught."""
    rows, cols = w.shape
    br, bc = (rows + 127) // 128, (cols + 127) // 128
    w = w * np.repeat(np.repeat(2.0 ** rng.uniform(-1.0, 1.0, (br, bc)), 128, 0), 128, 1)[:rows, :cols]
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scale = np.zeros((br, bc), dtype=np.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].copy()
            amax = float(np.max(np.abs(blk)))
            s = round_up_16bit_significand(float(np.float32(max(amax, 1e-4) / 448.0)))
            assert float(np.float32(s)) == s
            # a few subnormal codes per block (below 2^-6 in code units)
            k = min(4, blk.size)
            idx = rng.choice(blk.size, size=k, replace=False)
            blk.flat[idx] = rng.uniform(-2.0 ** -6, 2.0 ** -6, k) * s
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = R.e4m3_encode(blk / s)
            scale[i, j] = s
    return codes, scale


def to_storage(w, policy, rng):
    """-> ({name: (dtype, stored array)} for safetensors, {name: float64 value a reader sees})."""
    st, true = {}, {}
    for name in sorted(w):
        x = w[name]
        dt = policy(name)
        if dt == "F32":
            a = x.astype(np.float32)
            st[name] = ("F32", a)
        elif dt == "BF16":
            a = R.f64_to_bf16_bits(x)
            st[name] = ("BF16", a)
        elif dt == "F16":
            a = x.astype(np.float16)
            assert np.all(np.isfinite(a))
            st[name] = ("F16", a)
        elif dt == "FP8":
            codes, scale = fp8_quantise(x, rng)
            st[name] = ("F8_E4M3", codes)
            st[name + "_scale_inv"] = ("F32", scale)
            true[name] = R.fp8_block_dequant(codes, scale)
            continue
        else:
            raise ValueError(dt)
        true[name] = R.stored_to_f64(*st[name])
    # the MTP copies must be byte-identical to the main tensors
    for name in list(st):
        if name.endswith(".embed_tokens.weight") and name != "model.embed_tokens.weight":
            assert st[name][1].tobytes() == st["model.embed_tokens.weight"][1].tobytes()
        if name.endswith(".shared_head.head.weight"):
            assert st[name][1].tobytes() == st["lm_head.weight"][1].tobytes()
    return st, true


def write_model_dir(path, cfg, st, shards=1):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    meta = {"format": "pt"}
    if shards == 1:
        R.write_safetensors(os.path.join(path, "model.safetensors"), st, meta)
        return
    # split in name order into `shards` parts of about equal bytes (a weight and its scale
    # stay together because "X.weight" < "X.weight_scale_inv" are adjacent in name order)
    names = sorted(st)
    sizes = [st[n][1].nbytes for n in names]
    total, parts, cur, acc = sum(sizes), [], [], 0
    for n, s in zip(names, sizes):
        cur.append(n)
        acc += s
        if acc >= total * (len(parts) + 1) / shards and len(parts) < shards - 1:
            parts.append(cur)
            cur = []
    parts.append(cur)
    assert len(parts) == shards
    wmap = {}
    for i, part in enumerate(parts):
        fn = "model-%05d-of-%05d.safetensors" % (i + 1, shards)
        R.write_safetensors(os.path.join(path, fn), {n: st[n] for n in part}, meta)
        for n in part:
            wmap[n] = fn
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Golden
# ---------------------------------------------------------------------------------------------


def logit_gap_ok(rows):
    """Min over rows of (top1 - top2) / max|logit| of the row."""
    worst = np.inf
    for r in rows:
        s = np.sort(r)
        worst = min(worst, (s[-1] - s[-2]) / np.max(np.abs(r)))
    return worst


def evaluate(model_dir, tokens):
    m = R.Model.from_dir(model_dir)
    m.trace = []
    logits, h = m.forward(tokens)
    mtp = m.mtp(tokens, h)
    gap = logit_gap_ok(list(logits) + [r for o in mtp for r in o])
    gm = min([r["group_margin"] for r in m.trace if "group_margin" in r], default=np.inf)
    em = min([r["expert_margin"] for r in m.trace if "expert_margin" in r], default=np.inf)
    mg = {"min_rel_top1_gap": float(gap), "min_group_margin": float(gm),
          "min_expert_margin": float(em), "router_decisions": len(m.trace)}
    if any("changed_by_bias" in r for r in m.trace):
        mg["tokens_where_bias_changes_choice"] = sum(r.get("changed_by_bias", False) for r in m.trace)
    if any("changed_by_group_limit" in r for r in m.trace):
        mg["tokens_where_group_limit_changes_choice"] = sum(r.get("changed_by_group_limit", False)
                                                             for r in m.trace)
    return logits, mtp, m, mg


def draw_tokens(rng, V, T):
    """BOS (0) then T-1 ids in [2, V)."""
    return [0] + [int(t) for t in rng.integers(2, V, T - 1)]


def write_golden(path, case, desc, cfg, tokens, logits, mtp, seed, attempts, margins, made_from=None):
    logits.astype("<f4").tofile(os.path.join(path, "logits.f32"))
    g = {"made_by": "tools/make_golden.py", "reference": "tools/ref_model.py (numpy float64)",
         "case": case, "description": desc, "tokens": tokens, "T": len(tokens),
         "vocab": cfg["vocab_size"], "seed": seed, "seed_attempts": attempts,
         "logits": "logits.f32", "logits_shape": [len(tokens), cfg["vocab_size"]],
         "logits_argmax": [int(i) for i in np.argmax(logits, axis=1)],
         "logits_absmax": float(np.max(np.abs(logits)))}
    if mtp:
        mt = np.concatenate(mtp, axis=0)
        mt.astype("<f4").tofile(os.path.join(path, "mtp_logits.f32"))
        g.update({"mtp_logits": "mtp_logits.f32", "mtp_logits_shape": list(mt.shape),
                  "mtp_logits_argmax": [int(i) for i in np.argmax(mt, axis=1)],
                  "mtp_logits_absmax": float(np.max(np.abs(mt)))})
    else:
        g["mtp_logits"] = None
    g["margins"] = margins
    if made_from:
        g["made_from"] = made_from
    with open(os.path.join(path, "golden.json"), "w") as f:
        json.dump(g, f, indent=2)
        f.write("\n")
    with open(os.path.join(path, "tokens.txt"), "w") as f:
        f.write(",".join(str(t) for t in tokens) + "\n")


def make_case(out, name, spec):
    cfg = spec["cfg"]
    path = os.path.join(out, name)
    for attempt in range(MAX_ATTEMPTS):
        seed = spec["seed"] + attempt
        rng = np.random.default_rng(seed)
        w = random_weights(cfg, rng)
        st, true = to_storage(w, spec["policy"], rng)
        tokens = draw_tokens(rng, cfg["vocab_size"], spec["T"])
        write_model_dir(path, cfg, st)
        logits, mtp, m, mg = evaluate(path, tokens)
        # the reader must see exactly the values the generator meant to store
        assert set(m.w) == set(true) and all(np.array_equal(m.w[k], true[k]) for k in true)
        ok = (mg["min_rel_top1_gap"] > LOGIT_GAP_REL and mg["min_group_margin"] > ROUTE_MARGIN
              and mg["min_expert_margin"] > ROUTE_MARGIN
              and mg.get("tokens_where_bias_changes_choice", 1) > 0
              and mg.get("tokens_where_group_limit_changes_choice", 1) > 0)
        print("  %s seed %d: %s %s" % (name, seed, "ok" if ok else "rejected", mg))
        if ok:
            write_golden(path, name, spec["desc"], cfg, tokens, logits, mtp, seed, attempt + 1, mg)
            return dict(cfg=cfg, st=st, tokens=tokens, logits=logits, mtp=mtp, seed=seed,
                        attempts=attempt + 1, margins=mg, desc=spec["desc"])
    raise SystemExit("%s: no seed passed the robustness checks" % name)


def make_derived(out, name, spec, base):
    path = os.path.join(out, name)
    cfg, st = dict(base["cfg"]), dict(base["st"])
    if name == "v3_sharded":
        write_model_dir(path, cfg, st, shards=3)
    elif name == "fp8_f32":
        cfg.pop("quantization_config", None)
        st2 = {}
        for n, (dt, a) in st.items():
            if n.endswith("_scale_inv"):
                continue
            if dt == "F8_E4M3":
                deq = R.fp8_block_dequant(a, st[n + "_scale_inv"][1])
                f = deq.astype(np.float32)
                assert np.array_equal(f.astype(np.float64), deq)      # exact in fp32
                st2[n] = ("F32", f)
            else:
                st2[n] = (dt, a)
        write_model_dir(path, cfg, st2)
    else:
        raise ValueError(name)
    logits, mtp, m, mg = evaluate(path, base["tokens"])
    assert np.array_equal(logits, base["logits"]), name
    assert all(np.array_equal(a, b) for a, b in zip(mtp, base["mtp"])), name
    print("  %s (from %s): identical logits" % (name, spec["base"]))
    write_golden(path, name, spec["desc"], cfg, base["tokens"], logits, mtp, base["seed"],
                 base["attempts"], mg, made_from=spec["base"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="make tests/data golden cases")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))
    ap.add_argument("--case", action="append", help="only these cases (default: all)")
    a = ap.parse_args(argv)
    out = os.path.normpath(a.out)
    os.makedirs(out, exist_ok=True)
    want = a.case or (list(CASES) + list(DERIVED))
    made = {}
    for name in want:
        if name in CASES:
            made[name] = make_case(out, name, CASES[name])
        elif name in DERIVED:
            b = DERIVED[name]["base"]
            if b not in made:
                made[b] = make_case(out, b, CASES[b])
            make_derived(out, name, DERIVED[name], made[b])
        else:
            raise SystemExit("unknown case %s" % name)
    for name in want:
        path = os.path.join(out, name)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print("%-12s %8d bytes" % (name, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
