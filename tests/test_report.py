"""The data-quality report of a real run (1 rank, two sources, one holding markup), opened in
headless Chromium; the export and the filter of the same run."""
import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.e2e_common import launch

pytestmark = pytest.mark.slow
# If either ran, the page would hold "PWNED" (title) or "HACKED" (body); as text it holds neither.
PLOTS = 7  # the six training plots and the sources' shares
INJECT = """<script>document.title="PWN"+"ED"</script><img src=x onerror="document.body.append('HACK'+'ED')">"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path):
    from resure_ds.data.chitchat import chitchat_records

    d = tmp_path_factory.mktemp("report")
    recs = [r for _, r in chitchat_records(None, 0, 60) if len(r["messages"]) >= 2][:24]
    with open(d / "clean.jsonl", "w") as f:
        for r in recs[:16]:
            f.write(json.dumps(r) + "\n")
    with open(d / "web.jsonl", "w") as f:
        for i, r in enumerate(recs[16:]):
            if i == 0:  # markup in the id, the user message and the reply
                r = {"id": f"x{INJECT}", "messages": [{"role": "user", "content": f"hi {INJECT}"},
                                                      {"role": "assistant", "content": f"reply {INJECT}"}]}
            f.write(json.dumps(r) + "\n")
    # a name with $...$: matplotlib would parse it as math in the per-source plots, and fail
    train = f'[{{path: {d}/clean.jsonl, name: clean}}, {{path: {d}/web.jsonl, name: "web <b>x</b> $x$"}}]'
    launch("train.sh", ["recipes/default.yaml", f"model.path={tiny_model_path}", f"data.train={train}",
                        "train.max_steps=4", "data.max_length=128", "data.overflow=cut", "train.micro_batch_size=6", "resure.min_count=2",
                        "checkpoint.every=0", "checkpoint.export=false", "output.report_to=none",
                        "output.report_top=200", f"output.dir={d}", "output.name=run"], extra_env={"NUM_PROCS": "1"})
    return str(d / "run")


def browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("RESURE_REQUIRE_BROWSER"):
            pytest.fail("no Chromium: apt-get install chromium (.ci/run does)")
        pytest.skip("no Chromium here (apt-get install chromium); CI installs it")
    return found


def test_report_is_written_by_the_run_and_escapes_corpus_text(run):
    with open(os.path.join(run, "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert "<script" not in page.lower()
    assert all(i.startswith('<img alt="') and 'src="data:image/png;base64,' in i for i in re.findall(r"<img [^>]*>", page))
    assert html_escaped(INJECT) in page                     # the record's text, shown as text
    assert "web &lt;b&gt;x&lt;/b&gt; $x$" in page           # the source name too
    for section in ("Reliability per source", "Reliability per turn depth", "most down-weighted turns",
                    "Configuration", "Summary"):
        assert section in page
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == PLOTS
    with open(os.path.join(run, "summary.txt"), encoding="utf-8") as f:
        assert "report: " in f.read()


def html_escaped(s):
    import html

    return html.escape(s, quote=True)


def test_report_in_headless_chromium(run, tmp_path):
    """Loads with no console message at all (a blocked script or image would log one), every image
    is an inline plot, the injected markup is text in the DOM and never ran; a screenshot is kept."""
    exe = browser()
    url = "file://" + os.path.join(run, "report.html")
    common = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    assert "PWNED" not in dom.stdout and "HACKED" not in dom.stdout and "<script" not in dom.stdout.lower()
    assert "<title>ReSURE data-quality report: run</title>" in dom.stdout
    imgs = re.findall(r"<img [^>]*>", dom.stdout)
    assert len(imgs) == PLOTS and all('src="data:image/png;base64,' in i for i in imgs), imgs
    assert html_escaped(INJECT).replace("&quot;", '"').replace("&#x27;", "'") in dom.stdout  # quotes: re-serialised
    rows = re.findall(r"<tr>", dom.stdout)
    assert len(rows) >= 1 + 2 + 1 + 2 + 1 + 10  # headers and rows: 2 sources, 2+ depths, the turns
    shot = tmp_path / "report.png"
    out = subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.stat().st_size > 50_000, out.stderr[-2000:]


def test_export_and_filter_from_the_command_line(run, tmp_path):
    exp = tmp_path / "verdict.parquet"
    from tests.test_cli import cli

    out = cli("report", run, "--export", str(exp))  # the installed command
    assert out.returncode == 0, out.stderr[-2000:]
    v = pq.read_table(exp)
    assert set(v.column("source").to_pylist()) == {"clean", "web <b>x</b> $x$"}
    assert v.num_rows == len({(r["source"], r["dialogue_id"], r["turn"]) for r in v.to_pylist()})
    shares = pq.read_table(tmp_path / "verdict.sources.parquet").to_pylist()  # each step's share per source
    assert {r["source"] for r in shares} == {"clean", "web <b>x</b> $x$"} and len(shares) == 2 * 4
    assert all(r["share"] == pytest.approx(0.5) for r in shares)  # data.mixture=fixed: the configured shares
    low = sorted(v.column("weight").to_pylist())[len(v) // 3]  # a threshold that removes about a third
    flt = tmp_path / "filtered"
    out = subprocess.run([sys.executable, "-m", "resure_ds.report", run, "--filter", str(flt),
                          "--min-weight", str(low)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(flt / "filter_counts.json") as f:
        c = json.load(f)
    below = {(r["source"], r["dialogue_id"]) for r in v.to_pylist() if r["weight"] < low}
    assert c["dropped"] == len(below) > 0 and c["records"] == 24
    kept = []
    for p in c["outputs"]:
        with open(p) as f:
            kept += [json.loads(ln)["id"] for ln in f]
    assert len(kept) == 24 - len(below) and not {d for _, d in below} & set(kept)


def test_the_metrics_are_read_in_bounded_memory(tmp_path, monkeypatch):
    """A long run's metrics.jsonl: the plots get at most 2 x PLOT_ROWS evenly spaced rows with the
    first and the last, only the keys they draw; every validation and the last five rows are kept
    whole; the summary's sums cover every row. (benchmarks/report_metrics.py measures the memory.)"""
    from resure_ds.report import run_files

    monkeypatch.setattr(run_files, "PLOT_ROWS", 50)
    with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for s in range(1, 1001):
            row = {"step": s, "loss": 1.0, "weighted_loss": 1.0, "lr": 0.1, "bucket_mean": [1.0], "bucket_std": [0.1],
                   "bucket_n": [s], "mean_weight": 1.0, "frac_w_lt_1": 0.0, "frac_w_lt_0.5": 0.0, "step_time_s": 0.5,
                   "grad_norm": 1.0, "source_share/a": 0.5, "source/a/turns": s, "nonfinite_total": 0}
            if s % 7 == 0:
                row.update(val_loss=2.0, val_turn_loss=2.1)
            f.write(json.dumps(row) + "\n\n")  # blank lines are skipped
    m = run_files.read_report_metrics(str(tmp_path))
    steps = [r["step"] for r in m.rows]
    assert m.count == 1000 and m.step == 1000 and m.train_time_s == 500.0
    assert len(steps) <= 100 and steps[0] == 1 and steps[-1] == 1000
    assert len({b - a for a, b in zip(steps[:-2], steps[1:-1])}) == 1  # evenly spaced but for the last
    assert set(m.rows[0]) == set(run_files.PLOT_KEYS) | {"source_share/a"}
    assert [v["step"] for v in m.val] == list(range(7, 1001, 7)) and set(m.val[0]) == {"step", "val_loss", "val_turn_loss"}
    assert [r["step"] for r in m.last] == [996, 997, 998, 999, 1000] and "grad_norm" in m.last[-1]
