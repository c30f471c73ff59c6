import torch
import torch.nn.functional as F

from resure_ds.data.records import read_dialogues
from resure_ds.data.render import Renderer
from resure_ds.eval.offline import evaluate_folder
from tests.data_fixtures import OPENAI, SHAREGPT, write_jsonl


def test_eval_matches_direct_token_loss(tmp_path, tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "val.jsonl", OPENAI + SHAREGPT)
    res = evaluate_folder(tiny_model_path, path, max_length=128, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    r = Renderer(tokenizer, 128)
    nll, n, per_turn = 0.0, 0, []
    for d in read_dialogues(path):
        e = r.render(d)
        ids = torch.from_numpy(e.input_ids).long()[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        lab = torch.from_numpy(e.labels[1:])
        tid = torch.from_numpy(e.turn_ids[1:]).long()
        tok = F.cross_entropy(logits, lab.clamp(min=0), reduction="none")
        nll += tok[lab >= 0].sum().item()
        n += int((lab >= 0).sum())
        per_turn += [tok[tid == t].mean().item() for t in range(int(tid.max()) + 1)]
    assert res["tokens"] == n and res["turns"] == len(per_turn) == 5 and res["dialogues"] == 3
    assert abs(res["loss"] - nll / n) < 1e-4
    assert abs(res["turn_loss"] - sum(per_turn) / len(per_turn)) < 1e-4
    assert set(res["per_depth"]) == {0, 1}


def test_eval_and_report_commands_name_bad_paths_without_a_traceback(tmp_path, tiny_model_path):
    import json
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)

    out = run("resure_ds.eval", tiny_model_path, str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "missing.jsonl" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run("resure_ds.eval", str(tmp_path / "no-model"), str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "no-model: no such folder" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "other.jsonl").write_text(json.dumps({"foo": 1}) + "\n")  # no dialogue in the layout read
    out = run("resure_ds.eval", tiny_model_path, str(tmp_path / "other.jsonl"))
    assert out.returncode == 2 and "no assistant reply was scored" in out.stderr and '"loss"' not in out.stdout
    out = run("resure_ds.eval", tiny_model_path, str(tmp_path / "other.jsonl"), "--columns", "[x")
    assert out.returncode == 2 and "--columns '[x': not a YAML mapping" in out.stderr and "Traceback" not in out.stderr
    import shutil

    cut = tmp_path / "cut-model"
    shutil.copytree(tiny_model_path, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut off
    out = run("resure_ds.eval", str(cut), str(tmp_path / "other.jsonl"))
    assert out.returncode == 2 and "cut-model: the model's weights cannot be read" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    from resure_ds.report.audit import AuditLog

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"data": {"train": "x.jsonl"}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    log = AuditLog(str(run_dir), 0)
    log.add([{"source": "s", "dialogue_id": "a", "turn": 0, "loss": 2.0, "z": 0.0, "weight": 1.0, "warm": True,
              "step": 1, "partial": False}])
    log.flush()
    (tmp_path / "a-file").write_text("x")  # an output path that cannot be written: under a file
    out = run("resure_ds.report", str(run_dir), "--export", str(tmp_path / "a-file" / "v.parquet"))
    assert out.returncode == 2 and "a-file/v.parquet" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_eval_takes_the_embedded_model_by_its_name(tmp_path, smollm2_path):
    """`python -m resure_ds.eval smollm2 DATA` evaluates the embedded model (it once asked the hub for a
    model named smollm2, retried for about 30 s and failed)."""
    import json
    import os
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "val.jsonl", OPENAI)
    out = subprocess.run([sys.executable, "-m", "resure_ds.eval", "smollm2", str(path), "--max-length=64"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout[out.stdout.index("{"):])
    want = evaluate_folder(smollm2_path, path, max_length=64)
    assert got["tokens"] == want["tokens"] > 0 and abs(got["loss"] - want["loss"]) < 1e-5


def test_eval_says_what_it_left_out(tmp_path, tiny_model_path):
    long = {"id": "long", "messages": [{"role": "user", "content": "Tell me everything."},
                                       {"role": "assistant", "content": "word " * 400}]}
    bad = ['{"messages": [{"role": "user", "c', '{"messages": [{"role": "user", "content": "hi"}]}']
    path = write_jsonl(tmp_path / "val.jsonl", OPENAI + [long], raw_lines=bad)
    res = evaluate_folder(tiny_model_path, path, max_length=128, batch_size=2, overflow="drop")
    # the loss is over OPENAI alone: a user reading it is told the other three records were not scored, and why
    assert res["dialogues"] == len(OPENAI)
    assert res["skipped"] == {"malformed_json": 1, "no_assistant_turn": 1}
    assert res["overflow"]["dropped"] == 1 and res["no_trained_token"] == 0
    full = evaluate_folder(tiny_model_path, path, max_length=128, batch_size=2, overflow="split")
    assert full["overflow"]["dropped"] == 0 and full["overflow"]["split"] == 1 and full["dialogues"] == len(OPENAI) + 1
