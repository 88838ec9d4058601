#!/usr/bin/python3
"""The block formula of `dsv3 convert --dtype fp8` in numpy, and the golden case tests/data/convert/
made with it (tests/test_convert.c compares dsv3's output with these files byte for byte).

    /usr/bin/python3 tools/fp8_convert_ref.py [--out tests/data/convert]

The formula (SPEC 3.2, issue 12 item 5): for each 128x128 block of a linear weight w [out, in]
(partial at the edges), in float32 arithmetic,
    scale = max(amax_block, 1e-4) / 448            (stored as <name>_scale_inv, F32)
    code  = E4M3(w / scale)                        (a true division; round to nearest, ties to even,
                                                    saturating at +-448; the sign of a value that
                                                    rounds to zero is kept: -0 is 0x80)
and back: value = float32(E4M3 value of code) * scale, rounded to nearest even for BF16.

Files written (deterministic, same bytes every run):
  config.json        a small V3 config with ragged shapes (below)
  model.safetensors  the input: every tensor F32
  fp8.safetensors    what `dsv3 convert --dtype fp8` must write: the FP8 linears (attention,
                     dense FFN, experts, shared experts of the main and the MTP layer) as F8_E4M3 +
                     _scale_inv, every other tensor as stored (F32; eh_proj included, as released)
  bf16.safetensors   what converting fp8.safetensors' model to --dtype bf16 must write: every
                     tensor BF16 (linears = round(code x scale)), e_score_correction_bias F32
  <case>_fp8_logits.f32, <case>_fp8_mtp_logits.f32
                     for the golden cases v3, v2lite and v2group: each converted to fp8 by the
                     formula here, then run through tools/ref_model.py (float64) on its golden
                     tokens: what `dsv3 logits` must compute on `dsv3 convert --dtype fp8`'s output
  golden.json        how they were made, counts of the special cases they contain, and how far
                     each quantised golden model's logits are from its original golden logits
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as G  # noqa: E402
import ref_model as R  # noqa: E402

BLOCK = 128
SEED = 12

# Ragged block grids: q_a_proj [136, 40] -> scale [2, 1]; q_b_proj [144, 136] -> [2, 2];
# kv_b_proj [192, 32] -> [2, 1] (64-row edge); dense gate/up [136, 40] -> [2, 1], down [40, 136] -> [1, 2].
CFG = G.hf_config(vocab_size=32, hidden_size=40, num_hidden_layers=1, first_k_dense_replace=1,
                  intermediate_size=136, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=6, q_lora_rank=136,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  num_nextn_predict_layers=1, torch_dtype="float32")


def f32(x):
    return np.asarray(x, dtype=np.float32)


def e4m3_encode_signed(q):
    """float32 -> E4M3 codes: ref_model's nearest-even, saturating encoder, keeping the sign of a
    value that rounds to zero (-0 -> 0x80), as torch's float8_e4m3fn conversion does."""
    codes = R.e4m3_encode(q.astype(np.float64))
    neg_zero = np.signbit(q) & ~np.isnan(q) & (codes == 0)
    return np.where(neg_zero, np.uint8(0x80), codes).astype(np.uint8)


def quantise(w):
    """w: float32 [rows, cols] -> (codes uint8 [rows, cols], scale float32 [ceil(rows/128), ceil(cols/128)])."""
    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scale = np.zeros((br, bc), dtype=np.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            amax = np.max(np.abs(blk))                                  # float32, exact
            s = np.maximum(amax, f32(1e-4)) / f32(448.0)                # float32 division
            assert s.dtype == np.float32
            q = blk / s                                                 # float32 division
            assert q.dtype == np.float32
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = e4m3_encode_signed(q)
            scale[i, j] = s
    return codes, scale


def dequantise(codes, scale):
    """-> float32 [rows, cols]: float32(E4M3 value) * scale in float32 (one rounding)."""
    v = R.e4m3_decode(codes).astype(np.float32)
    s = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:codes.shape[0], :codes.shape[1]]
    out = v * s
    assert out.dtype == np.float32
    return out


