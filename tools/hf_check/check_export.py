"""Loads `gyre export` directories in transformers itself and compares its logits with ours.

Each directory holds model.safetensors + config.json (eval/export.h) and gyre_logits.json (our
logits of a few token sequences, written by make_exports.cc from ops::LanguageModel::Logits).
For each directory: AutoModelForCausalLM.from_pretrained(dir, dtype=float32) on the CPU (no TF32,
no fused kernels: for Mamba-2 this is transformers' torch_forward, the chunked SSD), with the
loading report (missing / unexpected / mismatched keys must all be empty), then the logits of
every saved sequence against ours: max |ours - theirs| / max |theirs|. For Mamba-2 a negative
control (z and x rows of one in_proj swapped) must fail the same comparison.

xLSTM Large (xLSTMForCausalLM, native PyTorch backend, mode "inference"): the exported config runs
transformers' chunkwise kernel over the largest multiple of chunk_size, then its recurrent
sequence kernel for the rest, and its step kernel for T = 1; the same files are loaded a second
time with chunk_size 4096 (> T), so every length runs the recurrent sequence kernel alone. Both
forms are checked (use_cache=False). A third, informational forward uses the default call
(use_cache=True: xLSTMCache, whose state shapes are qk_dim / v_dim rounded up to 64). Negative
controls: layer 0's input and forget gates swapped, and the logit soft cap switched off.

bf16 / f16 exports (`gyre export --dtype`; gyre_logits.json "dtype"): our logits are those of the
masters rounded to that type, so the fp32 comparison above holds them to the same tolerance; in
addition every tensor's safetensors dtype tag must be the config's torch_dtype, and a load with
dtype="auto" must give parameters of that torch dtype (transformers reads our torch_dtype).

Tolerance (fp32 against fp32, different summation orders, a few layers): 1e-4 relative. A wrong
name, shape, gate order, B/C grouping or conv tap order moves logits by O(1) relative. The same
forward again after model.double() shows how much of the gap is our fp32 rounding (transformers'
Mamba-2 torch_forward casts x, B, C and the gated norm to float32 even then).

usage: python3 check_export.py DIR [DIR ...]     (exit status 1 if any check fails)
"""
import copy
import inspect
import json
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4


def load(path, dtype_arg=torch.float32, **overrides):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype_arg, output_loading_info=True, **overrides)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype_arg, output_loading_info=True, **overrides)


def compare(label, model, double, saved, problems, rows, use_cache=False):
    """Our saved logits against `model`'s (and `double`'s when given) for every saved sequence."""
    for seq in saved["sequences"]:
        ids = torch.tensor([seq["ids"]], dtype=torch.long)
        ours = torch.tensor(seq["logits"], dtype=torch.float64)
        try:
            with torch.no_grad():
                theirs = model(input_ids=ids, use_cache=use_cache).logits[0].to(torch.float64)
        except Exception as e:
            print(f"   {label} T={len(seq['ids'])}: forward raised {type(e).__name__}: {str(e)[:300]} -> FAIL")
            rows.append((label, len(seq["ids"]), float("nan"), float("nan"), float("nan"), False))
            continue
        theirs64 = torch.full_like(theirs, float("nan"))
        if double is not None:
            try:
                with torch.no_grad():
                    theirs64 = double(input_ids=ids, use_cache=use_cache).logits[0].to(torch.float64)
            except Exception as e:
                print(f"   float64 forward failed: {type(e).__name__}: {e}")
        if ours.shape != theirs.shape:
            print(f"   {label} T={len(seq['ids'])}: shape {tuple(ours.shape)} (ours) vs {tuple(theirs.shape)} -> FAIL")
            rows.append((label, len(seq["ids"]), float("nan"), float("nan"), float("nan"), False))
            continue
        err, err64 = relative_error(ours, theirs), relative_error(ours, theirs64)
        abs_err = (ours - theirs).abs().max().item()
        argmax = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        ok = err <= TOLERANCE and not problems
        print(f"   {label} T={len(seq['ids']):3d}: max abs {abs_err:.3e}, rel {err:.3e} (vs transformers .double(): "
              f"{err64:.3e}), max |logit| {theirs.abs().max().item():.2f}, argmax agree {argmax:.3f} -> "
              f"{'PASS' if ok else 'FAIL'}")
        rows.append((label, len(seq["ids"]), abs_err, err, err64, ok))


