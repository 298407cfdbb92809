"""LoRASCCallback: a Cascade driven by a Hugging Face Trainer on a tiny BERT built from a config."""

import json

import pytest
import torch
from torch import nn

import lorasc_kernels
from lorasc_kernels import LoRASCConfig, LoRASCLinear, inject_lorasc

transformers = pytest.importorskip("transformers")
CHECKPOINT_FILE = pytest.importorskip("lorasc_kernels.integrations.hf_callback").CHECKPOINT_FILE

VOCAB, LENGTH = 32, 8


def tiny_bert():
    """A one-layer BERT classifier with LoRASC on its query and value projections."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    return model


def tiny_dataset(size=16):
    """Sequences labelled by whether token 1 occurs in them."""
    input_ids = torch.randint(0, VOCAB, (size, LENGTH))
    labels = (input_ids == 1).any(dim=1).long()
    return [
        {"input_ids": ids, "labels": label} for ids, label in zip(input_ids, labels, strict=True)
    ]


def train(
    model,
    callback,
    tmp_path,
    dataset=None,
    resume_from_checkpoint=None,
    before=(),
    first=False,
    **args,
):
    """A Trainer run with ``callback`` after the callbacks ``before`` (or ``first``)."""
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        learning_rate=1e-2,
        disable_tqdm=True,
        resume_from_checkpoint=args.pop("args_resume", None),
        **{"save_strategy": "no", "per_device_train_batch_size": 4, **args},
    )
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset or tiny_dataset(),
        callbacks=[*before, callback],
    )
    if first:
        callback.first_in(trainer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def query_weight(model):
    return model.bert.encoder.layer[0].attention.self.query.weight


def test_callback_runs_step_cascades_and_finalizes(tmp_path):
    model = tiny_bert()
    w0 = query_weight(model).detach().clone()
    callback = lorasc_kernels.LoRASCCallback(steps_per_cascade=2, noise_mode="off", seed=3)
    assert not callback.started  # the Cascade is built when training begins
    with pytest.raises(RuntimeError, match="no Cascade yet"):
        callback.cascade.finalize()
    trainer = train(model, callback, tmp_path, max_steps=5)
    cascade = callback.cascade
    assert cascade.optimizer is trainer.optimizer
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (2, 1)
    assert not torch.equal(query_weight(model), w0)  # two merges landed in W
    finalized = cascade.finalize()
    assert not any(isinstance(m, LoRASCLinear) for m in finalized.modules())
    assert type(finalized.bert.encoder.layer[0].attention.self.value) is nn.Linear


def test_callback_per_epoch_schedule(tmp_path):
    model = tiny_bert()
    callback = lorasc_kernels.LoRASCCallback(noise_lambda=0.1)
    trainer = train(model, callback, tmp_path, num_train_epochs=2)
    assert callback.cascade.cascade_index == 2
    assert callback.cascade.steps_in_cascade == 0
    # The epoch's boundary dropped the fast LoRA's state from the Trainer's optimizer.
    assert trainer.state.global_step == 8
    assert not trainer.optimizer.optimizer.state


@pytest.mark.parametrize("warmup_steps", [0, 2])
def test_callback_resumes_from_a_trainer_checkpoint_bit_exactly(tmp_path, warmup_steps):
    settings = {
        "steps_per_cascade": 2,
        "seed": 4,
        "noise_lambda": 0.2,
        "warmup_steps": warmup_steps,
    }
    dataset = tiny_dataset()
    uninterrupted = tiny_bert()
    train(
        uninterrupted,
        lorasc_kernels.LoRASCCallback(**settings),
        tmp_path,
        dataset,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    assert (tmp_path / "checkpoint-3" / CHECKPOINT_FILE).is_file()

    resumed = tiny_bert()  # other initial weights: the checkpoint's replace them
    callback = lorasc_kernels.LoRASCCallback(**settings)
    train(
        resumed,
        callback,
        tmp_path,
        dataset,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"),
    )  # mid-cascade
    assert callback.cascade.cascade_index == 3
    expected = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key

    with pytest.raises(ValueError, match="ran with"):
        train(
            tiny_bert(),
            lorasc_kernels.LoRASCCallback(**{**settings, "seed": 5}),
            tmp_path,
            dataset,
            max_steps=6,
            resume_from_checkpoint=str(tmp_path / "checkpoint-3"),
        )


def test_callback_checks_settings_at_once():
    with pytest.raises(ValueError, match="slow_rate"):
        lorasc_kernels.LoRASCCallback(slow_rate=2.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lorasc_kernels.LoRASCCallback(steps=3)


def test_each_process_of_a_distributed_run_keeps_its_own_cascade_file():
    from types import SimpleNamespace

    from lorasc_kernels.integrations.hf_callback import _checkpoint_file

    state = SimpleNamespace(global_step=7)
    single = _checkpoint_file(
        SimpleNamespace(output_dir="out", world_size=1, process_index=0), state
    )
    ranks = {
        _checkpoint_file(SimpleNamespace(output_dir="out", world_size=2, process_index=i), state)
        for i in (0, 1)
    }
    assert single.name == CHECKPOINT_FILE and single.parent.name == "checkpoint-7"
    assert {path.name for path in ranks} == {"lorasc_cascade.rank0.pt", "lorasc_cascade.rank1.pt"}


class Recorder(transformers.TrainerCallback):
    """What a reporting callback sees: every ``on_log``'s logs, and the learning rate of each
    optimizer step."""

    def __init__(self):
        self.logs, self.lrs = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def cascade_logs(history):
    return [entry for entry in history if "lorasc/cascade" in entry]


@pytest.mark.parametrize("first", [True, False])
def test_each_boundary_reaches_the_trainer_logs(tmp_path, first):
    reporter = Recorder()  # where W&B and TensorBoard are: before the user's callbacks
    callback = lorasc_kernels.LoRASCCallback(
        steps_per_cascade=2, noise_mode="off", keep_history=True, metrics_every=1
    )
    trainer = train(
        tiny_bert(),
        callback,
        tmp_path,
        max_steps=5,
        logging_steps=100,
        before=[reporter],
        first=first,
    )
    logged = cascade_logs(trainer.state.log_history)
    assert [(e["step"], e["lorasc/cascade"]) for e in logged] == [(2, 0), (4, 1)]
    for entry in logged:
        assert entry["lorasc/merge_ms"] > 0 and entry["lorasc/update_ratio"] > 0
        assert 1 <= entry["lorasc/cascade_effective_rank"] <= 2
        assert "loss" in entry  # the Trainer logged that step because a boundary ran
    assert logged[-1]["lorasc/effective_rank"] > logged[-1]["lorasc/cascade_effective_rank"]
    # The callbacks before LoRASCCallback see the figures only after first_in().
    assert len(cascade_logs(reporter.logs)) == (2 if first else 0)


def test_callback_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    callback = lorasc_kernels.LoRASCCallback(steps_per_cascade=2, noise_mode="off")
    trainer = train(
        tiny_bert(),
        callback,
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=100,
    )
    assert trainer.state.global_step == 4  # 8 micro-batches
    assert (callback.cascade.cascade_index, callback.cascade.steps_in_cascade) == (2, 0)
    assert [e["step"] for e in cascade_logs(trainer.state.log_history)] == [2, 4]


def test_warmup_restarts_the_trainer_schedule_at_every_cascade(tmp_path):
    recorder = Recorder()
    callback = lorasc_kernels.LoRASCCallback(steps_per_cascade=3, warmup_steps=2, noise_mode="off")
    train(
        tiny_bert(), callback, tmp_path, max_steps=7, lr_scheduler_type="linear", before=[recorder]
    )
    expected = [1e-2 * (1 - j / 7) * min(1.0, (j % 3 + 1) / 2) for j in range(7)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-9)
    assert callback.cascade.warmup_wired


def test_warmup_needs_a_lambda_schedule(tmp_path):
    from types import SimpleNamespace

    model = tiny_bert()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    args = SimpleNamespace(report_to=[])
    state = SimpleNamespace(global_step=0)
    callback = lorasc_kernels.LoRASCCallback(steps_per_cascade=3, warmup_steps=2)
    with pytest.raises(
        ValueError, match="needs the Trainer's LR scheduler to be a LambdaLR, got StepLR"
    ):
        callback.on_train_begin(
            args,
            state,
            None,
            model=model,
            optimizer=optimizer,
            lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 2),
        )
    assert not callback.started  # refused before the Cascade was built


def test_callback_resumes_from_a_checkpoint_outside_output_dir(tmp_path):
    import shutil

    settings = {"steps_per_cascade": 2, "seed": 4, "noise_lambda": 0.2}
    dataset = tiny_dataset()
    uninterrupted = tiny_bert()
    train(
        uninterrupted,
        lorasc_kernels.LoRASCCallback(**settings),
        tmp_path / "run",
        dataset,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    moved = tmp_path / "kept" / "step3"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", moved)

    with pytest.raises(
        RuntimeError,
        match=r"other/checkpoint-3/lorasc_cascade.pt, which "
        r"does not exist.*TrainingArguments\(resume_from_checkpoint=",
    ):
        train(
            tiny_bert(),
            lorasc_kernels.LoRASCCallback(**settings),
            tmp_path / "other",
            dataset,
            max_steps=6,
            resume_from_checkpoint=str(moved),
        )
    with pytest.raises(ValueError, match="is at optimizer step 6, the Trainer resumes at step 3"):
        train(
            tiny_bert(),
            lorasc_kernels.LoRASCCallback(**settings),
            tmp_path / "other",
            dataset,
            max_steps=6,
            resume_from_checkpoint=str(moved),
            args_resume=str(tmp_path / "run" / "checkpoint-6"),
        )

    resumed = tiny_bert()
    callback = lorasc_kernels.LoRASCCallback(**settings)
    train(
        resumed,
        callback,
        tmp_path / "other",
        dataset,
        max_steps=6,
        resume_from_checkpoint=str(moved),
        args_resume=str(moved),
    )
    assert callback.cascade.cascade_index == 3
    expected = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_epoch_boundaries_are_logged_at_their_own_step(tmp_path):
    """With one cascade per epoch (steps_per_cascade=None), each epoch's boundary figures
    are in the log of that epoch's last step (4 steps an epoch here), not the next one's."""
    callback = lorasc_kernels.LoRASCCallback(noise_mode="off")
    trainer = train(tiny_bert(), callback, tmp_path, num_train_epochs=2, logging_steps=100)
    assert trainer.state.global_step == 8
    logged = cascade_logs(trainer.state.log_history)
    assert [(e["step"], e["lorasc/cascade"]) for e in logged] == [(4, 0), (8, 1)]


def test_the_newest_checkpoint_is_complete_before_the_trainer_removes_an_older_one(
    tmp_path, monkeypatch
):
    """save_total_limit=1: when the Trainer rotates its checkpoints (before it calls
    on_save), the newest one already holds the Cascade's state."""
    import transformers.trainer as trainer_module

    seen = []
    rotate = trainer_module.rotate_checkpoints

    def watched(*args, **kwargs):
        newest = max(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        seen.append((newest.name, (newest / CHECKPOINT_FILE).is_file()))
        return rotate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "rotate_checkpoints", watched)
    callback = lorasc_kernels.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1)
    train(
        tiny_bert(),
        callback,
        tmp_path,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
    )
    assert seen == [("checkpoint-2", True), ("checkpoint-4", True)]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    assert torch.load(tmp_path / "checkpoint-4" / CHECKPOINT_FILE)["cascade_index"] == 2


def test_a_checkpoint_mixing_two_saves_is_refused_on_resume(tmp_path):
    """A run re-started from an earlier checkpoint and killed while it saved over a later
    one: the Cascade's state of one save beside the Trainer's files of the other. The
    binding written after both (on_save) names the files that differ."""
    import shutil

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        train(
            tiny_bert(),
            lorasc_kernels.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1),
            tmp_path / name,
            max_steps=2,
            save_strategy="steps",
            save_steps=2,
        )
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert json.loads((checkpoint / "lorasc_cascade.binding.json").read_text())
    shutil.copy(tmp_path / "b" / "checkpoint-2" / "trainer_state.json", checkpoint)
    with pytest.raises(ValueError, match=r"\['trainer_state.json'\] are not the files"):
        train(
            tiny_bert(),
            lorasc_kernels.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1),
            tmp_path / "a",
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            resume_from_checkpoint=str(checkpoint),
        )
