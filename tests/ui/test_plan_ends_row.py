"""The Ends row says how each end runs under the plan's method (its tooltip's "Now:" line)."""
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, end_spec, with_ends
from studio.ui.plan_ends_row import PlanEnds

AWQ = QuantSpec(bits=4, group_size=32, method="awq")


def test_the_ends_row_says_awq_folds_into_an_untied_head_and_not_a_tied_one(qtbot, tiny_llama,
                                                                            tiny_dirs):
    row = PlanEnds()
    qtbot.addWidget(row)
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    row.show_plan(with_ends(Plan(AWQ), qwen2.layers, end_spec("w4g32"), None), qwen2.layers,
                  native=False)
    head_box = row.boxes[0]
    assert row.ends[0].names == ("lm_head",)
    assert head_box.toolTip().endswith(
        "Now: lm_head: AWQ on the final hidden states, its scales folded into the final norm.")
    row.show_plan(with_ends(Plan(AWQ), tiny_llama.layers, end_spec("w4g32"), None),
                  tiny_llama.layers, native=False)
    [tied_box] = row.boxes
    assert ("RTN on AWQ's grid: AWQ's scales would fold into the head's columns, which a tied "
            "head shares with the embedding") in tied_box.toolTip().split("Now: ")[1]
