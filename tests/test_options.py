"""Typed task options: a domain's task signatures are its options; the CLI and notebooks are
checked against them."""

import pytest

from hfmi_kit.cli import main
from hfmi_kit.config import check_options, task_options
from hfmi_kit.domains import get_domain
from hfmi_kit.errors import ConfigError


def test_options_come_from_the_task_signature_with_types_and_defaults():
    opts = get_domain("carbon").options("finetune")
    assert opts["labels"].default is None and opts["head"].flag == "--head"
    assert opts["ckpt"].required and opts["ckpt"].flag == "--from"
    assert opts["label_fraction"].type is float and opts["label_fraction"].default == 1.0
    assert "labels" not in get_domain("climate").options("finetune")
    assert get_domain("radiology").options("whatif") == {}


def test_check_options_names_the_flag_and_the_type():
    opts = get_domain("materials").options("finetune")
    assert check_options(opts, {"labels": 40, "folds": 3}, what="materials finetune") == {"labels": 40, "folds": 3}
    with pytest.raises(ConfigError, match="--folds: expected"):
        check_options(opts, {"folds": "3"}, what="materials finetune")
    with pytest.raises(ConfigError, match=r"--head is not an option of materials finetune \(its options: .*--labels"):
        check_options(opts, {"head": "forest"}, what="materials finetune")


def test_the_cli_refuses_a_flag_the_domain_does_not_take_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "climate", "--from", "scratch", "--out", str(out), "--head", "forest"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hfmi: error: --head is not an option of climate finetune") and err.count("\n") == 1
    assert not out.exists()
    assert main(["pretrain", "carbon", "--out", str(out), "--target", "x"]) == 1
    assert "--target is not an option of carbon pretrain" in capsys.readouterr().err and not out.exists()


def test_hfmi_options_lists_them(capsys):
    assert main(["options", "materials", "finetune"]) == 0
    text = capsys.readouterr().out
    assert "--labels (int | None, default None)" in text and "--folds (int, default 5)" in text
    assert main(["options", "radiology", "whatif"]) == 1


def test_a_task_commands_help_after_a_domain_lists_that_domains_own_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "materials", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    own = text[text.index("materials finetune flags"):]
    assert "--folds (int, default 5)" in own and "--members (int, default 3)" in own
    assert "--labels (" not in own and "--from (" not in own  # shared flags are listed once, above
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "flags (besides those above)" not in capsys.readouterr().out


def test_task_options_of_a_plain_function():
    def f(*, a: int, b: str = "x", c: float | None = None) -> None: ...

    o = task_options(f)
    assert [x.name for x in o.values()] == ["a", "b", "c"] and o["a"].required and o["b"].default == "x"


def test_every_typed_option_is_a_flag_of_its_domain(tmp_path, capsys, monkeypatch):
    """A task option without a shared flag (materials --folds, --members) is passed through,
    parsed and type-checked; a wrong one is one line naming the flag."""
    from hfmi_kit.domains import get_domain

    seen = {}
    dom = get_domain("materials")
    monkeypatch.setattr(type(dom), "finetune", lambda self, **kw: seen.update(kw) or {"mae_ev": 1.0})
    out = tmp_path / "ft"
    assert main(["finetune", "materials", "--from", "scratch", "--out", str(out), "--folds", "3",
                 "--members=2", "--final", "false", "--labels", "40"]) == 0
    assert seen["folds"] == 3 and seen["members"] == 2 and seen["final"] is False and seen["labels"] == 40
    capsys.readouterr()
    assert main(["finetune", "materials", "--from", "scratch", "--out", str(out), "--folds", "three"]) == 1
    assert capsys.readouterr().err.strip() == "hfmi: error: --folds: expected an integer, got 'three'"
    assert main(["finetune", "materials", "--from", "scratch", "--out", str(out), "--folds"]) == 1
    assert "--folds needs a value" in capsys.readouterr().err
    assert main(["info", str(out), "--folds", "3"]) == 1
    assert "unrecognized arguments: --folds 3" in capsys.readouterr().err
    assert main(["finetune", "nope", "--from", "scratch", "--out", str(out), "--folds", "3"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_an_option_carries_its_help_and_range_and_every_caller_is_held_to_it(tmp_path, capsys):
    """The range is in the option's annotation; a notebook calling the task function directly is
    stopped by it as the CLI is, before the data is even looked at (the path does not exist)."""
    import numpy as np

    from hfmi_kit.domains.climate.tasks import finetune, whatif
    from hfmi_kit.domains.materials.tasks import finetune as mft

    opts = get_domain("materials").options("finetune")
    assert opts["members"].help == "ensemble members (seeds)" and opts["members"].opt.low == 1
    assert opts["members"].describe() == "--members (int, default 3): ensemble members (seeds); must be an integer >= 1"
    missing = tmp_path / "nowhere.nc"
    with pytest.raises(ConfigError, match=r"^--steps must be an integer >= 1, got 0$"):
        finetune(ckpt=None, data=missing, out=tmp_path / "o", steps=0)
    with pytest.raises(ConfigError, match=r"^--mode must be one of full, frozen, linear_probe, got 'half'$"):
        finetune(ckpt=None, data=missing, out=tmp_path / "o", mode="half")
    with pytest.raises(ConfigError, match=r"^--label-fraction must lie in \(0, 1\], got 1.5$"):
        finetune(ckpt=None, data=missing, out=tmp_path / "o", label_fraction=1.5)
    with pytest.raises(ConfigError, match=r"^--co2-factor must be a finite number > 0, got nan$"):
        whatif(ckpt=tmp_path, data=missing, out=tmp_path / "o", co2_factor=float("nan"))
    with pytest.raises(ConfigError, match=r"^--members must be an integer >= 1, got 0$"):
        mft(ckpt=None, data=missing, out=tmp_path / "o", members=np.int64(0))  # numpy integers are integers
    assert not (tmp_path / "o").exists()
    assert main(["options", "climate", "whatif"]) == 0
    assert "--members (int, default 8): ensemble members (perturbed initial states); must be an integer >= 1" \
        in capsys.readouterr().out


def test_a_domains_dashboard_section_is_found_beside_its_module_or_is_empty(tmp_path, monkeypatch):
    """``Domain.dashboard_section`` calls ``section`` of the ``dashboard`` module beside the
    domain's module; a domain without one shows nothing, and an import error inside one is raised."""
    import sys

    from hfmi_kit.domains.base import Domain
    from hfmi_kit.domains.climate import dashboard as climate_dashboard

    calls: list[object] = []
    monkeypatch.setattr(climate_dashboard, "section", lambda run: calls.append(run) or ["climate section"])
    assert get_domain("climate").dashboard_section("RUN") == ["climate section"] and calls == ["RUN"]

    pkg = tmp_path / "plainsci"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from hfmi_kit.domains.base import Domain\n"
        "class Plain(Domain):\n    name = 'plain'\n    tasks = ('t',)\n    data_formats = ''\n"
        "    tasks_module = 'plainsci'\n"
        "    def example_data(self, out_dir, **kw):\n        return out_dir\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import plainsci

    assert isinstance(plainsci.Plain(), Domain) and plainsci.Plain().dashboard_section("RUN") == []
    (pkg / "dashboard.py").write_text("import no_such_module_here\n")
    sys.modules.pop("plainsci.dashboard", None)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        plainsci.Plain().dashboard_section("RUN")
