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
