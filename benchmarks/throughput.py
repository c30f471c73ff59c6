"""Training throughput side by side: resure-ds, TRL's SFTTrainer and a plain torch loop.

One run, the same model (the embedded SmolLM2-135M-Instruct), the same
chitchat dialogues, rows of the same max_length, the same rows per step and
the same number of timed steps, one process each, one after another:

  resure packed / padded   the recipe (launch/train.sh, 1 rank, ZeRO-0), train.method=resure
  resure packed z3         the same at ZeRO-3 (on one rank: the cost of its gather/release hooks)
  sft packed / padded      the same with train.method=sft
  trl packed / padded      trl.SFTTrainer: packing=True (best-fit decreasing, padding-free,
                           position ids) and packing=False (padded batches)
  plain                    a plain torch loop on the recipe's own packed batches: the model's
                           own loss (labels), AdamW, gradient clipping; nothing else. In bf16 it
                           steps bf16 weights with bf16 Adam moments
  plain master             the same loop keeping what the recipe's bf16 path keeps: fp32 master
                           weights and Adam moments, each gradient copied to fp32, the bf16 weights
                           copied back after the step (in fp32: the plain loop again)

Real tokens are non-padding tokens. The first --warmup steps of each are not
timed. Ratios printed at the end: resure packed against TRL's best, against
the plain loops (the same batches, so the same tokens) and against sft.
--repeats N runs the whole list N times, interleaved (A B A B ...), so slow
spells of the machine fall on every configuration alike; each ratio is then
given per repeat, with its median.
Extra dependencies: benchmarks/requirements.txt (trl). Dtype: --dtype, else
what the recipe's model.dtype=auto picks here (fp32 on an AVX2-only CPU); the
results name the CPU's bf16 support and the dtype.

    python benchmarks/throughput.py [--lengths 256 1024] [--tokens 1024] [--steps 5] [--warmup 2] [--dtype fp32]
                                    [--only NAME ...] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "benchmarks", "work", "throughput")
CONFIGS = ["resure-packed", "resure-packed-z3", "resure-padded", "sft-packed", "sft-padded", "trl-packed", "trl-padded",
           "plain", "plain-master"]
SEED = 1234


def child_env(**extra: str) -> dict:
    """This environment for a child process, with the repository first on its PYTHONPATH (and
    what was there kept: e.g. a folder holding TRL)."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def recipe(name: str, length: int, mb: int, steps: int, overrides: tuple = (), quiet: bool = True,
           run_name: str | None = None) -> dict:
    """The recipe as a user runs it, one rank (ZeRO-0 unless overrides say otherwise; later
    overrides win); timing from its metrics.jsonl. quiet: keep the run's output. The run folder:
    WORK/run_name (default NAME-LENGTH), in "dir" of the result."""
    method, layout, *zero = name.split("-")
    run_name = run_name or f"{name}-{length}"
    env = {**os.environ, "NUM_PROCS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    args = ["recipes/default.yaml", f"train.method={method}", f"data.packing={layout == 'packed'}".lower(),
            f"data.max_length={length}", f"train.micro_batch_size={mb}", "train.zero_stage=0",
            f"train.max_steps={steps}", f"train.seed={SEED}", "checkpoint.every=0", "checkpoint.keep_last=0",
            "checkpoint.export=false", "output.plot=false", "output.report=false", "output.report_to=none", f"output.dir={WORK}",
            f"output.name={run_name}", *(["train.zero_stage=3"] if zero == ["z3"] else []), *overrides]
    subprocess.run(["bash", "launch/train.sh", *args], cwd=ROOT, env=env, check=True, capture_output=quiet)
    with open(os.path.join(WORK, run_name, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(ln) for ln in f]
    return {"times": [r["step_time_s"] for r in rows], "tokens": [r["tokens_per_s"] * r["step_time_s"] for r in rows],
            "split": [{k: v for k, v in r.items() if k.startswith("time_")} for r in rows],
            "dir": os.path.join(WORK, run_name)}


def _setup(length: int, model_path: str | None = None, overrides: tuple = ()):
    """The recipe's config at this max_length, its model (the embedded one unless model_path),
    tokenizer and resolved dtype."""
    from resure_ds.config import load_config
    from resure_ds.runtime.engine import resolve_dtype
    from resure_ds.models import load_tokenizer, resolve_model_path

    extra = [f"model.path={model_path}"] if model_path else []
    cfg = load_config(os.path.join(ROOT, "recipes", "default.yaml"), [f"data.max_length={length}", *extra, *overrides])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    return cfg, path, tok, resolve_dtype(cfg)


def plain(length: int, mb: int, steps: int, model_path: str | None = None, overrides: tuple = (),
          compile: bool = False, master: bool = False) -> dict:
    """A plain loop on the recipe's packed batches (the same rows resure-packed trains on): the
    model's own loss, AdamW (fused on CUDA), clipping; compile: under torch.compile; master: with
    fp32 master weights and moments under a bf16 model (what DeepSpeed's bf16 path keeps). On CUDA,
    timed between synchronisations."""
    import torch
    from transformers import AutoModelForCausalLM

    from resure_ds.data.loader import RankBatches, Stream
    from resure_ds.data.order import Cursor
    from resure_ds.data.prepare import ensure_prepared
    from resure_ds.runtime import attention

    cfg, path, tok, dtype = _setup(length, model_path, overrides)
    prepared = ensure_prepared(cfg, tok, path, progress=False)
    batches = iter(RankBatches(Stream([p.folder for p in prepared], [p.spec.weight for p in prepared], SEED, length,
                                      True, cfg.data.pack_window, mb, tok.pad_token_id), 0, 1, Cursor()))
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(SEED)
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                                 attn_implementation=attention.resolve(cfg.model.attn_implementation)
                                                 ).to(dev)
    model.config.use_cache = False
    model.train()
    if compile:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in params] if master and dtype == "bf16" else None
    opt = torch.optim.AdamW(masters or params, lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
    times, tokens, split = [], [], []
    for _ in range(steps):
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if masters:  # the gradients into fp32, the step there, the weights back into the bf16 model
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        times.append(t3 - t0)
        tokens.append(int((b["doc_ids"] >= 0).sum()))
        if not cuda:  # phases by the host clock: on a GPU only the total is synchronised
            split.append({"time_forward_s": t1 - t0, "time_backward_s": t2 - t1, "time_optimizer_s": t3 - t2})
    return {"times": times, "tokens": tokens, "split": split or None}


def trl(packing: bool, length: int, mb: int, steps: int, model_path: str | None = None,
        dtype: str | None = None) -> dict:
    """TRL's SFTTrainer on the same conversations (those with a reply), its defaults otherwise
    (model_path: another model of SmolLM2's tokenizer; dtype: instead of the recipe's auto)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from resure_ds.data.chitchat import chitchat_records

    _, path, tok, auto = _setup(length, model_path)
    dtype = dtype or auto
    convs = [r["messages"] for _, r in chitchat_records(stop=3000)
             if any(m["role"] == "assistant" for m in r["messages"])]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    args = SFTConfig(output_dir=os.path.join(WORK, "trl"), per_device_train_batch_size=mb, max_length=length,
                     packing=packing, max_steps=steps, learning_rate=5e-5, adam_beta2=0.95, max_grad_norm=1.0,
                     lr_scheduler_type="constant", logging_steps=10 ** 6, save_strategy="no", report_to=[],
                     use_cpu=not torch.cuda.is_available(), bf16=dtype == "bf16", seed=SEED,
                     dataloader_num_workers=0, dataset_num_proc=1, disable_tqdm=True)
    times, tokens, cur = [], [], {}

    def count(_module, _args, kwargs):  # real tokens of every forward, credited to the current step
        mask = kwargs.get("attention_mask")
        cur["tokens"] = cur.get("tokens", 0) + int(mask.sum() if mask is not None else kwargs["input_ids"].numel())

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - cur["t0"])
            tokens.append(cur.get("tokens", 0))

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"messages": convs}),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"times": times, "tokens": tokens}


def measure(name: str, length: int, mb: int, steps: int, dtype: str | None) -> dict:
    over = (f"model.dtype={dtype}",) if dtype else ()
    if name in ("plain", "plain-master"):
        return plain(length, mb, steps, overrides=over, master=name == "plain-master")
    if name.startswith("trl"):
        return trl(name == "trl-packed", length, mb, steps, dtype=dtype)
    return recipe(name, length, mb, steps, overrides=over)


def summarize(res: dict, warmup: int) -> dict:
    t, n = res["times"][warmup:], res["tokens"][warmup:]
    out = {"tokens_per_s": sum(n) / sum(t), "step_s": statistics.median(t), "steps": len(t)}
    if res.get("split"):
        split = res["split"][warmup:]
        out["split"] = {k: statistics.median(s.get(k, 0.0) for s in split) for k in split[0]}
    return out


def positive(text: str) -> int:
    """An argument that counts timed things: at least 1 (0 would time nothing and fail at the end)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--tokens", type=int, default=1024, help="row tokens per step: rows = tokens / length")
    ap.add_argument("--steps", type=positive, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=CONFIGS, default=CONFIGS)
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "throughput.json"))
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: what model.dtype=auto picks here")
    ap.add_argument("--repeats", type=positive, default=1, help="the whole list this many times, interleaved")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "LENGTH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        name, length = a.worker[0], int(a.worker[1])
        print("RESULT " + json.dumps(measure(name, length, max(1, a.tokens // length), a.steps + a.warmup, a.dtype)))
        return
    os.makedirs(WORK, exist_ok=True)
    each: dict[str, list] = {}  # NAME@LENGTH -> one summary per repeat
    for rep in range(a.repeats):
        for length in a.lengths:
            for name in a.only:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, __file__, "--worker", name, str(length), f"--tokens={a.tokens}",
                                      f"--steps={a.steps}", f"--warmup={a.warmup}",
                                      *([f"--dtype={a.dtype}"] if a.dtype else [])], cwd=ROOT, capture_output=True,
                                     text=True, env=child_env())
                if out.returncode != 0:
                    sys.exit(f"{name} at {length} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
                line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
                r = summarize(json.loads(line[7:]), a.warmup)
                each.setdefault(f"{name}@{length}", []).append(r)
                print(f"{name:14s} max_length {length:5d}: {r['tokens_per_s']:7.1f} real tokens/s, "
                      f"{r['step_s']:6.2f} s/step  ({time.perf_counter() - t0:.0f} s"
                      f"{f', repeat {rep + 1} of {a.repeats}' if a.repeats > 1 else ''})", flush=True)
    table = {k: v[0] if len(v) == 1 else {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in v),
                                          "step_s": statistics.median(r["step_s"] for r in v), "repeats": v}
             for k, v in each.items()}
    per_repeat = [ratios_of({k: v[i] for k, v in each.items()}, a.lengths) for i in range(a.repeats)]
    ratios = {k: statistics.median(r[k] for r in per_repeat) for k in per_repeat[0]}
    print(f"\nratios (real tokens/s; steps of {a.tokens} row tokens, {a.steps} timed after {a.warmup}"
          f"{f'; median of {a.repeats} interleaved repeats, each in brackets' if a.repeats > 1 else ''}):")
    for k, v in ratios.items():
        detail = f"  [{', '.join(f'{r[k]:.2f}' for r in per_repeat)}]" if a.repeats > 1 else ""
        print(f"  {k:30s} {v:.2f}x{detail}")
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results, "w", encoding="utf-8") as f:
        json.dump({"args": vars(a), "machine": machine(a.dtype), "table": table, "ratios": ratios,
                   **({"ratios_each_repeat": per_repeat} if a.repeats > 1 else {})}, f, indent=1)


def ratios_of(table: dict, lengths: list[int]) -> dict[str, float]:
    """Step-time and throughput ratios between the configurations of one pass over the list."""
    ratios = {}
    for length in lengths:
        g = lambda n: table.get(f"{n}@{length}")  # noqa: E731
        r = g("resure-packed")
        if r is None:
            continue
        trl_best = max((g(n) for n in ("trl-packed", "trl-padded") if g(n)), key=lambda x: x["tokens_per_s"],
                       default=None)
        if trl_best:
            ratios[f"resure/trl_best@{length}"] = r["tokens_per_s"] / trl_best["tokens_per_s"]
        for base in ("plain", "plain-master"):
            if g(base):
                ratios[f"resure_step/{base}_step@{length}"] = r["step_s"] / g(base)["step_s"]
                if g("resure-packed-z3"):
                    ratios[f"resure_z3_step/{base}_step@{length}"] = g("resure-packed-z3")["step_s"] / g(base)["step_s"]
        if g("sft-packed"):
            ratios[f"resure_step/sft_step@{length}"] = r["step_s"] / g("sft-packed")["step_s"]
    return ratios


def machine(dtype: str | None) -> dict:
    """What the numbers were measured on: the CPU's bf16 instructions and the dtype trained."""
    from resure_ds.runtime.engine import cpu_bf16_kind, native_bf16

    return {"cpu_bf16": cpu_bf16_kind(), "cores": os.cpu_count(),
            "dtype": dtype or ("bf16" if native_bf16() else "fp32")}


if __name__ == "__main__":
    main()