def control(label, model, saved, rows):
    """A deliberately wrong model must miss our logits of the first sequence by more than the tolerance."""
    seq = saved["sequences"][0]
    try:
        with torch.no_grad():
            theirs = model(input_ids=torch.tensor([seq["ids"]]), use_cache=False).logits[0].to(torch.float64)
    except Exception as e:
        print(f"   negative control ({label}): forward raised {type(e).__name__}: {str(e)[:200]} -> FAIL")
        rows.append((saved["case"] + " ctl " + label.split(" ")[0], len(seq["ids"]), float("nan"), float("nan"),
                     float("nan"), False))
        return
    err = relative_error(torch.tensor(seq["logits"], dtype=torch.float64), theirs)
    print(f"   negative control ({label}): rel {err:.3e} -> {'detected' if err > TOLERANCE else 'MISSED'}")
    rows.append((saved["case"] + " ctl " + label.split(" ")[0], len(seq["ids"]), float("nan"), err, float("nan"),
                 err > TOLERANCE))


def check_xlstm(path, saved, config, model, problems, rows):
    module = sys.modules[type(model).__module__]
    try:  # facts about the code that runs (5.17's may differ from the source read for the mapping)
        layer = model.backbone.blocks[0].mlstm_layer
        print(f"   xlstm external package in use: {getattr(module, 'external_xlstm', None)}; backend "
              f"{type(layer.mlstm_backend).__name__}, mode {model.config.mode}, chunk_size {model.config.chunk_size}, "
              f"qk_dim {getattr(layer, 'qk_dim', None)}, v_dim {getattr(layer, 'v_dim', None)}, cache qk_head_dim "
              f"{getattr(model.config, 'qk_head_dim', None)}, v_head_dim {getattr(model.config, 'v_head_dim', None)}")
        fw_h = getattr(module, "mlstm_chunkwise_parallel_fw_H", None)
        if fw_h is not None:
            src = inspect.getsource(fw_h)
            print(f"   mlstm_chunkwise_parallel_fw_H calls vecM_k_combine(...) as a function: {'vecM_k_combine(' in src}")
    except Exception as e:
        print(f"   (module facts: {type(e).__name__}: {e})")
    try:
        double = copy.deepcopy(model).double().eval()
    except Exception as e:
        print(f"   no float64 copy: {type(e).__name__}: {e}")
        double = None
    name = saved["case"]
    compare(name, model, double, saved, problems, rows)
    recurrent, info = load(path, chunk_size=4096)
    recurrent.eval()
    compare(name + " recurrent", recurrent, None, saved, problems, rows)
    # Informational: the default call (use_cache=True, xLSTMCache). Not counted.
    seq = saved["sequences"][0]
    try:
        with torch.no_grad():
            theirs = model(input_ids=torch.tensor([seq["ids"]])).logits[0].to(torch.float64)
        err = relative_error(torch.tensor(seq["logits"], dtype=torch.float64), theirs)
        print(f"   default call (use_cache=True) T={len(seq['ids'])}: rel {err:.3e} (informational)")
    except Exception as e:
        print(f"   default call (use_cache=True) raised {type(e).__name__}: {str(e)[:200]} (informational)")
    # The controls run on the exported form, or on the recurrent one if the exported form raised.
    raised = any(r[3] != r[3] for r in rows if r[0] == name)  # NaN: the forward raised
    base = recurrent if raised else model
    bad = copy.deepcopy(base)
    layer = bad.backbone.blocks[0].mlstm_layer
    with torch.no_grad():
        for p in ("weight", "bias"):
            i, f = getattr(layer.igate_preact, p), getattr(layer.fgate_preact, p)
            tmp = i.clone()
            i.copy_(f)
            f.copy_(tmp)
    control("i/f gates swapped in layer 0", bad, saved, rows)
    uncapped = copy.deepcopy(base)
    uncapped.config.output_logit_soft_cap = 1e9  # 1e9·tanh(l/1e9) = l: off (None may fail the strict config)
    control("logit cap off", uncapped, saved, rows)


