"""The reviewer's pages, built from plain values: the verdict banner with the exact next command,
one row per flagged example and per suspect with pictures, gate failures with their evidence, and
every piece of data text escaped (ids, labels, model names, reasons)."""

import re

import pandas as pd
import pytest
import torch
from torch import nn

from audit.audit_report import audit_verdict, render_audit_report, suspects_table
from audit.correction import CorrectionConfig, RepairCandidate, RepairResult, SearchResult
from audit.correction.evidence import edits_touching, prediction_changes
from audit.correction.report import CorrectionFindings, correction_verdict, render_correction_report
from audit.correction.search import CANDIDATES_BY_NAME, CandidateOutcome
from audit.examples import ExampleTable
from audit.findings import build_findings
from audit.gates import GateReport
from audit.gates.report import GateResult
from audit.report_page import format_cell
from audit.verdict import StoreArgs, cli_command

SCRIPT = "<script>alert(1)</script>"
MARKUP_ID = '<img src=x onerror="alert(2)">'


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _sections(html: str) -> dict[str, str]:
    """HTML of each <section id=...>, by id."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', html, flags=re.S))


def _body_rows(section: str) -> list[str]:
    """The <tr> rows of a section's table body (the header is in <thead>)."""
    body = re.search(r"<tbody>(.*?)</tbody>", section, flags=re.S)
    return re.findall(r"<tr>(.*?)</tr>", body.group(1), flags=re.S) if body else []


