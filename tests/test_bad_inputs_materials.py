"""Materials: bad input fails with one purposeful line and leaves no trace.

Every case writes one bad CSV, checkpoint or flag next to small good data (rows of the bundled
experimental band gaps) and runs the command line in-process: exit 1, exactly one stderr line
``hfmi: error: ...`` that names the file (or the parameter) and the problem, no traceback, no
"unexpected" error, no warning logged, no fresh ``--out`` left behind, and a previously good
output folder (a real two-step fine-tuning run) byte for byte unchanged when the command is
pointed at it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from badinput import fails_with_one_line, left_nothing, snapshot

from hfmi_kit.cli import main
from hfmi_kit.domains.materials.chem import DATA_DIR

FAST = ["--steps", "2", "--batch-size", "8"]
HEADER = "formula,target"


@dataclass(frozen=True)
class Good:
    """The small good CSV (40 band gaps) and the previously good output folder."""

    csv: Path
    rows: list[str]  # its data lines
    out: Path  # a real `hfmi finetune materials --from scratch` run: out/model is its ensemble



@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    root = tmp_path_factory.mktemp("materials_good")
    lines = (DATA_DIR / "expt_gap.csv").read_text().splitlines()
    assert lines[0] == HEADER
    rows = lines[1:400:10]
    csv = root / "good.csv"
    csv.write_text("\n".join([HEADER, *rows]) + "\n")
    out = root / "GOOD"
    assert main(["finetune", "materials", "--from", "scratch", "--data", str(csv), "--out", str(out), *FAST]) == 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "cv_predictions.csv").is_file()
    return Good(csv=csv, rows=rows, out=out)


def finetune(data: Path | str, *extra: str, ckpt: Path | str = "scratch") -> list[str]:
    """`hfmi finetune materials` on ``data`` from ``ckpt`` (two steps)."""
    return ["finetune", "materials", "--from", str(ckpt), "--data", str(data), *FAST, *extra]


def evaluate(ckpt: Path | str, data: Path | str) -> list[str]:
    """`hfmi evaluate materials` of ``ckpt`` on ``data``."""
    return ["evaluate", "materials", "--ckpt", str(ckpt), "--data", str(data)]


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    """``content`` written to ``tmp/name``."""
    p = tmp / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return p


def table(*rows: str, header: str = HEADER) -> str:
    """CSV text: ``header`` and ``rows``."""
    return "\n".join([header, *rows]) + "\n"


def copy_model(good: Good, tmp: Path) -> Path:
    """A copy of the good fine-tuned ensemble to break."""
    ck = tmp / "ckpt"
    shutil.copytree(good.out / "model", ck)
    return ck


# --- the bad inputs: each returns (argv without --out, the name the message must carry) ---------


def empty_csv(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "empty.csv", b"")), "empty.csv"


def blank_lines_only(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "blank.csv", "\n\n\n")), "blank.csv"


def header_only(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "header.csv", table())), "header.csv"


def one_row(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "one.csv", table("GaAs,1.42"))), "one.csv"


def too_few_after_rejections(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "few.csv", table("GaAs,1.42", "Si,1.12", "CdTe,abc", "Xx2O,2", "ZnO,nan"))), "few.csv"


def missing_target_column(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "gap_column.csv", table(*good.rows, header="formula,gap"))), "gap_column.csv"


def target_flag_names_absent_column(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--target", "eg"), "good.csv"


def nan_targets(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "nan.csv", table("GaAs,nan", "Si,NaN", "CdTe,"))), "nan.csv"


def inf_targets(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "inf.csv", table("GaAs,inf", "Si,-inf", "CdTe,1e999"))), "inf.csv"


def non_numeric_targets(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "words.csv", table("GaAs,abc", "Si,1.1 eV", "CdTe,high"))), "words.csv"


def negative_band_gaps(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "negative.csv", table("GaAs,-1.42", "Si,-0.5"))), "negative.csv"


def unparseable_formulas(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "formulas.csv", table("Ga((As,1.4", "12345,1.1", "!!,2.0"))), "formulas.csv"


def wrong_units(good: Good, tmp: Path) -> tuple[list[str], str]:
    text = table("GaAs,1.42,furlongs", "Si,1.12,furlongs", header="formula,target,unit")
    return finetune(write(tmp, "furlongs.csv", text)), "furlongs.csv"


def binary_garbage(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "garbage.csv", bytes(range(256)) * 16)), "garbage.csv"


def json_named_csv(good: Good, tmp: Path) -> tuple[list[str], str]:
    text = json.dumps([{"formula": "GaAs", "target": 1.42}, {"formula": "Si", "target": 1.12}])
    return finetune(write(tmp, "records.csv", text)), "records.csv"


def semicolon_separated(good: Good, tmp: Path) -> tuple[list[str], str]:
    rows = [r.replace(",", ";") for r in good.rows]
    return finetune(write(tmp, "excel.csv", table(*rows, header="formula;target"))), "excel.csv"


def truncated_csv(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(write(tmp, "cut.csv", table(*good.rows[:10], '"CsPbI3,1.7'))), "cut.csv"


def labels_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--labels", "0"), "--labels"


def labels_more_than_rows(good: Good, tmp: Path) -> tuple[list[str], str]:
    # one row is rejected (unknown element): the good folder must not get a rejected_rows.csv either
    data = write(tmp, "mixed.csv", table(*good.rows, "Xx2O3,2.0"))
    return finetune(data, "--labels", "1000"), "--labels 1000"


def label_fraction_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--label-fraction", "0"), "--label-fraction"


def label_fraction_two(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--label-fraction", "2"), "--label-fraction"


def steps_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--steps", "0"), "--steps"


def batch_size_zero(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--batch-size", "0"), "--batch-size"


def negative_lr(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, "--lr", "-0.1"), "--lr"


def pretrain_negative_lr(good: Good, tmp: Path) -> tuple[list[str], str]:
    data = write(tmp, "alloys.csv", table("Ga0.3In0.7As,1.0", "Cd0.2Zn0.8Te,2.0", "Al0.4Ga0.6N,4.5"))
    return ["pretrain", "materials", "--data", str(data), *FAST, "--lr", "-1"], "--lr"


def from_missing_checkpoint(good: Good, tmp: Path) -> tuple[list[str], str]:
    return finetune(good.csv, ckpt=tmp / "no_such_ckpt"), "no_such_ckpt"


def from_checkpoint_of_another_domain(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = copy_model(good, tmp)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(domain="climate", task="pretrain", model_type="climate_pretrainer.tiny")
    (ck / "config.json").write_text(json.dumps(cfg))
    return finetune(good.csv, ckpt=ck), str(ck)


def evaluate_missing_checkpoint(good: Good, tmp: Path) -> tuple[list[str], str]:
    return evaluate(tmp / "gone", good.csv), "gone"


def evaluate_corrupt_config(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = copy_model(good, tmp)
    (ck / "config.json").write_text('{"domain": "materials", "task": ')
    return evaluate(ck, good.csv), "config.json"


def evaluate_truncated_weights(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = copy_model(good, tmp)
    w = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(w[: len(w) // 2])
    return evaluate(ck, good.csv), "model.safetensors"


def evaluate_not_fine_tuned(good: Good, tmp: Path) -> tuple[list[str], str]:
    ck = copy_model(good, tmp)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["task"] = "pretrain"
    (ck / "config.json").write_text(json.dumps(cfg))
    return evaluate(ck, good.csv), str(ck)


def evaluate_empty_csv(good: Good, tmp: Path) -> tuple[list[str], str]:
    return evaluate(good.out / "model", write(tmp, "empty.csv", b"")), "empty.csv"


def evaluate_only_training_rows(good: Good, tmp: Path) -> tuple[list[str], str]:
    data = write(tmp, "seen.csv", table(*good.rows, "Xx2O3,2.0"))  # plus a rejected row
    return evaluate(good.out / "model", data), "seen.csv"


NO_ROWS = "no usable rows"
# (builder, the problem the line must name (regex), point --out at the good folder)
CASES = [
    pytest.param(empty_csv, r"empty file \(0 bytes\); expected a CSV with a header line 'formula,target'", True,
                 id="empty-csv"),
    pytest.param(blank_lines_only, "no header line", False, id="blank-lines-only"),
    pytest.param(header_only, r"no rows \(only the header line\)", False, id="header-only"),
    pytest.param(one_row, r"too few rows for 5-fold cross-validation: 1 usable row\(s\), at least 5 needed", True,
                 id="one-row"),
    pytest.param(too_few_after_rejections, r"too few rows .*2 usable row\(s\) \(3 more rejected\)", False,
                 id="too-few-after-rejections"),
    pytest.param(missing_target_column, r"missing column\(s\) \['target'\]; found \['formula', 'gap'\]", True,
                 id="missing-target-column"),
    pytest.param(target_flag_names_absent_column, r"missing column\(s\) \['eg'\]", False, id="target-flag-absent"),
    pytest.param(nan_targets, NO_ROWS + r".*is not a finite number", True, id="nan-targets"),
    pytest.param(inf_targets, NO_ROWS + r".*is not a finite number", False, id="inf-targets"),
    pytest.param(non_numeric_targets, NO_ROWS + r".*'abc' is not a number", False, id="non-numeric-targets"),
    pytest.param(negative_band_gaps, NO_ROWS + r".*target=-1.42 is below 0", False, id="negative-band-gaps"),
    pytest.param(unparseable_formulas, NO_ROWS + r".*formula", False, id="unparseable-formulas"),
    pytest.param(wrong_units, NO_ROWS + r".*unknown unit 'furlongs'", False, id="wrong-units"),
    pytest.param(binary_garbage, "a binary file, not a text CSV", True, id="binary-garbage"),
    pytest.param(json_named_csv, "looks like JSON, not a CSV", False, id="json-named-csv"),
    pytest.param(semicolon_separated, "separated by semicolons", False, id="semicolon-separated"),
    pytest.param(truncated_csv, "not a readable CSV, it is malformed or truncated", True, id="truncated-csv"),
    pytest.param(labels_zero, "must be an integer >= 2, got 0", False, id="labels-0"),
    pytest.param(labels_more_than_rows, "more than the 32 training rows of the smallest fold", True,
                 id="labels-more-than-rows"),
    pytest.param(label_fraction_zero, r"must lie in \(0, 1\], got 0", False, id="label-fraction-0"),
    pytest.param(label_fraction_two, r"must lie in \(0, 1\], got 2", True, id="label-fraction-2"),
    pytest.param(steps_zero, "must be an integer >= 1, got 0", False, id="steps-0"),
    pytest.param(batch_size_zero, "must be an integer >= 1, got 0", True, id="batch-size-0"),
    pytest.param(negative_lr, "must be a finite number > 0", False, id="negative-lr"),
    pytest.param(pretrain_negative_lr, "must be a finite number > 0", True, id="pretrain-negative-lr"),
    pytest.param(from_missing_checkpoint, "checkpoint directory not found", False, id="from-missing-checkpoint"),
    pytest.param(from_checkpoint_of_another_domain,  # whichever check sees it first
                 r"a 'climate' checkpoint, not a materials one|unknown key\(s\) \['members'\]", True,
                 id="from-checkpoint-of-another-domain"),
    pytest.param(evaluate_missing_checkpoint, "checkpoint directory not found", False,
                 id="evaluate-missing-checkpoint"),
    pytest.param(evaluate_corrupt_config, "corrupt JSON", True, id="evaluate-corrupt-config"),
    pytest.param(evaluate_truncated_weights, "corrupt or truncated", False, id="evaluate-truncated-weights"),
    pytest.param(evaluate_not_fine_tuned, "not a fine-tuned materials model", False, id="evaluate-not-fine-tuned"),
    pytest.param(evaluate_empty_csv, r"empty file \(0 bytes\)", True, id="evaluate-empty-csv"),
    pytest.param(evaluate_only_training_rows, "every composition was used to train", True,
                 id="evaluate-only-training-rows"),
]


@pytest.mark.parametrize(("build", "problem", "into_good"), CASES)
def test_bad_input_fails_cleanly(build: Callable[[Good, Path], tuple[list[str], str]], problem: str,
                                 into_good: bool, good: Good, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 caplog: pytest.LogCaptureFixture) -> None:
    argv, named = build(good, tmp_path)
    out = good.out if into_good else tmp_path / "fresh_out"
    before = snapshot(good.out)
    line = fails_with_one_line([*argv, "--out", str(out)], capsys, caplog)
    assert named in line, line
    assert re.search(problem, line), line
    if into_good:
        assert snapshot(good.out) == before
    else:
        left_nothing(out)
