"""eval/plot_metrics.py: a run's training curves (losses, gradient norms, FIDs while training) as one PNG."""
import json

import pytest

from conftest import eval_script

PNG = b"\x89PNG\r\n\x1a\n"


def _run(folder, steps=4, fid=True):
    folder.mkdir()
    rows = [{"step": s, "loss_dm": 1.0 / s, "loss_fake": -0.1 * s, "grad_norm_generator": 2.0 * s,
             "grad_norm_critic": 3.0, "images_per_second": 10.0} for s in range(1, steps + 1)]
    if fid:
        rows += [{"step": 2, "eval": "FID@8(x, nv-bilinear)", "fid": 50.0, "kid": 0.1},
                 {"step": 4, "eval": "FID@8(x, nv-bilinear)", "fid": 40.0, "kid": 0.05}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    return folder


def test_panels_are_each_loss_the_norms_and_the_fid(tmp_path):
    pm = eval_script("plot_metrics")
    runs = {"a": pm.read_metrics(_run(tmp_path / "a")), "b": pm.read_metrics(_run(tmp_path / "b", fid=False))}
    assert len(runs["a"]) == 6  # the half-written last line (a killed run's) is skipped
    assert pm.panels(runs) == [("loss_dm", ["loss_dm"]), ("loss_fake", ["loss_fake"]),
                               ("gradient norms (before clipping)", ["grad_norm_critic", "grad_norm_generator"]),
                               ("FID while training", ["fid"])]


def test_writes_one_png_for_several_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pm = eval_script("plot_metrics")
    out = tmp_path / "curves.png"
    pm.main([str(_run(tmp_path / "a")), str(_run(tmp_path / "b", fid=False) / "metrics.jsonl"), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "curves.png"]  # no temporary file left


@pytest.mark.parametrize("case, message", [
    ("missing", "no metrics.jsonl there"), ("empty", "no logged steps yet"), ("not-png", "give a .png file name"),
    ("labels", "--labels: 2 distinct labels needed"), ("label", "--label: 2 distinct labels needed")])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, capsys, case, message):
    pm = eval_script("plot_metrics")
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    runs, out, extra = [str(a), str(b)], tmp_path / "c.png", []
    if case == "missing":
        runs.append(str(tmp_path / "nope"))
        extra = ["--labels", "a,b,nope"]
    elif case == "empty":
        (b / "metrics.jsonl").write_text("")
    elif case == "not-png":
        out = tmp_path / "c.jpg"
    elif case == "labels":
        extra = ["--labels", "a,a"]
    else:
        extra = ["--label", "a, b"]  # one label for two runs
    with pytest.raises(SystemExit) as stop:
        pm.main([*runs, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_repeated_label_flags_may_hold_commas(tmp_path, monkeypatch):
    """--label, repeated, names each run (commas and all); --labels splits at commas; the two do not mix."""
    import sys
    import types

    pm = eval_script("plot_metrics")
    plotted = []
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))  # CI's dev extra has none
    monkeypatch.setattr(pm, "plot", lambda runs, out: plotted.append(list(runs)))
    a, b, out = str(_run(tmp_path / "a")), str(_run(tmp_path / "b")), str(tmp_path / "c.png")
    pm.main([a, b, "--out", out, "--label", "dmd2, lr 1e-5", "--label", "dmd2, lr 2e-5"])
    pm.main([a, b, "--out", out, "--labels", "dmd2,sid"])
    assert plotted == [["dmd2, lr 1e-5", "dmd2, lr 2e-5"], ["dmd2", "sid"]]
    with pytest.raises(SystemExit) as stop:
        pm.main([a, b, "--out", out, "--label", "x", "--labels", "y,z"])
    assert stop.value.code == 2


def test_without_matplotlib_the_inputs_are_checked_then_one_line(tmp_path, capsys, monkeypatch):
    """CI's environment (the dev extra) has no matplotlib: bad inputs are still named first, then the missing
    package, one line each."""
    import sys

    pm = eval_script("plot_metrics")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    for runs, message in (([str(tmp_path / "nope")], "no metrics.jsonl there"),
                          ([str(_run(tmp_path / "a"))], "plotting needs matplotlib")):
        with pytest.raises(SystemExit) as stop:
            pm.main([*runs, "--out", str(tmp_path / "c.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0]
