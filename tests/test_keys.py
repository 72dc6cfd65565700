"""keys: the training, study and child keys that decide reuse, and the code version in them."""
import dataclasses

import pytest
import torch

from pipeline import config, keys, runtime

CPU = runtime.Runtime(torch.device("cpu"), "fp32")

# Params that may change without changing a run's result (logging, resuming, how it is launched;
# num_workers with the default tensor pipeline only: see the torchvision test below).
# data_dir and download: where the data lies, not what it is (its digest is in the key).
VOLATILE = {"log_every", "resume_run_id", "env_manager", "num_workers", "force", "checkpoint_every",
            "promote",  # who holds the alias, not what the run trains
            "data_dir", "download",
            # where a child runs is not what it computes: local and Ray results stand for each other
            "executor", "ray_address", "cpus_per_trial", "gpus_per_trial", "max_retries",
            # where an Optuna study is kept and how many trials are asked at once (like executor)
            "optuna_storage", "trial_batch",
            # how fast the same arithmetic runs: compiled kernels, the evaluation batch size
            "compile", "eval_bs",
            # what the data digest counts already: the files' bytes
            "verify", "synthetic_train", "synthetic_test",
            # as given: the key holds the device type and precision they resolve to
            "device", "precision"}


def key(stage="train", digest="d" * 64, code="", **overrides):
    cfg = config.load(stage, overrides)
    return keys.training_key(cfg, digest, runtime.of(cfg), code=code)


def test_training_key_follows_params_not_spelling():
    a = key(lr="1e-4")
    assert a == key(lr="0.0001")
    assert a != key(lr="0.0002")
    assert a == key(lr="1e-4", log_every="7")


def test_training_key_changes_with_data_parent_and_precision():
    a = key("tune_lr", parent_run_id="a" * 32)
    assert a != key("tune_lr", parent_run_id="b" * 32)  # a new upstream run: nothing downstream is stale
    assert a != key("tune_lr", digest="e" * 64, parent_run_id="a" * 32)  # other data bytes
    assert a != key("tune_lr", parent_run_id="a" * 32, val_split="0.1")
    assert key(precision="fp32") != key(precision="bf16")  # a bf16 run never stands in for fp32


def test_training_key_changes_with_parent_run_id():
    # a new upstream run must make `main` rerun every stage after it
    found = {key("tune_lr", parent_run_id=parent) for parent in ("", "aaaa", "bbbb")}
    assert len(found) == 3


# a cap counts only where it cuts: test_a_cap_counts_as_the_epochs_and_repeats_it_leaves
@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(config.Config) if f.name not in keys.CAPS])
def test_training_key_covers_every_param_that_decides_the_result(name):
    cfg = config.load("train")
    other = dataclasses.replace(cfg, **{name: changed(getattr(cfg, name))})
    if name in VOLATILE:
        assert keys.training_key(other, "d" * 64, CPU) == keys.training_key(cfg, "d" * 64, CPU)
    else:
        assert keys.training_key(other, "d" * 64, CPU) != keys.training_key(cfg, "d" * 64, CPU)


def test_device_and_precision_count_as_what_they_resolve_to():
    auto, chosen = config.load("train"), config.load("train", {"device": "cpu", "precision": "fp32"})
    # main -P device=cpu after a main with the defaults, on a machine where auto resolved the same:
    # reused (the runtime itself is in the key: test_the_runtime_a_stage_resolved_is_part_of_its_keys)
    assert keys.training_key(auto, "d" * 64, CPU) == keys.training_key(chosen, "d" * 64, CPU)


def test_num_workers_counts_only_where_its_workers_draw_the_augmentation():
    assert key(num_workers="0") == key(num_workers="2")  # the tensor pipeline: the same batches
    assert key(data_pipeline="torchvision", num_workers="0") != key(data_pipeline="torchvision", num_workers="2")


