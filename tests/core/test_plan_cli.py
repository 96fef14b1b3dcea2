"""`compression-studio plan`: options as width x group size, a saved sweep re-used when it
covers them, bad options refused before any work."""
import json

from studio.cli import main
from studio.core.plan import Plan
from studio.core.sensitivity import SensitivityResult

SMALL = ["--bits", "2,4", "--group-sizes", "32,64", "--kl-bits", "4", "--kl-group", "32",
         "--windows", "2", "--seqlen", "16"]


def test_plan_lists_options_and_reuses_a_covering_sweep(tiny_dirs, tmp_path, capsys):
    model, sens = str(tiny_dirs["llama"]), tmp_path / "sens.json"
    out = tmp_path / "plan.json"
    assert main(["plan", model, "--budget-bpw", "4.5", *SMALL, "--sensitivity", str(sens),
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = ["W2 g64", "W2 g32", "W4 g64", "W4 g32"]
    assert report["sensitivity"]["options"] == labels
    assert report["sensitivity"]["kl_options"] == ["W4 g32"]
    assert set(report["layers"].values()) <= set(labels) | {None}
    assert sum(report["layers_by_option"].values()) == len(report["layers"])
    assert report["bits_per_weight"] <= 4.5
    plan = Plan.load(out)
    for name, label in report["layers"].items():
        spec = plan.spec_for(name)
        assert label == (None if spec is None else f"W{spec.bits} g{spec.group_size}")
    saved = SensitivityResult.load(sens)

    # Fewer options, all covered by the saved sweep: re-used (same timings), narrowed.
    assert main(["plan", model, "--budget-bpw", "4.5", "--bits", "4", "--group-sizes", "32,64",
                 "--kl-bits", "4", "--kl-group", "32", "--sensitivity", str(sens),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers x 2 options" in text and "KL at W4 g32" in text
    assert f"proxy {saved.proxy_seconds:.1f} s" in text
    assert " x W4 g" in text.splitlines()[0]   # the mix counts layers per option label


def test_measured_points_quantize_the_plan_and_points_of_its_curve(tiny_dirs, tmp_path, capsys):
    model, sens = str(tiny_dirs["llama"]), tmp_path / "sens.json"
    out = tmp_path / "plan.json"
    args = ["plan", model, "--budget-bpw", "4.5", *SMALL, "--sensitivity", str(sens),
            "--out", str(out), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["measured_points"] == []
    assert main(args + ["--measure-points", "2"]) == 0   # the saved sweep is re-used
    report = json.loads(capsys.readouterr().out)
    first, other = report["measured_points"]
    # The first point is the plan itself, quantized: its size and prediction are the plan's.
    assert abs(first["bpw"] - report["bits_per_weight"]) < 1e-3
    assert first["predicted"] == report["predicted_loss"]
    assert min(report["pareto"]["bpw"]) - 1e-9 <= other["bpw"]
    for point in (first, other):
        assert point["kl"] > 0 and 1 < point["ppl"] < float("inf")


def test_bad_options_exit_2_before_the_model_is_opened(tmp_path, capsys):
    missing = str(tmp_path / "no-model")  # never opened: the options are refused first
    cases = [(["--kl-bits", "7"], "W7 g128, which is not among the options"),
             (["--group-sizes", "32,100"], "group sizes among"),
             (["--bits", "2,x"], "whole numbers"),
             (["--bits", "1,4"], "Bits must be"),
             (["--group-sizes", "64", "--kl-group", "64,32"], "one group size"),
             (["--measure-points", "-1"], "a count of 0 or more")]
    for extra, message in cases:
        assert main(["plan", missing, "--budget-bpw", "4", *extra,
                     "--out", str(tmp_path / "p.json")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("compression-studio plan: ") and message in err, (extra, err)
    assert not (tmp_path / "p.json").exists()


def test_gguf_native_plan_chooses_among_gguf_types_at_their_bytes(tiny_dirs, tmp_path, capsys):
    model, out, types = str(tiny_dirs["llama"]), tmp_path / "plan.json", tmp_path / "types.txt"
    assert main(["plan", model, "--budget-bpw", "5.0", "--gguf-native", "--windows", "2",
                 "--seqlen", "16", "--out", str(out), "--llama-cpp", str(types), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gguf_native"] is True
    assert report["sensitivity"]["options"] == ["Q4_0", "Q5_0", "Q8_0"]
    assert report["sensitivity"]["kl_options"] == ["Q4_0"]       # KL at group 32 by default
    assert set(report["layers"].values()) <= {"Q4_0", "Q5_0", "Q8_0", None}
    assert 4.5 < report["bits_per_weight"] <= 5.0                 # the spare half bit is spent
    plan = Plan.load(out)
    for name, label in report["layers"].items():
        spec = plan.spec_for(name)
        if spec is not None:
            assert (spec.group_size, spec.symmetric, spec.scale_dtype) == (32, True, "fp16")
            assert label == {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}[spec.bits]
    kinds = {line.rsplit("=", 1)[1] for line in types.read_text().splitlines()}
    assert kinds <= {"q4_0", "q5_0", "q8_0", "f16"} and "q4_0" in kinds


def test_gguf_native_refuses_its_own_menu_being_changed(tmp_path, capsys):
    for extra in (["--bits", "4"], ["--group-sizes", "32"]):
        assert main(["plan", str(tmp_path / "no-model"), "--budget-bpw", "5", "--gguf-native",
                     *extra, "--out", str(tmp_path / "p.json")]) == 2
        assert "--gguf-native chooses the options itself" in capsys.readouterr().err