def check_dtype(path, saved, config, rows):
    """A bf16 / f16 export: header tags, and the dtype transformers picks with dtype="auto"."""
    want = config.get("torch_dtype", "float32")
    tag = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[want]
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    tags = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
    try:  # the embedding's dtype counts (a class may keep a few modules in fp32: printed, not counted)
        auto, _ = load(path, dtype_arg="auto")
        got = str(auto.get_input_embeddings().weight.dtype)
        every = sorted({str(p.dtype) for p in auto.parameters()})
    except Exception as e:
        got, every = f"load raised {type(e).__name__}: {str(e)[:200]}", []
    ok = tags == [tag] and got == f"torch.{want}"
    print(f"   dtype {saved.get('dtype')}: safetensors tags {tags} (want {tag}); dtype='auto' load: embedding {got} "
          f"(want torch.{want}), all parameters {every} -> {'PASS' if ok else 'FAIL'}")
    rows.append((saved["case"] + " dtype", 0, float("nan"), float("nan"), float("nan"), ok))


def relative_error(ours, theirs):
    return (ours - theirs).abs().max().item() / theirs.abs().max().item()


def check(path):
    rows = []
    saved = json.load(open(os.path.join(path, "gyre_logits.json")))
    config = json.load(open(os.path.join(path, "config.json")))
    model, info = load(path)
    model.eval()
    # A tied head has no lm_head.weight in the file; transformers ties it to the embedding.
    allowed = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    problems = {k: [x for x in v if x not in allowed] for k, v in info.items() if v}
    problems = {k: v for k, v in problems.items() if v}
    print(f"== {saved['case']}: {type(model).__name__} ({config['architectures'][0]}), {saved['model']}")
    print(f"   trained {saved['train_steps']} steps, loss {saved['first_loss']:.4f} -> {saved['last_loss']:.4f}")
    print(f"   loading report: {info}")
    if config.get("torch_dtype", "float32") != "float32":
        check_dtype(path, saved, config, rows)
    if config["model_type"] == "xlstm":
        check_xlstm(path, saved, config, model, problems, rows)
        return rows
    if config["model_type"] == "mamba2":
        module = sys.modules[type(model).__module__]
        fast = getattr(module, "is_fast_path_available", None)
        norm_src = inspect.getsource(module.MambaRMSNormGated.forward)
        print(f"   mamba2 fast path available: {fast}; MambaRMSNormGated groups its norm: {'group' in norm_src}")
    try:  # transformers' Mamba-2 torch_forward casts parts to float32 even then: "fp64" is mostly fp64
        double = copy.deepcopy(model).double().eval()
    except Exception as e:
        print(f"   no float64 copy: {type(e).__name__}: {e}")
        double = None
    compare(saved["case"], model, double, saved, problems, rows)
    if config["model_type"] == "mamba2":
        # Negative control: the same check on a copy whose layer-0 in_proj has its z and x row blocks
        # swapped (a wrong [z | x | B | C | dt] order) must miss by far more than the tolerance.
        bad = copy.deepcopy(model)
        inner = config["expand"] * config["hidden_size"]
        with torch.no_grad():
            w = bad.backbone.layers[0].mixer.in_proj.weight
            w[: 2 * inner] = torch.cat([w[inner : 2 * inner].clone(), w[:inner].clone()])
            seq = saved["sequences"][0]
            theirs = bad(input_ids=torch.tensor([seq["ids"]]), use_cache=False).logits[0].to(torch.float64)
        err = relative_error(torch.tensor(seq["logits"], dtype=torch.float64), theirs)
        print(f"   negative control (z/x swapped in layer 0): rel {err:.3e} -> {'detected' if err > TOLERANCE else 'MISSED'}")
        rows.append((saved["case"] + " control", len(seq["ids"]), float("nan"), err, float("nan"), err > TOLERANCE))
    return rows


def main():
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, tolerance {TOLERANCE:g} relative (fp32)")
    start = time.time()
    rows = []
    for path in sys.argv[1:]:
        try:
            rows += check(path)
        except Exception as e:  # report and go on to the next export
            print(f"== {path}: ERROR {type(e).__name__}: {e}")
            rows.append((os.path.basename(path), 0, float("nan"), float("nan"), float("nan"), False))
    print(f"\n{time.time() - start:.1f} s")
    print(f"{'case':<34} {'T':>3} {'max abs':>10} {'rel fp32':>10} {'rel f64':>10}  result")
    for case, t, a, r, r64, ok in rows:
        print(f"{case:<34} {t:>3} {a:>10.3e} {r:>10.3e} {r64:>10.3e}  {'PASS' if ok else 'FAIL'}")
    passed = sum(ok for *_, ok in rows)
    print(f"{passed}/{len(rows)} PASS")
    return 0 if rows and passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