def weights(rng):
    """float32 input tensors: N(0, 1/sqrt(in)) linears with a random power-of-two factor per
    128x128 block, and blocks planted with the cases the formula must get right."""
    w = {}
    for name, shape, kind in G.tensor_names_shapes(CFG):
        if kind in ("mtp_embed", "mtp_head"):
            continue
        if kind == "norm":
            x = 1.0 + 0.15 * rng.normal(0.0, 1.0, shape)
        elif kind == "bias":
            x = rng.normal(0.0, 0.1, shape)
        else:
            x = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
            if kind == "lin":
                br, bc = -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)
                f = 2.0 ** rng.integers(-12, 5, (br, bc))
                x = x * np.repeat(np.repeat(f, BLOCK, 0), BLOCK, 1)[:shape[0], :shape[1]]
        w[name] = f32(x)
    for name, shape, kind in G.tensor_names_shapes(CFG):
        if kind == "mtp_embed":
            w[name] = w["model.embed_tokens.weight"].copy()
        elif kind == "mtp_head":
            w[name] = w["lm_head.weight"].copy()
    # an all-zero edge block: scale = 1e-4/448, every code 0
    w["model.layers.0.mlp.gate_proj.weight"][128:, :] = 0.0
    # an edge block below 1e-4: scale = 1e-4/448 and the codes run into the subnormals
    w["model.layers.0.mlp.up_proj.weight"][128:, :] = f32(rng.uniform(-6e-5, 6e-5, (8, 40)))
    # ties: amax = 448 * 2^-8 makes scale = 2^-8 exactly, so w / scale lands on the midpoints
    # between E4M3 values (normal and subnormal, positive and negative); -0 and tiny negatives
    # give code 0x80
    s = 2.0 ** -8
    tie = w["model.layers.0.mlp.down_proj.weight"]
    blk = f32(rng.normal(0.0, 0.1 * s, (40, 8)))
    mids = [448.0, 1.0625, 1.1875, -1.3125, 2.125, -6.5, 0.75 * 2.0 ** -9, 1.5 * 2.0 ** -9, -2.5 * 2.0 ** -9,
            7.5 * 2.0 ** -9, 15.5 * 2.0 ** -9, 0.5 * 2.0 ** -9, -0.5 * 2.0 ** -9, 240.0 + 8.0, 416.0 + 16.0,
            -0.0, -1e-9 / s]
    for k, m in enumerate(mids):
        blk[k, k % 8] = f32(m * s)
    tie[:, 128:] = blk
    return w


def count_special(codes_by_name, w, fp8):
    sat = ties = sub = negzero = 0
    for name, (codes, scale) in codes_by_name.items():
        x = w[name]
        s = np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)[:x.shape[0], :x.shape[1]]
        q = (x / s).astype(np.float64)
        sat += int(np.sum(np.abs(q) > 448.0))
        v = R.e4m3_decode(codes)
        # a tie: q is exactly halfway between the decoded value and a neighbour
        lo = np.abs(q) - np.abs(v)
        step = np.where(np.abs(v) < 2.0 ** -6, 2.0 ** -9, 2.0 ** (np.floor(np.log2(np.maximum(np.abs(v), 1e-30))) - 3))
        ties += int(np.sum(np.abs(np.abs(lo) - step / 2) == 0))
        sub += int(np.sum(((codes & 0x78) == 0) & ((codes & 7) != 0)))
        negzero += int(np.sum(codes == 0x80))
    return {"saturated": sat, "ties": ties, "subnormal_codes": sub, "negative_zero_codes": negzero}


