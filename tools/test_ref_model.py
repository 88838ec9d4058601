#!/usr/bin/python3
"""Self-checks of the numpy reference tools/ref_model.py and of the golden data in tests/data.

    /usr/bin/python3 tools/test_ref_model.py [-v]

Checks: YaRN constants of the real DeepSeek-V3 config; RoPE on interleaved pairs against the
official complex-number form and the HF de-interleave + rotate_half form; E4M3 / BF16 codecs at
spot values (448, 2^-9, ties to even, saturation); 128x128 block dequantisation with partial edge
blocks; the safetensors reader/writer; routing examples worked by hand (noaux_tc, greedy,
group_limited_greedy); decode-style incremental recomputation equals prefill; absorbed MLA equals
plain MLA; the MTP row layout; that every golden case in tests/data re-computes bit-exactly; and
that plausible mistakes (RoPE on halves, YaRN parts left out, MTP halves swapped or fed the
un-normalised hidden state, gates from biased scores, the wrong group score, one FP8 scale per
tensor...) move the golden logits by more than 1%.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ref_model as R      # noqa: E402
import make_golden as G    # noqa: E402

DATA = os.path.normpath(os.path.join(HERE, "..", "tests", "data"))

V3_CONFIG = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_theta": 10000,
             "rope_scaling": dict(G.V3_YARN)}


def tiny_model(cfg, policy, seed):
    """Random weights for cfg as a Model (float64 weights after the storage rounding)."""
    rng = np.random.default_rng(seed)
    w = G.random_weights(cfg, rng)
    _, true = G.to_storage(w, policy, rng)
    return R.Model(cfg, true)


class TestYarn(unittest.TestCase):
    def test_v3_softmax_scale(self):
        inv_freq, cs, scale = R.rope_params(V3_CONFIG)
        m = 0.1 * 1.0 * math.log(40) + 1.0
        self.assertAlmostEqual(m, 1.3689, places=4)
        self.assertAlmostEqual(scale, 0.13523, places=5)
        self.assertAlmostEqual(scale, m * m / math.sqrt(192), places=15)
        self.assertEqual(cs, 1.0)

    def test_v3_ramp(self):
        low, high = R.yarn_correction_range(32, 1, 64, 10000, 4096)
        self.assertEqual((low, high), (10, 23))
        inv_freq, _, _ = R.rope_params(V3_CONFIG)
        base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
        np.testing.assert_allclose(inv_freq[:11], base[:11], rtol=0, atol=0)       # ramp 0: extrapolate
        np.testing.assert_allclose(inv_freq[23:], base[23:] / 40, rtol=1e-15)       # ramp 1: interpolate
        r = (16 - 10) / 13
        self.assertAlmostEqual(inv_freq[16], base[16] / 40 * r + base[16] * (1 - r), places=18)

    def test_mscale_ratio(self):
        c = dict(V3_CONFIG, rope_scaling=dict(G.V3_YARN, mscale=1.0, mscale_all_dim=0.707))
        _, cs, scale = R.rope_params(c)
        m1, m2 = 0.1 * math.log(40) + 1, 0.1 * 0.707 * math.log(40) + 1
        self.assertAlmostEqual(cs, m1 / m2, places=15)
        self.assertAlmostEqual(cs, 1.0857, places=4)
        self.assertAlmostEqual(scale, m2 * m2 / math.sqrt(192), places=15)
        # DeepSeek-V2: mscale == mscale_all_dim = 0.707 -> no cos/sin factor
        c = dict(V3_CONFIG, rope_scaling=dict(G.V3_YARN, mscale=0.707, mscale_all_dim=0.707))
        self.assertEqual(R.rope_params(c)[1], 1.0)

    def test_no_scaling(self):
        c = dict(V3_CONFIG, rope_scaling=None)
        inv_freq, cs, scale = R.rope_params(c)
        self.assertEqual(cs, 1.0)
        self.assertAlmostEqual(scale, 1 / math.sqrt(192), places=15)
        np.testing.assert_array_equal(inv_freq, 1.0 / 10000 ** (np.arange(0, 64, 2) / 64))

    def test_small_rope_dim_ramp(self):
        # the golden cases use rope dims 8 and 16 with the V3 YaRN values
        self.assertEqual(R.yarn_correction_range(32, 1, 8, 10000, 4096), (1, 3))
        self.assertEqual(R.yarn_correction_range(32, 1, 16, 10000, 4096), (2, 6))


class TestRope(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(5)
        self.T, self.H, self.r = 7, 3, 16
        self.x = rng.normal(size=(self.T, self.H, self.r))
        self.pos = np.arange(self.T) + 3
        self.inv_freq = R.rope_params(dict(V3_CONFIG, qk_rope_head_dim=self.r))[0]

    def test_complex_form(self):
        """Official inference/model.py: view_as_complex(x.view(..., -1, 2)) * freqs_cis."""
        y = R.apply_rope_interleaved(self.x, self.pos, self.inv_freq, 1.0)
        z = self.x[..., 0::2] + 1j * self.x[..., 1::2]
        fc = np.exp(1j * self.pos[:, None] * self.inv_freq[None, :])[:, None, :]
        zr = z * fc
        np.testing.assert_allclose(y[..., 0::2], zr.real, atol=1e-14)
        np.testing.assert_allclose(y[..., 1::2], zr.imag, atol=1e-14)

    def test_hf_rotate_half_form(self):
        """HF modeling_deepseek: de-interleave (view d/2,2 -> transpose) then rotate_half with
        emb = cat(freqs, freqs); equal to ours up to the same permutation of q and k."""
        x = self.x
        d = self.r
        xd = x.reshape(self.T, self.H, d // 2, 2).swapaxes(-1, -2).reshape(self.T, self.H, d)
        freqs = self.pos[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
        cs = 1.2
        cos, sin = np.cos(emb) * cs, np.sin(emb) * cs
        rot = np.concatenate([-xd[..., d // 2:], xd[..., :d // 2]], axis=-1)
        hf = xd * cos + rot * sin
        ours = R.apply_rope_interleaved(x, self.pos, self.inv_freq, cs)
        ours_perm = np.concatenate([ours[..., 0::2], ours[..., 1::2]], axis=-1)
        np.testing.assert_allclose(hf, ours_perm, atol=1e-13)

    def test_relative(self):
        """q(m).k(n) depends only on m - n; the shared k_pe form [T, r] works too."""
        rng = np.random.default_rng(1)
        q, k = rng.normal(size=self.r), rng.normal(size=self.r)
        def dot(m, n):
            qm = R.apply_rope_interleaved(q[None], np.array([m]), self.inv_freq, 1.0)[0]
            kn = R.apply_rope_interleaved(k[None], np.array([n]), self.inv_freq, 1.0)[0]
            return qm @ kn
        self.assertAlmostEqual(dot(5, 2), dot(13, 10), places=12)
        self.assertAlmostEqual(dot(0, 0), q @ k, places=12)


class TestCodecs(unittest.TestCase):
    def test_e4m3_spot(self):
        enc = lambda v: int(R.e4m3_encode(np.array([v]))[0])
        self.assertEqual(enc(448.0), 0x7E)
        self.assertEqual(enc(-448.0), 0xFE)
        self.assertEqual(enc(480.0), 0x7E)          # saturate (480 would round to the NaN code)
        self.assertEqual(enc(1e9), 0x7E)
        self.assertEqual(enc(2.0 ** -9), 0x01)      # smallest subnormal
        self.assertEqual(enc(2.0 ** -10), 0x00)     # tie 0 / 2^-9 -> even (0)
        self.assertEqual(enc(3 * 2.0 ** -10), 0x02)  # tie 2^-9 / 2^-8 -> even code 0x02
        self.assertEqual(enc(2.0 ** -6), 0x08)      # smallest normal
        self.assertEqual(enc(1.0), 0x38)
        self.assertEqual(enc(1.0625), 0x38)         # tie 1 / 1.125 -> even mantissa
        self.assertEqual(enc(1.1875), 0x3A)         # tie 1.125 / 1.25 -> even mantissa
        self.assertEqual(enc(1.07), 0x39)
        self.assertEqual(enc(17.0), 0x58)           # tie 16 / 18 -> 16
        self.assertEqual(enc(-0.3), 0x80 | enc(0.3))
        self.assertEqual(R.E4M3_VALUES[0x7E], 448.0)
        self.assertEqual(R.E4M3_VALUES[0x01], 2.0 ** -9)
        self.assertEqual(R.E4M3_VALUES[0x07], 7 * 2.0 ** -9)
        self.assertEqual(R.E4M3_VALUES[0x77], 240.0)
        self.assertTrue(np.isnan(R.E4M3_VALUES[0x7F]) and np.isnan(R.E4M3_VALUES[0xFF]))
        self.assertEqual(int(np.sum(np.isnan(R.E4M3_VALUES))), 2)

    def test_e4m3_roundtrip_and_monotone(self):
        codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF, 0x80)], dtype=np.uint8)
        np.testing.assert_array_equal(R.e4m3_encode(R.E4M3_VALUES[codes]), codes)
        self.assertTrue(np.all(np.diff(R.E4M3_VALUES[:127]) > 0))
        # nearest: a dense sweep never picks a farther value
        x = np.linspace(-460, 460, 40001)
        v = R.E4M3_VALUES[R.e4m3_encode(x)]
        grid = R.E4M3_VALUES[codes]
        best = np.min(np.abs(np.clip(x, -448, 448)[:, None] - grid[None, :]), axis=1)
        self.assertTrue(np.all(np.abs(np.clip(x, -448, 448) - v) <= best + 1e-12))

    def test_block_dequant_partial(self):
        rng = np.random.default_rng(3)
        codes = rng.integers(0, 0x7E, size=(130, 260)).astype(np.uint8)
        scale = rng.uniform(0.5, 2.0, size=(2, 3))
        w = R.fp8_block_dequant(codes, scale)
        for r, c in [(0, 0), (127, 127), (128, 0), (129, 259), (5, 128), (5, 256), (128, 257)]:
            self.assertEqual(w[r, c], R.E4M3_VALUES[codes[r, c]] * scale[r // 128, c // 128])

    def test_quantiser_exact_in_fp32(self):
        rng = np.random.default_rng(4)
        w = rng.normal(size=(136, 200)) * 0.05
        codes, scale = G.fp8_quantise(w, rng)
        self.assertEqual(scale.shape, (2, 2))
        deq = R.fp8_block_dequant(codes, scale)
        np.testing.assert_array_equal(deq.astype(np.float32).astype(np.float64), deq)
        self.assertTrue(np.all(np.abs(R.E4M3_VALUES[codes]) <= 448))
        self.assertEqual(np.max(np.abs(R.E4M3_VALUES[codes[:128, :128]])), 448.0)

    def test_bf16(self):
        f = lambda v: int(R.f64_to_bf16_bits(np.array([v]))[0])
        self.assertEqual(f(1.0), 0x3F80)
        self.assertEqual(f(-2.0), 0xC000)
        self.assertEqual(f(1 + 2.0 ** -8), 0x3F80)        # tie -> even
        self.assertEqual(f(1 + 3 * 2.0 ** -8), 0x3F82)    # tie -> even
        self.assertEqual(f(1 + 2.0 ** -7), 0x3F81)
        bits = np.arange(0, 0x7F80, 7, dtype=np.uint16)
        np.testing.assert_array_equal(R.f64_to_bf16_bits(R.bf16_bits_to_f64(bits)), bits)


class TestSafetensors(unittest.TestCase):
    def test_roundtrip(self):
        rng = np.random.default_rng(0)
        t = {"a": ("F32", rng.normal(size=(3, 5)).astype(np.float32)),
             "b.weight": ("BF16", R.f64_to_bf16_bits(rng.normal(size=(4,)))),
             "c": ("F16", rng.normal(size=(2, 2, 2)).astype(np.float16)),
             "d": ("F8_E4M3", R.e4m3_encode(rng.normal(size=(7, 3))))}
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.safetensors")
            R.write_safetensors(p, t, {"format": "pt"})
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                hdr = json.loads(f.read(n))
            self.assertEqual(n % 8, 0)
            self.assertEqual(hdr["__metadata__"], {"format": "pt"})
            back = R.read_safetensors(p)
            for k, (dt, a) in t.items():
                self.assertEqual(back[k][0], dt)
                np.testing.assert_array_equal(back[k][1], a)


class TestRouting(unittest.TestCase):
    def test_noaux_tc_by_hand(self):
        cfg = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
               "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
               "routed_scaling_factor": 2.5}
        s = np.array([0.9, 0.1, 0.6, 0.55, 0.2, 0.3, 0.8, 0.05])
        logits = np.log(s / (1 - s))
        # no bias: group sums (top-2 of each pair) = 1.0, 1.15, 0.5, 0.85 -> groups 1, 0 kept;
        # candidates {0:0.9, 1:0.1, 2:0.6, 3:0.55} -> experts 0 and 2 (expert 6 = 0.8 is masked)
        ids, wts, rec = R.route(cfg, logits, np.zeros(8))
        self.assertEqual(sorted(ids.tolist()), [0, 2])
        np.testing.assert_allclose(wts[np.argsort(ids)], np.array([0.9, 0.6]) / 1.5 * 2.5, rtol=1e-12)
        self.assertAlmostEqual(rec["group_margin"], 1.0 - 0.85, places=12)
        self.assertAlmostEqual(rec["expert_margin"], 0.6 - 0.55, places=12)
        # a bias steers selection: +0.4 on expert 7 makes group 3 = 0.8 + 0.45 = 1.25 the best
        # group; kept groups 3 and 1 -> selection scores {0.6, 0.55, 0.8, 0.45} -> experts 6, 2.
        # Gates use the UNBIASED scores: 0.8 and 0.6.
        b = np.array([0, 0, 0, 0, 0, 0, 0, 0.4])
        ids, wts, _ = R.route(cfg, logits, b)
        self.assertEqual(sorted(ids.tolist()), [2, 6])
        np.testing.assert_allclose(wts[np.argsort(ids)], np.array([0.6, 0.8]) / 1.4 * 2.5, rtol=1e-12)
        # group score is the sum of the TOP TWO, not the max: group 0 (0.9, 0.1) loses to
        # group 1 (0.6, 0.55) although its max is larger
        ids, _, _ = R.route(dict(cfg, topk_group=1), logits, np.zeros(8))
        self.assertEqual(sorted(ids.tolist()), [2, 3])

    def test_greedy_softmax_by_hand(self):
        cfg = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
               "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
               "routed_scaling_factor": 1.0}
        logits = np.log(np.array([1.0, 4.0, 2.0, 3.0]))      # softmax = [.1, .4, .2, .3]
        ids, wts, rec = R.route(cfg, logits)
        self.assertEqual(ids.tolist(), [1, 3])
        np.testing.assert_allclose(wts, [0.4, 0.3], rtol=1e-12)   # not renormalised
        ids, wts, _ = R.route(dict(cfg, routed_scaling_factor=16.0), logits)
        np.testing.assert_allclose(wts, [6.4, 4.8], rtol=1e-12)
        ids, wts, _ = R.route(dict(cfg, norm_topk_prob=True), logits)
        np.testing.assert_allclose(wts, [4 / 7, 3 / 7], rtol=1e-12)

    def test_group_limited_greedy_by_hand(self):
        cfg = {"n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
               "topk_method": "group_limited_greedy", "scoring_func": "softmax",
               "norm_topk_prob": False, "routed_scaling_factor": 4.0}
        p = np.array([0.30, 0.02, 0.03, 0.22, 0.21, 0.22])     # groups: max .30 vs .22
        ids, wts, rec = R.route(cfg, np.log(p))
        self.assertEqual(sorted(ids.tolist()), [0, 2])        # group 0 wins by its max
        np.testing.assert_allclose(np.sort(wts), np.sort([0.30 * 4, 0.03 * 4]), rtol=1e-12)
        self.assertAlmostEqual(rec["group_margin"], 0.08, places=12)
        ids, _, _ = R.route(dict(cfg, topk_method="greedy"), np.log(p))
        self.assertEqual(sorted(ids.tolist()), [0, 3])        # unrestricted: 0.30 and the first 0.22


def small_cfg(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=6,
                num_attention_heads=2, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, num_experts_per_tok=2,
                n_group=4, topk_group=2, num_hidden_layers=2, num_nextn_predict_layers=1)
    base.update(kw)
    return G.hf_config(**base)


class TestModel(unittest.TestCase):
    def setUp(self):
        self.cfgs = {
            "v3": small_cfg(),
            "v2lite": small_cfg(q_lora_rank=None, topk_method="greedy", scoring_func="softmax",
                                n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2,
                                routed_scaling_factor=1.0, rope_scaling=None, num_nextn_predict_layers=0),
            "v2group": small_cfg(topk_method="group_limited_greedy", scoring_func="softmax",
                                 n_group=2, topk_group=1, norm_topk_prob=False,
                                 rope_scaling=dict(G.V3_YARN, mscale_all_dim=0.707),
                                 num_nextn_predict_layers=2),
        }
        self.tokens = [0, 5, 17, 33, 2, 90, 41, 7, 64]

    def test_decode_equals_prefill(self):
        """Recomputing with growing prefixes: the last row of each equals the prefill row (this
        is what a KV-cached decoder must reproduce), for the main model and every MTP module."""
        for name, cfg in self.cfgs.items():
            m = tiny_model(cfg, G.policy_f32, 11)
            full, h = m.forward(self.tokens)
            mtp_full = m.mtp(self.tokens, h)
            for t in range(1, len(self.tokens) + 1):
                lg, hh = m.forward(self.tokens[:t])
                np.testing.assert_allclose(lg[-1], full[t - 1], rtol=0, atol=1e-11, err_msg=name)
                for k, mk in enumerate(m.mtp(self.tokens[:t], hh), start=1):
                    if t - k > 0:
                        np.testing.assert_allclose(mk[-1], mtp_full[k - 1][t - k - 1], atol=1e-11)

    def test_absorbed_mla_equals_plain(self):
        """SPEC 2.1 absorbed decode: q~ = W_UK^T q_nope, score = q~.c_kv + q_pe.k_pe, o = W_UV (sum p c_kv)."""
        cfg = self.cfgs["v3"]
        m = tiny_model(cfg, G.policy_f32, 12)
        w, p = m.w, "model.layers.1.self_attn."
        rng = np.random.default_rng(0)
        T, d = 6, cfg["hidden_size"]
        x = rng.normal(size=(T, d))
        pos = np.arange(T)
        plain = m.mla(p, x, pos)[-1]
        H, dn, dr, dv, kvr = 2, 8, 4, 6, 12
        cq = R.rms_norm(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"], m.eps)
        q = (cq @ w[p + "q_b_proj.weight"].T).reshape(T, H, dn + dr)
        kv_a = x @ w[p + "kv_a_proj_with_mqa.weight"].T
        ckv = R.rms_norm(kv_a[:, :kvr], w[p + "kv_a_layernorm.weight"], m.eps)       # the cache
        kpe = R.apply_rope_interleaved(kv_a[:, kvr:], pos, m.inv_freq, m.cs_factor)  # the cache
        qpe = R.apply_rope_interleaved(q[..., dn:], pos, m.inv_freq, m.cs_factor)
        wkvb = w[p + "kv_b_proj.weight"].reshape(H, dn + dv, kvr)
        wuk, wuv = wkvb[:, :dn, :], wkvb[:, dn:, :]
        out = []
        for h in range(H):
            qt = wuk[h].T @ q[-1, h, :dn]                                            # [kvr]
            sc = (ckv @ qt + kpe @ qpe[-1, h]) * m.softmax_scale
            pr = R.softmax(sc)
            out.append(wuv[h] @ (pr @ ckv))
        absorbed = np.concatenate(out) @ w[p + "o_proj.weight"].T
        np.testing.assert_allclose(absorbed, plain, atol=1e-12)

    def test_mtp_layout(self):
        cfg = self.cfgs["v3"]
        m = tiny_model(cfg, G.policy_f32, 13)
        tok = self.tokens
        T, V = len(tok), cfg["vocab_size"]
        lg, h = m.forward(tok)
        (mt,) = m.mtp(tok, h)
        self.assertEqual(lg.shape, (T, V))
        self.assertEqual(mt.shape, (T - 1, V))
        # changing t_j changes main rows >= j and MTP rows >= j-1 only (row i uses t_{i+1}, h_i)
        for j in (1, 4, T - 1):
            t2 = list(tok)
            t2[j] = (t2[j] + 1) % V
            lg2, h2 = m.forward(t2)
            (mt2,) = m.mtp(t2, h2)
            np.testing.assert_array_equal(lg2[:j], lg[:j])
            np.testing.assert_array_equal(mt2[:j - 1], mt[:j - 1])
            self.assertGreater(np.max(np.abs(mt2[j - 1] - mt[j - 1])), 1e-6)
        # manual row 0 with T = 2: one position, attention weight 1 -> straight through the layer
        L = cfg["num_hidden_layers"]
        p = "model.layers.%d." % L
        lg2, h2 = m.forward(tok[:2])
        e = R.rms_norm(m.w[p + "embed_tokens.weight"][[tok[1]]], m.w[p + "enorm.weight"], m.eps)
        hh = R.rms_norm(h2[:1], m.w[p + "hnorm.weight"], m.eps)
        x = np.concatenate([e, hh], axis=1) @ m.w[p + "eh_proj.weight"].T    # embedding half first
        x = m.decoder_layer(L, x, np.arange(1))
        row0 = R.rms_norm(x, m.w[p + "shared_head.norm.weight"], m.eps) @ m.w[p + "shared_head.head.weight"].T
        np.testing.assert_allclose(m.mtp(tok[:2], h2)[0], row0, atol=1e-12)
        np.testing.assert_allclose(row0, mt[:1], atol=1e-11)
        # the module uses its own embedding copy, the main model does not
        m.w[p + "embed_tokens.weight"] = m.w[p + "embed_tokens.weight"] * 1.5
        lg3, h3 = m.forward(tok)
        np.testing.assert_array_equal(lg3, lg)
        self.assertGreater(np.max(np.abs(m.mtp(tok, h3)[0] - mt)), 1e-6)

    def test_mtp_depth2_rows(self):
        m = tiny_model(self.cfgs["v2group"], G.policy_f32, 14)
        lg, h = m.forward(self.tokens)
        outs = m.mtp(self.tokens, h)
        self.assertEqual([o.shape[0] for o in outs], [len(self.tokens) - 1, len(self.tokens) - 2])

    def test_first_k_dense(self):
        m = tiny_model(self.cfgs["v3"], G.policy_f32, 15)
        self.assertFalse(m.is_moe_layer(0))
        self.assertTrue(m.is_moe_layer(1))
        self.assertTrue(m.is_moe_layer(2))       # the MTP layer is MoE


class TestGolden(unittest.TestCase):
    """Every case in tests/data re-computes bit-exactly (as float32) through the CLI."""

    def cases(self):
        if not os.path.isdir(DATA):
            return []
        return sorted(c for c in os.listdir(DATA) if os.path.exists(os.path.join(DATA, c, "golden.json")))

    def test_cases(self):
        cases = self.cases()
        if not cases:
            self.skipTest("no tests/data (run tools/make_golden.py)")
        total = 0
        for c in cases:
            d = os.path.join(DATA, c)
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            total += size
            self.assertLess(size, 600 * 1024, c)
            with open(os.path.join(d, "golden.json")) as f:
                g = json.load(f)
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace",
                        "intermediate_size", "moe_intermediate_size", "num_attention_heads",
                        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                        "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                        "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob",
                        "routed_scaling_factor", "num_nextn_predict_layers", "rope_theta",
                        "rope_scaling", "max_position_embeddings", "rms_norm_eps",
                        "tie_word_embeddings", "model_type", "architectures", "torch_dtype",
                        "bos_token_id", "eos_token_id"):
                self.assertIn(key, cfg, c)
            with open(os.path.join(d, "tokens.txt")) as f:
                toks = [int(t) for t in f.read().strip().split(",")]
            self.assertEqual(toks, g["tokens"])
            T, V = g["T"], g["vocab"]
            with tempfile.TemporaryDirectory() as tmp:
                out, mout = os.path.join(tmp, "l.f32"), os.path.join(tmp, "m.f32")
                cmd = [sys.executable, os.path.join(HERE, "ref_model.py"), "--model", d,
                       "--tokens", ",".join(map(str, toks)), "--out", out]
                if g.get("mtp_logits"):
                    cmd += ["--mtp-out", mout]
                subprocess.run(cmd, check=True)
                a = np.fromfile(out, dtype="<f4")
                b = np.fromfile(os.path.join(d, g["logits"]), dtype="<f4")
                self.assertEqual(b.size, T * V)
                np.testing.assert_array_equal(a, b, err_msg=c)
                self.assertEqual(np.argmax(b.reshape(T, V), 1).tolist(), g["logits_argmax"])
                if g.get("mtp_logits"):
                    a = np.fromfile(mout, dtype="<f4")
                    b = np.fromfile(os.path.join(d, g["mtp_logits"]), dtype="<f4")
                    self.assertEqual(b.size, (T - 1) * V)
                    np.testing.assert_array_equal(a, b, err_msg=c)
        self.assertLess(total, 3 * 1024 * 1024)


class TestGoldenDiscriminates(unittest.TestCase):
    """The golden data is worth having only if plausible mistakes move the logits far beyond
    fp32 noise: each mutation below must change the main (or MTP) logits of its case by more
    than 1% of max|logit|."""

    def load(self, case):
        d = os.path.join(DATA, case)
        if not os.path.exists(os.path.join(d, "golden.json")):
            self.skipTest("no tests/data/%s" % case)
        with open(os.path.join(d, "golden.json")) as f:
            tokens = json.load(f)["tokens"]
        return R.Model.from_dir(d), tokens

    def effect(self, case, mutate):
        m, tok = self.load(case)
        lg, h = m.forward(tok)
        mt = m.mtp(tok, h)
        m2, _ = self.load(case)
        undo = mutate(m2)
        try:
            lg2, h2 = m2.forward(tok)
            mt2 = m2.mtp(tok, h2)
        finally:
            if undo:
                undo()
        rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        return rel(lg2, lg), (rel(mt2[0], mt[0]) if mt else 0.0)

    def assertMatters(self, case, mutate, which=0):
        e = self.effect(case, mutate)
        self.assertGreater(e[which], 0.01, "%s: %s" % (case, e))

    def test_rope_half_split(self):
        orig = R.apply_rope_interleaved

        def half_split(x, pos, f, cs):
            ang = np.asarray(pos, np.float64)[:, None] * f[None]
            shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (f.shape[0],)
            c, s = (np.cos(ang) * cs).reshape(shape), (np.sin(ang) * cs).reshape(shape)
            a, b = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return np.concatenate([a * c - b * s, a * s + b * c], -1)

        def mut(m):
            R.apply_rope_interleaved = half_split
            return lambda: setattr(R, "apply_rope_interleaved", orig)
        for case in ("v3", "v2lite", "v2group", "fp8"):
            self.assertMatters(case, mut)

    def test_yarn_parts(self):
        def no_ramp(m):
            r = m.cfg["qk_rope_head_dim"]
            m.inv_freq = 1.0 / m.cfg["rope_theta"] ** (np.arange(0, r, 2) / r)
        self.assertMatters("v2group", no_ramp)
        self.assertGreater(self.effect("v3", no_ramp)[0], 0.002)

        def no_cs(m):
            m.cs_factor = 1.0
        self.assertMatters("v2group", no_cs)

        def no_mscale(m):
            m.softmax_scale = (m.cfg["qk_nope_head_dim"] + m.cfg["qk_rope_head_dim"]) ** -0.5
        for case in ("v3", "v2group", "fp8"):
            self.assertMatters(case, no_mscale)

    def test_mtp_parts(self):
        def hidden_first(m):
            d, L = m.cfg["hidden_size"], m.cfg["num_hidden_layers"]
            k = "model.layers.%d.eh_proj.weight" % L
            m.w[k] = np.concatenate([m.w[k][:, d:], m.w[k][:, :d]], 1)

        def pre_norm_h(m):
            def fwd(tok):
                x = m.w["model.embed_tokens.weight"][np.asarray(tok)]
                for layer in range(m.cfg["num_hidden_layers"]):
                    x = m.decoder_layer(layer, x, np.arange(len(tok)))
                return R.linear(R.rms_norm(x, m.w["model.norm.weight"], m.eps), m.w["lm_head.weight"]), x
            m.forward = fwd
        for case in ("v3", "fp8"):
            self.assertMatters(case, hidden_first, 1)
            self.assertMatters(case, pre_norm_h, 1)

    def test_fp8_block_scales(self):
        raw = None

        def one_scale(m):
            nonlocal raw
            raw = raw or R.read_safetensors(os.path.join(DATA, "fp8", "model.safetensors"))
            n = 0
            for name, (dt, codes) in raw.items():
                if dt == "F8_E4M3" and raw[name + "_scale_inv"][1].size > 1:
                    m.w[name] = R.e4m3_decode(codes) * float(raw[name + "_scale_inv"][1][0, 0])
                    n += 1
            self.assertGreater(n, 0)
        self.assertMatters("fp8", one_scale)

    def test_router_parts(self):
        def gates_from_biased(m):
            def route(logits, bias):
                ids, w, rec = R.route(m.cfg, logits, bias)
                s = R.sigmoid(logits) + bias
                return ids, s[ids] / s[ids].sum() * m.cfg["routed_scaling_factor"], rec
            m.route = route

        def group_max(m):
            m.route = lambda logits, bias: _group_max(m.cfg, logits, bias)

        def no_scale(m):
            m.route = lambda logits, bias: R.route(dict(m.cfg, routed_scaling_factor=1.0), logits, bias)

        def no_groups(m):
            m.route = lambda logits, bias: R.route(dict(m.cfg, n_group=1, topk_group=1), logits, bias)
        for case in ("v3", "fp8"):
            self.assertMatters(case, gates_from_biased)
            self.assertMatters(case, group_max)
        for case in ("v3", "v2group", "fp8"):
            self.assertMatters(case, no_scale)
            self.assertMatters(case, no_groups)


def _group_max(cfg, logits, bias):
    """noaux_tc with the WRONG group score (the max, as in group_limited_greedy)."""
    s = R.sigmoid(logits)
    sel = s + bias
    N, G = len(s), cfg["n_group"]
    keep = np.argsort(-sel.reshape(G, -1).max(-1))[:cfg["topk_group"]]
    cand = np.zeros(G, bool)
    cand[keep] = True
    ids = np.argsort(-np.where(np.repeat(cand, N // G), sel, -np.inf))[:cfg["num_experts_per_tok"]]
    return ids, s[ids] / s[ids].sum() * cfg["routed_scaling_factor"], {}


if __name__ == "__main__":
    unittest.main()
