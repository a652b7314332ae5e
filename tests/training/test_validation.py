"""Training is chosen on a validation slice of the train split, never on the held-out set."""

from safetensors.torch import load_file
from sqlalchemy import select

from agent.adapters import AdapterRef, attach
from feedback.models import Correction, Split
from tests.factories import make_tenant
from tests.training.helpers import FAST, ROWS, add_corrections, start
from training.config import TrainConfig
from training.evaluate import example_nll
from training.models import Adapter, TrainingRun
from training.pipeline import execute_run
from training.train import SCALES, load_training_base, split_validation, train_adapter

CHOOSING = FAST | {"validation_fraction": 0.3, "try_learning_rates": [1e-3]}
MANY_ROWS = [
    {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": f"{reply['content']} {n}"}]}
    for n in range(5)
    for row in ROWS
    for reply in row["completion"]
]  # 40 distinct rows


def test_the_validation_slice_is_a_stable_part_of_the_train_rows():
    fit, validation = split_validation(MANY_ROWS, 0.3)
    assert len(validation) >= 8 and len(fit) + len(validation) == len(MANY_ROWS)
    assert not {str(r) for r in fit} & {str(r) for r in validation}
    assert split_validation(list(reversed(MANY_ROWS)), 0.3)[1] == list(reversed(validation))  # by content, not order
    assert split_validation(MANY_ROWS[:10], 0.3) == (MANY_ROWS[:10], [])  # too few: no slice, train on all


def test_the_learning_rate_and_epoch_kept_are_the_best_on_validation(tiny_base_dir, tokenizer, tmp_path):
    config = TrainConfig(
        **FAST | {"epochs": 4, "batch_size": 8, "try_learning_rates": (0.3,), "validation_fraction": 0.3}
    )
    result = train_adapter(load_training_base(str(tiny_base_dir), config), tokenizer, MANY_ROWS, config, tmp_path)
    selection = result.selection
    tried = selection["learning_rates_tried"]
    assert [t["learning_rate"] for t in tried] == [1e-2, 0.3] and tried[0]["steps"] == tried[1]["steps"] > 0
    assert selection["learning_rate"] == min(tried, key=lambda t: t["validation_nll"])["learning_rate"]
    assert selection["validation_rows"] >= 8 and selection["fit_rows"] + selection["validation_rows"] == 40
    scores = selection["epochs_scored"]
    assert selection["kept"] == min(scores, key=lambda s: s["validation_nll"])
    # Training stops at the first epoch that makes validation worse, and keeps the best one.
    nll = [s["validation_nll"] for s in scores]
    worse = [i for i in range(1, len(nll)) if nll[i] >= min(nll[:i])]
    assert len(scores) == (worse[0] + 1 if worse else 4)
    # The kept adapter's strength: the scale with the lowest validation NLL, scored as PEFT applies it
    scales = {s["scale"]: s["validation_nll"] for s in selection["scales_tried"]}
    assert list(scales) == list(SCALES) and scales[1.0] == selection["kept"]["validation_nll"]
    assert scales[selection["scale"]] == min(scales.values())
    validation = split_validation(MANY_ROWS, 0.3)[1]
    peft = attach(load_training_base(str(tiny_base_dir), config), AdapterRef(1, tmp_path, scale=0.5))
    assert round(sum(example_nll(peft, tokenizer, validation)) / len(validation), 4) == scales[0.5]


def test_the_heldout_set_never_influences_what_is_trained(sessions, run_settings):
    """The same train split with a different held-out set: the same choices, the same adapter."""
    with sessions() as session:
        tenant = make_tenant(session, instructions="Answer as Marta.")
        add_corrections(session, tenant, 60)
    first = start(sessions, tenant, CHOOSING)
    execute_run(first, run_settings, sessions=sessions, echo=lambda _: None)
    with sessions() as session:  # rewrite every held-out reply (corrections never change in the service)
        for correction in session.scalars(select(Correction).where(Correction.split == Split.heldout)):
            correction.final_text = f"Completely different text {correction.id}."
    second = start(sessions, tenant, CHOOSING)
    execute_run(second, run_settings, sessions=sessions, echo=lambda _: None)

    with sessions() as session:
        runs = [session.get(TrainingRun, run_id) for run_id in (first, second)]
        assert runs[0].heldout_snapshot_id != runs[1].heldout_snapshot_id  # the held-out set did change
        assert runs[0].train_snapshot_id == runs[1].train_snapshot_id
        selections = [run.report["training"]["selection"] for run in runs]
        drop_timing = [{k: v for k, v in s.items() if k != "scale_seconds"} for s in selections]
        assert drop_timing[0] == drop_timing[1] and len(selections[0]["learning_rates_tried"]) == 2
        assert len(selections[0]["scales_tried"]) == len(SCALES)
        adapters = [session.scalar(select(Adapter).where(Adapter.training_run_id == r)) for r in (first, second)]
        for run, adapter in zip(runs, adapters, strict=True):  # stored with the version, scored at it
            assert adapter.scale == selections[0]["scale"] == run.report["scales"]["candidate"]
        weights = [load_file(run_settings.adapter_dir / a.path / "adapter_model.safetensors") for a in adapters]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