def _no_raw_markup(html: str) -> None:
    assert "<script" not in html and "onerror=" not in html.replace("onerror=&#34;", "").replace(
        "onerror=&quot;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.fixture
def audit_findings():
    train = ExampleTable(tuple(f"t{i}" for i in range(11)) + (MARKUP_ID,), torch.rand(12, 1, 8, 8) * 16,
                         torch.arange(12) % 10)
    flagged = ExampleTable((SCRIPT, "q1"), torch.rand(2, 1, 8, 8) * 16, torch.tensor([3, 4]))
    predicted = torch.tensor([1, 1])
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    scores[:, 1] = -50.0  # t1, labelled 1 = the wrong prediction, is the most harmful for both
    scores[:, 11] = -40.0  # so is the example with markup in its id (label 1 as well)
    return build_findings(_model(), f"m{SCRIPT}", "1", "graddot", train, flagged, predicted, scores,
                          scores.abs().sum(0), top_k=3)


def test_the_audit_report_shows_a_verdict_with_the_next_command_and_a_row_per_flagged_and_suspect(
        audit_findings, tmp_path):
    store = StoreArgs(tmp_path / "work dir", allow_pickle=True)
    verdict = audit_verdict(audit_findings, "run123", store)
    assert verdict.passed and verdict.next_command == cli_command("correct", "run123", store=store)
    # quoted (the path has a space), and with the pickle opt-in the user gave
    assert verdict.next_command == f"model-audit correct run123 --workdir '{tmp_path}/work dir' --allow-pickle"
    report, grid = render_audit_report(tmp_path, audit_findings, verdict)
    html = report.read_text()
    assert grid.is_file() and 'class="verdict passed"' in html
    assert f'<code class="next-command">{verdict.next_command.replace(chr(39), "&#39;")}</code>' in html
    sections = _sections(html)
    suspects = suspects_table(audit_findings.candidates)
    assert {"t1", MARKUP_ID} <= set(suspects["train_id"])
    rows = _body_rows(sections["suspects"])
    assert len(rows) == len(suspects) and all('<img class="thumb"' in r for r in rows)
    flagged_rows = _body_rows(sections["flagged"])
    assert len(flagged_rows) == 2 and all("t1: 1" in r for r in flagged_rows)  # captions: "id: label"
    assert "[" not in re.sub(r"<[^>]+>", "", sections["suspects"])  # no Python list reprs in cells
    _no_raw_markup(html)


def test_an_audit_without_suspects_says_so(audit_findings, tmp_path):
    empty = audit_findings.candidates.iloc[0:0]
    findings = type(audit_findings)(**{**vars(audit_findings), "candidates": empty})
    verdict = audit_verdict(findings, "run123", StoreArgs(tmp_path))
    assert not verdict.passed and "No training example stands out" in verdict.headline
    html = render_audit_report(tmp_path, findings, verdict)[0].read_text()
    assert 'class="verdict failed"' in html and "No suspects" in _sections(html)["suspects"]


def _gate(name, passed, reason="fine"):
    return GateResult(name, name, 0.9, 0.8, 0.5, passed, reason)


def _correction(tmp_path, gates_pass: bool, tried: tuple[str, ...]):
    train = ExampleTable(("t0", MARKUP_ID, "t2"), torch.rand(3, 1, 8, 8), torch.tensor([7, 7, 1]))
    gate_split = ExampleTable((SCRIPT, "v1"), torch.rand(2, 1, 8, 8), torch.tensor([7, 2]))
    repair = RepairResult(_model(), 10, 1, ("t0", MARKUP_ID), {MARKUP_ID: 3}, ({"round": 1, "fixed_fraction": 1.0},))
    selection = GateReport((_gate("fix_rate", True),))
    outcomes = tuple(CandidateOutcome(RepairCandidate(n, CorrectionConfig()), repair, selection) for n in tried)
    gates = GateReport((_gate("fix_rate", True), _gate("class_recall", gates_pass, "class 7 recall fell 2.8 points")))
    audit_candidates = pd.DataFrame({
        "train_id": [MARKUP_ID, "t2"], "action": ["review", "relabel"], "current_label": [7, 1],
        "proposed_label": pd.array([None, 4], dtype="Int64"), "evidence_queries": [["q0"], ["q0", "q1"]],
        "evidence_scores": [[-2.0], [-1.0, -3.0]], "evidence_ranks": [[1], [2, 1]], "reason": ["r1", "r2"]})
    changes = pd.DataFrame({"example_id": [SCRIPT], "label": [7], "before": [7], "after": [3], "change": ["lost"]})
    return CorrectionFindings(f"m{SCRIPT}", "1", "audit-run", 2, SearchResult(outcomes, len(outcomes) - 1), gates,
                              pd.DataFrame({"steps": [1, 2], "pearson": [0.9, 0.8], "spearman": [0.9, 0.7]}), 2,
                              0.5, (1, 2), train, gate_split, audit_candidates, "ekfac", changes)


def test_a_failed_correction_ties_the_gate_to_the_example_that_broke_and_the_edits_of_its_class(tmp_path):
    findings = _correction(tmp_path, gates_pass=False, tried=("relabel",))
    verdict = correction_verdict(findings, StoreArgs(tmp_path))
    untried = [n for n in CANDIDATES_BY_NAME if n != "relabel"]
    assert not verdict.passed and "class 7 recall fell 2.8 points" in verdict.headline
    assert verdict.next_command == cli_command("correct", "audit-run", "--candidates", ",".join(untried),
                                               store=StoreArgs(tmp_path))
    report, plot = render_correction_report(tmp_path, findings, verdict)
    html = report.read_text()
    assert plot.is_file() and 'class="verdict failed"' in html
    sections = _sections(html)
    gate_rows = re.findall(r"<tr><td>(\w+)</td>", sections["gates"])
    assert gate_rows == ["fix_rate", "class_recall"]
    evidence = sections["gate-evidence"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in evidence and "lost" in evidence
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;: 7 \u2192 3" in evidence  # the edit that touched class 7
    edits = sections["edits"]
    assert "review" in edits and "1 of 1 differ from the audit" in edits  # relabelled what the audit marked review
    assert "relabelled to 3" in sections["suspects"] and "not used" in sections["suspects"]
    assert "re-scored with influence method graddot; the audit used ekfac" in html
    _no_raw_markup(html)


def test_a_passed_correction_says_promote_and_a_search_that_tried_everything_says_audit_again(tmp_path):
    server = StoreArgs(tmp_path, "http://127.0.0.1:5005", allow_pickle=True)
    passed = correction_verdict(_correction(tmp_path, True, ("relabel",)), server)
    assert passed.passed and passed.next_command == (  # promote loads no model: no pickle opt-in
        f"model-audit promote --model 'm{SCRIPT}' --workdir {tmp_path} --tracking-uri http://127.0.0.1:5005")
    exhausted = correction_verdict(_correction(tmp_path, False, tuple(CANDIDATES_BY_NAME)), StoreArgs(tmp_path))
    assert not exhausted.passed and exhausted.next_command.startswith("model-audit audit --model")


def test_prediction_changes_and_edits_touching_a_class():
    examples = ExampleTable(("a", "b", "c"), torch.eye(3), torch.tensor([0, 1, 2]))
    identity = nn.Linear(3, 3, bias=False)
    swap = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))
        swap.weight.copy_(torch.eye(3)[[1, 0, 2]])  # a -> 1, b -> 0, c -> 2
    changes = prediction_changes(identity, swap, examples)
    assert changes.to_dict("records") == [
        {"example_id": "a", "label": 0, "before": 0, "after": 1, "change": "lost"},
        {"example_id": "b", "label": 1, "before": 1, "after": 0, "change": "lost"}]
    assert prediction_changes(swap, identity, examples)["change"].tolist() == ["gained", "gained"]
    assert prediction_changes(identity, identity, examples).empty
    assert edits_touching({"x": 3, "y": 5}, {"x": 7, "y": 2}, 7) == ["x: 7 \u2192 3"]