def test_a_cap_counts_as_the_epochs_and_repeats_it_leaves():
    """main -P epochs=30 hands its stages max_epochs=30: at scale=demo (2 epochs) it cuts nothing,
    and the stages main already finished without it are reused, the stopped one continued."""
    def of(cfg):
        return keys.training_key(cfg, "d" * 64, runtime.of(cfg))  # as key() resolves it

    assert key("model_selection", scale="demo") == key("model_selection", scale="demo", max_epochs="30",
                                                        max_repeats="9")
    train = config.load("train")  # 3 epochs (and autotune's 10 trial_epochs, which max_epochs caps too)
    cut = dataclasses.replace(train, epochs=2, trial_epochs=2)
    assert key(max_epochs="2") == of(cut) != of(train)
    assert key("model_selection", max_repeats="1") == key("model_selection", repeats="1") != key("model_selection")
    # a cap on a config not yet capped (replace, not load) counts as what it will cut at run time
    assert of(dataclasses.replace(train, max_epochs=2)) == of(cut)


def test_training_key_covers_the_code(monkeypatch):
    before = key()
    monkeypatch.setattr(keys, "code_version", lambda: "another")
    assert key() != before


def test_code_version_follows_code_params_and_mlproject(tmp_path, monkeypatch):
    for name in ("pipeline/a.py", "params/x.yaml", "MLproject"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("one")
    monkeypatch.setattr(keys, "PROJECT_DIR", tmp_path)
    monkeypatch.setattr(keys, "PARAMS_DIR", tmp_path / "params")
    versions = {keys.hash_code()}
    for name in ("pipeline/a.py", "params/x.yaml", "MLproject"):
        (tmp_path / name).write_text("two")
        versions.add(keys.hash_code())
    (tmp_path / "pipeline/a.py").rename(tmp_path / "pipeline/b.py")  # a renamed module counts too
    versions.add(keys.hash_code())
    (tmp_path / "pipeline/notes.txt").write_text("not code")
    versions.add(keys.hash_code())
    assert len(versions) == 5 and len(keys.hash_code()) == 12


def test_a_process_keeps_the_code_version_it_started_with_though_the_files_change(tmp_path, monkeypatch):
    """An edit or a `git pull` while a stage trains: its later children are still the code it runs."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("one")
    monkeypatch.setattr(keys, "PROJECT_DIR", tmp_path)
    keys.code_version.cache_clear()
    try:
        started = keys.code_version()
        before = key()
        (tmp_path / "pipeline" / "a.py").write_text("two")
        assert keys.hash_code() != started  # what a new process would run
        assert keys.code_version() == started and key() == before
        assert key(code=keys.hash_code()) != before  # main's look-up for a stage it starts anew
    finally:
        keys.code_version.cache_clear()  # the real checkout's, for the tests after this one


def test_training_key_is_sixteen_hex_digits():
    found = key()
    assert len(found) == 16 and int(found, 16) >= 0


def changed(value):
    """A different value of the same type (validity does not matter to the key)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + value[-1:] if value else ["1"]
    return value + "x"



def test_the_runtime_a_stage_resolved_is_part_of_its_keys():
    cfg = config.load("train")
    bf16 = runtime.Runtime(torch.device("cpu"), "bf16")
    cuda = runtime.Runtime(torch.device("cuda"), "fp32")
    assert len({keys.training_key(cfg, "d" * 64, r) for r in (CPU, bf16, cuda)}) == 3
    # a child's key: its stage's study key, its name and where its weights come from
    child = keys.child_key(cfg, "d" * 64, CPU, "tune_lr lr=0.001", "scratch")
    assert child != keys.child_key(cfg, "d" * 64, CPU, "tune_lr lr=0.002", "scratch")
    assert child != keys.child_key(cfg, "d" * 64, CPU, "tune_lr lr=0.001", "run-a")
    assert child != keys.child_key(cfg, "d" * 64, bf16, "tune_lr lr=0.001", "scratch")
    # n_trials is how far a study goes, not what a trial trains
    assert keys.study_key(cfg.replace(n_trials=7), "d" * 64, CPU) == keys.study_key(cfg, "d" * 64, CPU)
    assert keys.training_key(cfg.replace(n_trials=7), "d" * 64, CPU) != keys.training_key(cfg, "d" * 64, CPU)
