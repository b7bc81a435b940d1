"""decode_fwd and prefill_fwd (spec chapter 06 §10): the schedule, the stacked layout, the
forward against the layers chained by hand (C and golden, bit for bit), C against golden
at every layer, layer prefixes, lazy memmapped weights, the RoPE option, and atomicity.

A small model (SMALL) with FLASH's schedule: layers 0, 1 SWA, 2 CSA, 3 HCA."""

import numpy as np
import pytest

import dsv4
from conftest import SMALL, same_bits
from dsv4 import golden as G
from dsv4 import specs as S
from dsv4.forward import schedule
from dsv4.specs.forward import _layer_seed

N = 4
START = 1000
CHUNKS, STARTS = (20, 9), (40, 0)
DECODE_CACHES = dsv4.decode_fwd.inouts


def fresh(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


# ------------------------------------------------------------------------- schedule

def test_flash_schedule_is_the_drivers():
    # §10.1 by hand: L0, L1 SWA; L = 2i+2 CSA ordinal i, L = 2i+3 HCA ordinal i; L42 CSA 20
    want = [(0, "swa", 0), (1, "swa", 1)]
    for i in range(20):
        want += [(2 * i + 2, "csa", i), (2 * i + 3, "hca", i)]
    want.append((42, "csa", 20))
    assert schedule(config="flash") == want
    assert schedule(4, "flash") == want[:4]
    with pytest.raises(ValueError, match="layers = 44"):
        schedule(44, "flash")


# ------------------------------------------------------------------ decode, by hand

@pytest.fixture(scope="module")
def dec():
    return S.decode_fwd(START, N, n_local_experts=4, config=SMALL)


@pytest.fixture(scope="module")
def per_layer():
    """Each layer's own inputs, from the layer builder: the forward's stacks must slice to
    exactly these."""
    return [S.decode_layer(START, L, n_local_experts=4, seed=_layer_seed(0, L), config=SMALL)
            for L in range(N)]


def chain(layer, hc_head, rms_norm, layers, x, **override):
    """The layers called one after another, then hc_head and the final norm per rank."""
    outs = []
    for L, d in enumerate(layers):
        kw = {**fresh(d), "x_hc": x, **override.get(str(L), {})}
        out = layer(**kw, config=SMALL)
        x = out["x_next"]
        outs.append(out)
    return outs, x


def head(hc_head, rms_norm, x, d):
    R = x.shape[0]
    y = [hc_head(x[r], d["hc_head_fn"][r], d["hc_head_scale"][r], d["hc_head_base"][r],
                 config=SMALL)["y"] for r in range(R)]
    return np.stack([rms_norm(y[r], d["final_norm_w"][r], config=SMALL)["x_normed"]
                     for r in range(R)])


@pytest.fixture(scope="module")
def dec_runs(dec):
    """golden and C forward outputs, with stages"""
    return tuple(ns.decode_fwd(**fresh(dec), config=SMALL, stages=True) for ns in (G, dsv4))


@pytest.mark.parametrize("impl", ["golden", "c"])
def test_decode_fwd_is_the_layers_chained(impl, dec, per_layer, dec_runs):
    ns = G if impl == "golden" else dsv4
    out = dec_runs[impl == "c"]
    outs, x = chain(ns.decode_layer, ns.hc_head, ns.rms_norm, per_layer, dec["x_hc"])
    for L in range(N):
        assert same_bits(out["stages"]["x_next"][L], outs[L]["x_next"]), L
    assert same_bits(out["hidden_out"], head(ns.hc_head, ns.rms_norm, x, dec))
    # the stacked caches hold each layer's updated cache in its block
    for L, kind, o in schedule(N, SMALL):
        for name in DECODE_CACHES:
            g = "csa" if name.startswith("csa_") or name == "idx_kv_cache" else \
                "hca" if name.startswith("hca_") else "fwd"
            if g != "fwd" and g != kind:
                continue
            a, i = out[name], (L if g == "fwd" else o)
            n = a.shape[1] // (N if g == "fwd" else 1)
            assert same_bits(a[:, i * n:(i + 1) * n], outs[L][name]), (L, name)
    # and the stacks changed where the layers wrote (the test could not pass vacuously)
    assert not same_bits(out["kv_cache"], dec["kv_cache"])


def assert_each_layer_matches_golden(fwd, inputs, layers, c, g, overrides=None, meta=None):
    """Each C layer against the golden layer run on the input the C forward gave it, for
    x_next and for that layer's slice of every cache: chained, the two forwards drift
    apart from layer to layer (a bf16 residual stream), so their caches are not compared
    chained."""
    layer_name = fwd.replace("_fwd", "_layer")
    caches = getattr(dsv4, fwd).inouts
    kw = {} if meta is None else {"inputs": meta}
    xs = c["stages"]["x_next"]
    owner = {"csa_": "csa", "idx_": "csa", "hca_": "hca"}
    seen = set()
    for L, kind, _ in schedule(N, SMALL):
        x_in = inputs["x_hc"] if L == 0 else xs[L - 1]
        want = getattr(G, layer_name)(**{**fresh(layers[L]), **(overrides or {}), "x_hc": x_in},
                                      config=SMALL)
        if L == 0:
            assert same_bits(want["x_next"], g["stages"]["x_next"][0])
        r = S.COMPARATORS[layer_name]["x_next"](xs[L], want["x_next"], name=f"x_next[{L}]", **kw)
        assert r.passed, r.message
        for name in caches:
            m = want[name].shape[1]
            if c[name].shape[1] == N * m:
                got = c[name][:, L * m:(L + 1) * m]
            elif owner.get(name[:4]) == kind:
                got = c[name]
            else:
                continue
            r = S.COMPARATORS[fwd][name](got, want[name], name=f"{name} of layer {L}", **kw)
            assert r.passed, r.message
            seen.add(name)
    assert seen == set(caches)


def test_decode_fwd_c_matches_golden_at_every_layer(dec, dec_runs, per_layer):
    g, c = dec_runs
    assert_each_layer_matches_golden("decode_fwd", dec, per_layer, c, g)
    want = head(G.hc_head, G.rms_norm, c["stages"]["x_next"][N - 1], dec)
    r = S.COMPARATORS["decode_fwd"]["hidden_out"](c["hidden_out"], want, name="hidden_out")
    assert r.passed, r.message


def test_decode_fwd_layers_prefix_and_lm_head(dec, dec_runs):
    _, full = dec_runs
    w = S.lm_head(T=8, tp=2, vocab_size=64, config=SMALL)["lm_head_weight"]
    out = dsv4.decode_fwd(**fresh(dec), layers=3, lm_head_weight=w, config=SMALL, stages=True)
    assert out["stages"]["x_next"].shape[0] == 3
    assert same_bits(out["stages"]["x_next"], full["stages"]["x_next"][:3])
    assert same_bits(out["hidden_out"], head(dsv4.hc_head, dsv4.rms_norm,
                                             full["stages"]["x_next"][2], dec))
    assert same_bits(out["logits"], dsv4.lm_head(out["hidden_out"], w)["logits"])
    assert out["logits"].shape == (2, 8, 64)


def test_decode_fwd_thread_count_does_not_change_bits(dec, dec_runs, threads):
    threads(1)
    one = dsv4.decode_fwd(**fresh(dec), layers=3, config=SMALL)
    assert same_bits(one["hidden_out"], dsv4.decode_fwd(**fresh(dec), layers=3, config=SMALL,
                                                        stages=True)["hidden_out"])
    threads(2)
    two = dsv4.decode_fwd(**fresh(dec), layers=3, config=SMALL)
    assert same_bits(one["hidden_out"], two["hidden_out"])


def test_decode_fwd_lazy_memmapped_weights(dec, dec_runs, per_layer, tmp_path):
    """One .npy per layer tensor, opened as memmaps per layer: the same bits as the
    stacks, and the caches in the files updated in place."""
    _, want = dec_runs
    shared = set(dsv4.forward._SHARED_DECODE)
    dtypes = {}
    for L, d in enumerate(per_layer):
        for name, a in d.items():
            if isinstance(a, np.ndarray) and name not in shared and name != "x_hc":
                # .npy has no bf16: stored as same-width ints, viewed back on load
                dtypes[name] = a.dtype
                np.save(tmp_path / f"{L}.{name}.npy", a.view(f"u{a.dtype.itemsize}"))
    calls = []

    def layer_weights(L):
        calls.append(L)
        return {p.name.split(".")[1]: np.load(p, mmap_mode="r+").view(dtypes[p.name.split(".")[1]])
                for p in tmp_path.glob(f"{L}.*.npy")}

    head_in = {k: dec[k] for k in ("hc_head_fn", "hc_head_scale", "hc_head_base", "final_norm_w")}
    out = dsv4.decode_fwd(dec["x_hc"], **{k: dec[k] for k in shared}, **head_in,
                          layer_weights=layer_weights, layers=N, config=SMALL, stages=True)
    assert same_bits(out["stages"]["x_next"], want["stages"]["x_next"])
    assert same_bits(out["hidden_out"], want["hidden_out"])
    assert sorted(set(calls)) == list(range(N))
    kv3 = np.load(tmp_path / "3.kv_cache.npy").view(dtypes["kv_cache"])
    n = want["kv_cache"].shape[1] // N
    assert same_bits(kv3, want["kv_cache"][:, 3 * n:4 * n])
    assert not same_bits(kv3, per_layer[3]["kv_cache"])


def test_decode_fwd_model_rope(dec, dec_runs, per_layer):
    """rope="model": the CSA layer (2) gets the ratio-4 compress tables, SWA layers the
    ones given."""
    _, pypto = dec_runs
    out = dsv4.decode_fwd(**fresh(dec), layers=3, rope="model", config=SMALL, stages=True)
    cos, sin = dsv4.rope_tables(SMALL, compress_ratio=4, max_seq_len=dec["freqs_cos"].shape[1],
                                rope_dim=dec["freqs_cos"].shape[2])
    R = dec["x_hc"].shape[0]
    tables = {"2": {"freqs_cos": np.stack([cos] * R), "freqs_sin": np.stack([sin] * R)}}
    outs, _ = chain(dsv4.decode_layer, None, None, per_layer[:3], dec["x_hc"], **tables)
    assert same_bits(out["stages"]["x_next"][:2], pypto["stages"]["x_next"][:2])
    assert same_bits(out["stages"]["x_next"][2], outs[2]["x_next"])
    assert not same_bits(out["stages"]["x_next"][2], pypto["stages"]["x_next"][2])


# --------------------------------------------------------------------- bad input

def test_decode_fwd_bad_input_changes_nothing(dec, tmp_path):
    def unchanged(d):
        return all(same_bits(d[n], dec[n]) for n in DECODE_CACHES)

    d = fresh(dec)
    d["ori_slot_mapping"] = d["ori_slot_mapping"] * 1000
    with pytest.raises(ValueError, match="ori_slot_mapping"):
        dsv4.decode_fwd(**d, config=SMALL)
    assert unchanged(d)

    # a bad tensor in a later layer is found before layer 0 runs: in the first layer of
    # its kind by the C kernel's checks, in a later one against that first layer
    d = fresh(dec)
    bad = d["hca_cmp_norm_w"][:, :-1]
    with pytest.raises(ValueError, match="decode_fwd: layer 3 \\(HCA\\): .*hca_cmp_norm_w"):
        dsv4.decode_fwd(**d, layer_weights=lambda L: {"hca_cmp_norm_w": bad} if L == 3 else {},
                        config=SMALL)
    sink = d["attn_sink"][:, :3]
    with pytest.raises(ValueError, match="layer 1 .*'attn_sink'.* disagrees with layer 0"):
        dsv4.decode_fwd(**d, layer_weights=lambda L: {"attn_sink": sink} if L == 1 else {},
                        config=SMALL)
    assert unchanged(d)
    with pytest.raises(TypeError, match="unknown tensor.*'wq_x'"):
        dsv4.decode_fwd(**d, layer_weights=lambda L: {"wq_x": 0}, config=SMALL)
    with pytest.raises(TypeError, match="decode_fwd: missing argument 'final_norm_w'"):
        dsv4.decode_fwd(**{**d, "final_norm_w": None}, config=SMALL)
    with pytest.raises(ValueError, match="stacked 'wkv'"):
        dsv4.decode_fwd(**{**d, "wkv": d["wkv"][:, :-1]}, config=SMALL)
    with pytest.raises(ValueError, match="layers = 5 but the stacks hold 4"):
        dsv4.decode_fwd(**d, layers=5, config=SMALL)
    with pytest.raises(ValueError, match="rope = 'yarn'"):
        dsv4.decode_fwd(**d, rope="yarn", config=SMALL)
    with pytest.raises(TypeError, match="layer 2 .*needs 'csa_cmp_wkv'"):
        dsv4.decode_fwd(**{**d, "csa_cmp_wkv": None}, config=SMALL)
    assert unchanged(d)


# ------------------------------------------------------------------------ prefill

@pytest.fixture(scope="module")
def pre():
    return S.prefill_fwd(CHUNKS, STARTS, N, n_local_experts=4, config=SMALL)


@pytest.fixture(scope="module")
def pre_runs(pre):
    return tuple(ns.prefill_fwd(**fresh(pre), config=SMALL, stages=True) for ns in (G, dsv4))


@pytest.fixture(scope="module")
def pre_layers():
    return [S.prefill_layer(L, CHUNKS, STARTS, n_local_experts=4, seed=_layer_seed(0, L),
                            config=SMALL) for L in range(N)]


@pytest.mark.parametrize("impl", ["golden", "c"])
def test_prefill_fwd_is_the_layers_chained(impl, pre, pre_runs, pre_layers):
    ns = G if impl == "golden" else dsv4
    layers = pre_layers
    out = pre_runs[impl == "c"]
    # rope="pypto": every layer gets the tables given (the layer builder gives CSA and HCA
    # layers their compress tables)
    tables = {str(L): {k: pre[k] for k in ("freqs_cos", "freqs_sin")} for L in range(N)}
    outs, x = chain(ns.prefill_layer, None, None, layers, pre["x_hc"], **tables)
    for L in range(N):
        assert same_bits(out["stages"]["x_next"][L], outs[L]["x_next"]), L
    want = head(ns.hc_head, ns.rms_norm, x, pre)
    m = dsv4.prefill_metadata(CHUNKS, STARTS, layer_id=0, n_ranks=2, config=SMALL)
    valid = np.zeros(x.shape[1], bool)
    for n, base in zip(m["chunk_lens"][0], m["chunk_offsets"][0]):
        valid[base:base + n] = True
    assert same_bits(out["x_out"][:, valid], want[:, valid])
    assert not out["x_out"][:, ~valid].astype(np.float32).any()
    for L, kind, o in schedule(N, SMALL):
        name = "kv_cache"
        n = out[name].shape[1] // N
        assert same_bits(out[name][:, L * n:(L + 1) * n], outs[L][name]), L
        if kind == "csa":
            assert same_bits(out["csa_cmp_kv_state"], outs[L]["csa_cmp_kv_state"])


def test_prefill_fwd_c_matches_golden_at_every_layer(pre, pre_runs, pre_layers):
    g, c = pre_runs
    meta = dsv4.prefill_metadata(CHUNKS, STARTS, layer_id=0, n_ranks=2, config=SMALL)
    tables = {k: pre[k] for k in ("freqs_cos", "freqs_sin")}
    assert_each_layer_matches_golden("prefill_fwd", pre, pre_layers, c, g, tables, meta)
    want = head(G.hc_head, G.rms_norm, c["stages"]["x_next"][N - 1], pre)
    valid = np.zeros(want.shape[1], bool)
    for n, base in zip(meta["chunk_lens"][0], meta["chunk_offsets"][0]):
        valid[base:base + n] = True
    want[:, ~valid] = 0
    r = S.COMPARATORS["prefill_fwd"]["x_out"](c["x_out"], want, name="x_out", inputs=meta)
    assert r.passed, r.message


# ------------------------------------------------------------- finding the layer

def test_verify_names_the_first_layer_that_departs(dec, dec_runs):
    """An NPU forward whose layer 2 went wrong: verify compares x_next layer by layer with
    the layer comparator; layers 0 and 1 pass, 2 and 3 fail."""
    c = dec_runs[1]
    npu = c["stages"]["x_next"].copy()
    npu[2] = (npu[2].astype(np.float32) * np.float32(1.05)).astype(npu.dtype)
    npu[3] = dsv4.forward.each_layer("decode_fwd", dec, npu, config=SMALL)[3]  # right, on a wrong input
    report = dsv4.verify("decode_fwd", {"x_next": npu, "hidden_out": c["hidden_out"]},
                         dec, config=SMALL)
    verdict = {n: r.passed for n, r in report.results.items()}
    assert verdict == {"x_next[0]": True, "x_next[1]": True, "x_next[2]": False,
                       "x_next[3]": True, "hidden_out": True}
    # the golden forward drifts from the C one layer by layer, but no layer errs on its own
    g = dec_runs[0]
    report = dsv4.verify("decode_fwd", {"x_next": g["stages"]["x_next"]}, dec, config=SMALL)
    assert report.passed and len(report.results) == N, str(report)


def test_each_layer_runs_each_layer_on_the_given_input(dec, dec_runs, per_layer):
    c = dec_runs[1]
    x = c["stages"]["x_next"].copy()
    x[1] = x[0]             # layer 2 now gets layer 0's output as its input
    got = dsv4.forward.each_layer("decode_fwd", dec, x, config=SMALL)
    kw = {**fresh(per_layer[2]), "x_hc": x[0]}
    assert same_bits(got[2], dsv4.decode_layer(**kw, config=SMALL)["x_next"])
    assert same_bits(got[1], c["stages"]["x_next"][1])
    before = {n: dec[n].copy() for n in DECODE_CACHES}
    assert all(same_bits(dec[n], before[n]) for n in DECODE_CACHES)


def test_check_runs_the_forward():
    (r,) = dsv4.check("decode_fwd", start_pos=START, layers=3, n_local_experts=4, config=SMALL,
                      repeat=1)
    assert r.passed, str(r)
    assert set(r.report.results) == {"x_next[0]", "x_next[1]", "x_next[2]", "hidden_out"}