def test_cells_are_formatted_never_python_reprs():
    assert format_cell(["q0", "q1"]) == "q0, q1" and format_cell([]) == "\u2013"
    assert format_cell(0.123456789) == "0.1235" and format_cell(float("nan")) == "\u2013"
    assert format_cell(None) == "\u2013" and format_cell(pd.NA) == "\u2013"
    assert "yes" in format_cell(True) and "no" in format_cell(False)


def test_a_text_audit_shows_escaped_sentences_and_no_picture_grid(tmp_path):
    """Text examples: each cell shows the sentence (escaped, cut to SNIPPET_CHARS with an ellipsis)
    captioned like a picture would be; no thumbnails, no influence grid."""
    from audit.report_page import SNIPPET_CHARS

    sentences = [f"plain sentence {i}" for i in range(11)] + [f"a {SCRIPT} in a review"]
    long = "word " * 100
    train = ExampleTable(tuple(f"t{i}" for i in range(12)), torch.randint(1, 40, (12, 6)), torch.arange(12) % 10,
                         tuple(sentences))
    flagged = ExampleTable(("q0", "q1"), torch.randint(1, 40, (2, 6)), torch.tensor([3, 4]),
                           (long, '<img src=x onerror="alert(3)">'))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 4), nn.Flatten(), nn.Linear(24, 10))
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    scores[:, 11] = -50.0  # the sentence with markup is the most harmful for both
    findings = build_findings(model, "m", "1", "graddot", train, flagged, torch.tensor([1, 1]), scores,
                              scores.abs().sum(0), top_k=3)
    files = render_audit_report(tmp_path, findings, audit_verdict(findings, "run1", StoreArgs(tmp_path)))
    assert len(files) == 1 and not (tmp_path / "influence_grid.png").exists()
    html = files[0].read_text()
    assert '<img class="thumb"' not in html
    sections = _sections(html)
    rows = _body_rows(sections["flagged"])
    assert len(rows) == 2 and all('<figure class="snippet">' in r for r in rows)
    assert "&lt;img src=x onerror=&#34;alert(3)&#34;&gt;" in rows[1]
    assert all("a &lt;script&gt;alert(1)&lt;/script&gt; in a review" in r and "t11: 1" in r for r in rows)
    shown = re.search(r"<blockquote>(.*?)</blockquote>", rows[0]).group(1)
    assert len(shown) == SNIPPET_CHARS and shown.endswith("\u2026") and long.startswith(shown[:-1])
    _no_raw_markup(html)


def test_colour_pictures_keep_their_colours_and_grayscale_stays_dark_on_high():
    import base64
    import io

    from PIL import Image

    from audit.report_page import image_pixels, thumbnail

    rgb = torch.zeros(3, 2, 2)
    rgb[0, 0, 0] = 5.0  # one red pixel on black, any scale
    picture = Image.open(io.BytesIO(base64.b64decode(thumbnail(rgb, "c").png)))
    assert picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 0, 0) and picture.getpixel((1, 1)) == (0, 0, 0)
    gray = image_pixels(torch.tensor([[[0.0, 16.0]]]))
    assert gray.shape == (1, 2) and gray.tolist() == [[255, 0]]
    assert image_pixels(torch.arange(6)) is None  # token ids are no picture