def golden_case_to_fp8(data, case, out):
    """tests/data/<case> with its FP8 linears quantised here; -> the reference logits on its golden
    tokens and how they compare with the case's golden logits."""
    src = os.path.join(data, case)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [BLOCK, BLOCK]}
    st = {}
    for n, (dt, a) in R.read_safetensors(os.path.join(src, "model.safetensors")).items():
        if G.is_fp8_linear(n):
            codes, scale = quantise(R.stored_to_f64(dt, a).astype(np.float32))   # exact: BF16/F16/F32
            st[n], st[n + "_scale_inv"] = ("F8_E4M3", codes), ("F32", scale)
        else:
            st[n] = (dt, a)
    tmp = tempfile.mkdtemp()
    try:
        G.write_model_dir(tmp, cfg, st)
        g = json.load(open(os.path.join(src, "golden.json")))
        logits, mtp, _, _ = G.evaluate(tmp, g["tokens"])
    finally:
        shutil.rmtree(tmp)
    gold = np.fromfile(os.path.join(src, "logits.f32"), dtype="<f4").reshape(logits.shape)
    logits.astype("<f4").tofile(os.path.join(out, "%s_fp8_logits.f32" % case))
    r = {"rel_max_diff_vs_golden": float(np.max(np.abs(logits - gold)) / np.max(np.abs(gold))),
         "argmax_agrees": int(np.sum(np.argmax(logits, 1) == np.argmax(gold, 1))), "rows": int(logits.shape[0])}
    if mtp:
        mt = np.concatenate(mtp, axis=0)
        mt.astype("<f4").tofile(os.path.join(out, "%s_fp8_mtp_logits.f32" % case))
        mg = np.fromfile(os.path.join(src, "mtp_logits.f32"), dtype="<f4").reshape(mt.shape)
        r.update({"mtp_rel_max_diff_vs_golden": float(np.max(np.abs(mt - mg)) / np.max(np.abs(mg))),
                  "mtp_argmax_agrees": int(np.sum(np.argmax(mt, 1) == np.argmax(mg, 1))), "mtp_rows": int(mt.shape[0])})
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                                                  "convert"))
    a = ap.parse_args(argv)
    out = os.path.normpath(a.out)
    rng = np.random.default_rng(SEED)
    w = weights(rng)
    st_in = {n: ("F32", x) for n, x in w.items()}
    G.write_model_dir(out, CFG, st_in)

    fp8, bf16, quant = {}, {}, {}
    blocks = 0
    for n, x in w.items():
        if G.is_fp8_linear(n):
            codes, scale = quantise(x)
            quant[n] = (codes, scale)
            fp8[n] = ("F8_E4M3", codes)
            fp8[n + "_scale_inv"] = ("F32", scale)
            deq = dequantise(codes, scale)
            bf16[n] = ("BF16", R.f64_to_bf16_bits(deq.astype(np.float64)))
            # f32 -> fp8 -> f32 -> fp8 is the identity: a block's largest code is 448, and every
            # scale s = float32(a / 448) has float32(float32(448 s) / 448) == s
            c2, s2 = quantise(deq)
            assert np.array_equal(c2, codes) and np.array_equal(s2, scale), n
            blocks += scale.size
        else:
            fp8[n] = ("F32", x)
            bf16[n] = ("F32", x) if n.endswith("e_score_correction_bias") else ("BF16", R.f64_to_bf16_bits(x))
    R.write_safetensors(os.path.join(out, "fp8.safetensors"), fp8, {"format": "pt"})
    R.write_safetensors(os.path.join(out, "bf16.safetensors"), bf16, {"format": "pt"})
    special = count_special(quant, w, fp8)
    data = os.path.dirname(out)
    quantised_goldens = {c: golden_case_to_fp8(data, c, out) for c in ("v3", "v2lite", "v2group")}
    g = {"made_by": "tools/fp8_convert_ref.py", "seed": SEED, "case": "convert",
         "description": "f32 checkpoint with ragged 128x128 block grids; its FP8 conversion (block formula "
                        "in numpy float32) and that FP8 model converted to BF16",
         "input": "model.safetensors", "fp8": "fp8.safetensors", "bf16_from_fp8": "bf16.safetensors",
         "fp8_linears": len(quant), "fp8_blocks": blocks, "special": special,
         "golden_cases_in_fp8": quantised_goldens}
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(g, f, indent=2)
        f.write("\n")
    print("%s: %d FP8 linears, %d blocks, %s" % (out, len(quant), blocks, special))
    for c, r in quantised_goldens.items():
        print("  %s in fp8: %s" % (c, r))


if __name__ == "__main__":
    main()
