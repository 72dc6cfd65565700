"""The whole study through `mlflow run . -e main` at toy size: lineage, nesting, reuse, sweeps."""
import math
import re

import pytest
import torch

from support.store import PROJECT, TINY, VENV_BIN
from pipeline import models
from pipeline.runtime import resolve
from pipeline.workflow import CHAIN

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def study(module_store):
    """The study at toy size, interrupted with SIGTERM once tune_lr's first child has finished,
    then continued with the one command the interruption printed: every test below checks the
    continued study, and test_an_interrupted_study_continues_child_by_child how it continued.

    What the study made is noted as it ends (its runs, its main run, the champion): the tests that
    run more commands on the same store add runs, and the tests that read the study read only its
    own, so no test depends on another's order or outcome."""
    import os
    import signal
    import subprocess

    from support.processes import Pause

    store = module_store
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "main", "--env-manager", "local"]
    for key, value in main_params(store).items():
        cmd += ["-P", f"{key}={value}"]
    # one epoch of one batch a child (bs 256, 128 images): tune_lr's second batch is its second
    # child's first, the first child FINISHED
    pause = Pause(store.root / "pause", "batch:2@tune_lr")
    proc = subprocess.Popen(cmd, cwd=store.root, env=pause.env(store.env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pause.wait("batch-2", proc, timeout=900)
    tune_lr = store.top_level("tune_lr")
    children = store.children(tune_lr[0].info.run_id)
    assert sorted(c.info.status for c in children) == ["FINISHED", "RUNNING"]
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    hints = re.findall(r"Continue with the same command: (mlflow run .*)", err)
    assert len(hints) == 1, err[-3000:]  # main's, not also the stage process's
    experiment = store.client.get_run(tune_lr[0].info.run_id).info.experiment_id  # where reuse looks
    assert hints[0].startswith(f"mlflow run . -e main --experiment-id {experiment} --env-manager local ")
    pairs = dict(p.split("=", 1) for p in re.findall(r"-P '?([^ ']+)'?", hints[0]))
    assert pairs == main_params(store)
    store.interrupted = {"tune_lr": tune_lr[0].info.run_id, "stderr": err,
                         "finished_child": next(c.info.run_id for c in children if c.info.status == "FINISHED")}
    proc = store.mlflow_run("main", pairs)
    store.continued_output = proc.stdout + proc.stderr
    (store.main_run,) = finished_top_level(store, "main")
    store.study_runs = {r.info.run_id for r in store.runs()}
    store.finished_counts = {stage: len(finished_top_level(store, stage)) for stage in CHAIN}
    store.champion = store.client.get_model_version_by_alias("svhn-classifier-synthetic", "champion").run_id
    return store


def finished_top_level(store, stage):
    return [r for r in store.top_level(stage) if r.info.status == "FINISHED"]


def main_params(store, **extra):
    params = store.params({"epochs": "1", "repeats": "1", **extra})
    params.pop("bs")  # main passes data params and caps on, not stage hyperparameters
    return params


def stage_run(store, stage):
    """The study's own run of `stage`, as its main run names it (later tests add more)."""
    return store.client.get_run(store.main_run.data.tags[f"run_{stage}"])


def new_finished_top_level(store, before: set[str]) -> dict[str, list]:
    """The FINISHED top-level runs made since `before` (a set of run ids), by stage."""
    made = {}
    for run in store.runs():
        if run.info.run_id not in before and run.info.status == "FINISHED" \
                and "mlflow.parentRunId" not in run.data.tags:
            made.setdefault(run.data.tags.get("stage"), []).append(run)
    return made


def best_state(store, run_id):
    return store.checkpoint(run_id)


def batches_tracked(state):
    """BatchNorm's count of training batches (None without BatchNorm): it travels with the weights."""
    counts = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert len(counts) <= 1
    return counts.pop() if counts else None


def max_weight_change(a, b, arch):
    return max((a[name] - b[name]).abs().max().item() for name, _ in models.build(arch).named_parameters())


def test_one_finished_top_level_run_per_stage_chained_by_run_id(study):
    assert study.finished_counts == {stage: 1 for stage in CHAIN}
    previous = None
    for stage in CHAIN:
        run = stage_run(study, stage)
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED", stage
        assert tags["stage"] == stage and tags["arch"] in ("resnet", "vgg", "resnet2")
        assert tags["source_run_id"] == (previous.info.run_id if previous else "scratch"), stage
        assert "checkpoints/best.pt" in study.artifacts(run.info.run_id), stage
        children = {c.info.run_id: c for c in study.children(run.info.run_id)}
        assert tags["best_child_run_id"] in children, stage
        best_child = children[tags["best_child_run_id"]]
        for child in children.values():  # one epoch each: its best is that epoch
            assert child.data.metrics["best_test_acc"] == \
                study.client.get_metric_history(child.info.run_id, "test_acc")[0].value
        assert metrics["best_test_acc"] == max(c.data.metrics["best_test_acc"] for c in children.values())
        assert best_child.data.metrics["best_test_acc"] == metrics["best_test_acc"]
        assert "plots/compare_test_acc.png" in study.artifacts(run.info.run_id)
        # every child logs the same params and per-epoch metrics, so the compare view lines up
        keys = {frozenset(c.data.params) for c in children.values()}
        assert len(keys) == 1 and {"lr", "gamma", "wd", "bs", "seed"} <= set(next(iter(keys)))
        assert all(study.steps(c.info.run_id, "test_acc") == [1] for c in children.values())
        previous = run


def test_the_continued_study_reuses_the_stages_that_finished_before_the_interruption(study):
    output = study.continued_output
    assert "[main] model_selection: reusing FINISHED run" in output and "[main] baseline: reusing" in output
    assert "[main] tune_lr: starting `mlflow run -e tune_lr`" in output  # interrupted: continued, not reused


def test_an_interrupted_study_continues_child_by_child(study):
    killed = study.client.get_run(study.interrupted["tune_lr"])
    assert killed.info.status in ("KILLED", "FAILED")  # ours, or `mlflow run`'s word after it
    continued = stage_run(study, "tune_lr")
    assert killed.data.tags["continued_in"] == continued.info.run_id
    children = study.children(continued.info.run_id)
    assert len({c.info.run_name for c in children}) == len(children) == 5  # each lr once
    assert study.interrupted["finished_child"] in {c.info.run_id for c in children}  # reused, not retrained
    # all taken over, but a child stopped before its first epoch ended: nothing to keep, so it
    # stays behind, unfinished and marked superseded (and claimed once), and its lr was trained anew
    (left,) = study.children(killed.info.run_id)
    assert left.info.status != "FINISHED" and left.data.tags["training_key"].startswith("superseded-")
    assert [k for k in left.data.params if k.startswith("writer.")] == ["writer.1"]
    for child in children:
        assert child.info.status == "FINISHED" and study.steps(child.info.run_id, "test_acc") == [1]
    (main_killed,) = [r for r in study.top_level("main")
                      if r.info.status != "FINISHED" and r.info.run_id in study.study_runs]
    assert f"run {main_killed.info.run_id} marked KILLED" in study.interrupted["stderr"]


def test_checkpoints_follow_the_lineage(study):
    """Each stage carries its best child's best.pt, and each child's best.pt grew out of the
    checkpoint its source_run_id names: BatchNorm's batch counter is the source's plus this
    child's own batches (TINY's limit_train images per epoch)."""
    checked = 0
    for stage in CHAIN:
        run = stage_run(study, stage)
        state = best_state(study, run.info.run_id)
        best_child = best_state(study, run.data.tags["best_child_run_id"])
        assert state.keys() == best_child.keys() and all(torch.equal(state[k], best_child[k]) for k in state)
        for child in study.children(run.info.run_id):
            count = batches_tracked(best_state(study, child.info.run_id))
            if count is None:  # vgg has no BatchNorm
                continue
            source = child.data.tags["source_run_id"]
            start = 0 if source == "scratch" else batches_tracked(best_state(study, source))
            steps = math.ceil(int(TINY["limit_train"]) / int(child.data.params["bs"])) * int(child.data.metrics["best_epoch"])
            assert count == start + steps, (stage, child.info.run_name)
            checked += 1
    assert checked >= 2  # deepen's two phases (resnet2) at least
    # retrain's phase 2 starts from phase 1's best.pt: two steps at lr 1e-5 move no weight by more
    # than 2 x 10 x lr (RMSprop), while phase 1's own first step moved every weight by 10 x 1e-3
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "retrain").info.run_id)}
    arch = phases["2"].data.tags["arch"]
    phase1, phase2 = (best_state(study, phases[p].info.run_id) for p in "12")
    assert max_weight_change(phase2, phase1, arch) < 2.1e-4


def test_model_selection_compares_archs_and_names_a_winner(study):
    run = stage_run(study, "model_selection")
    names = sorted(c.info.run_name for c in study.children(run.info.run_id))
    assert names == ["model_selection resnet #1", "model_selection vgg #1"]
    metrics = run.data.metrics
    for arch, count in (("resnet", 2_629_706), ("vgg", 42_924_234)):
        assert metrics[f"{arch}_params"] == count
        assert {f"{arch}_mean_time_s", f"{arch}_acc_mean", f"{arch}_acc_std"} <= set(metrics)
    winner = run.data.tags["winner"]
    assert metrics[f"{winner}_acc_mean"] == max(metrics["resnet_acc_mean"], metrics["vgg_acc_mean"])
    assert stage_run(study, "baseline").data.tags["arch"] == winner  # baseline takes the winner


def test_stage_children_follow_the_seed(study):
    baseline = study.children(stage_run(study, "baseline").info.run_id)
    assert sorted(c.info.run_name for c in baseline) == ["baseline test0 (1 epochs)", "baseline test1"]
    tune_lr = study.children(stage_run(study, "tune_lr").info.run_id)
    assert sorted(float(c.data.params["lr"]) for c in tune_lr) == [0.0001, 0.0002, 0.00025, 0.0005, 0.00075]
    assert all(c.info.run_name.startswith("tune_lr lr=") for c in tune_lr)
    assert [c.data.params["gamma"] for c in study.children(stage_run(study, "tune_gamma").info.run_id)] \
        == ["0.0001"]
    (overfit,) = study.children(stage_run(study, "overfit").info.run_id)
    assert (overfit.data.params["wd"], overfit.data.params["bs"]) == ("5e-05", "128")
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "retrain").info.run_id)}
    assert phases["2"].data.tags["source_run_id"] == phases["1"].info.run_id
    assert (phases["1"].data.params["lr"], phases["2"].data.params["lr"]) == ("0.001", "1e-05")
    deepen = study.children(stage_run(study, "deepen").info.run_id)
    assert {c.data.tags["arch"] for c in deepen} == {"resnet2"}
    assert {c.data.params["augment"] for c in deepen} == {"false"}


def test_main_logs_a_summary_and_registers_a_champion(study):
    summary = study.download(study.main_run.info.run_id, "summary.md").read_text()
    for stage in CHAIN:
        assert stage_run(study, stage).info.run_id in summary
    # both register, retrain first; the alias goes to deepen only on a strictly higher figure, both
    # judged in deepen's run on the same split
    name = "svhn-classifier-synthetic"
    assert {s: stage_run(study, s).data.tags["registered_model_version"] for s in ("retrain", "deepen")} == \
        {"retrain": f"{name}/1", "deepen": f"{name}/2"}
    judged = re.search(rf"registered {name} version 2 ([\d.]+)% (?:vs champion version 1|over version 1) ([\d.]+)%",
                       study.continued_output)
    challenger, champion = map(float, judged.groups())
    assert study.champion == stage_run(study, "deepen" if challenger > champion else "retrain").info.run_id


def test_main_shows_the_study_at_a_glance_with_each_stage_linked_to_its_run(study):
    """plots/study.png and summary.md: every stage in order, linked to its run, the champion marked."""
    from PIL import Image

    main = study.main_run  # the continued study's main (the first is KILLED)
    experiment = main.info.experiment_id
    summary = study.download(main.info.run_id, "summary.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in summary.splitlines() if line.startswith("| ") and "](#/" in line]
    assert [row[0].split(" ")[0] for row in rows] == CHAIN  # stage, in order
    champion = study.champion  # when the study ended (later tests may register more)
    for stage, (name, link, arch, best, _, children, _, _) in zip(CHAIN, rows):
        run = stage_run(study, stage)
        run_id = run.info.run_id
        assert main.data.tags[f"run_{stage}"] == run_id
        assert link == f"[{run_id}](#/experiments/{experiment}/runs/{run_id})"
        assert arch == run.data.tags["arch"]
        assert best == f"{run.data.metrics['best_test_acc']:.3f}"
        assert children == str(len(study.children(run_id)))
        assert name.endswith("\u2605 champion") == (run_id == champion)
    path = study.download(main.info.run_id, "plots/study.png")
    with Image.open(path) as image:
        image.verify()  # a whole, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 1200 and image.height >= 600
        pixels = image.convert("RGB")
        colours = {colour for _, colour in pixels.getcolors(maxcolors=1 << 20)}
    assert (0xD4, 0xA0, 0x00) in colours  # the champion's gold outline is drawn
    assert (0x4A, 0x6F, 0xA5) in colours  # and the stage boxes and test bars


def test_running_main_again_reuses_every_stage(study):
    before = {r.info.run_id for r in study.runs()}
    proc = study.mlflow_run("main", main_params(study))
    output = proc.stdout + proc.stderr
    new = [r for r in study.runs() if r.info.run_id not in before]
    assert [r.data.tags.get("stage") for r in new] == ["main"]  # no new training run
    assert output.count("reusing FINISHED run") == len(CHAIN)
    # what makes a rerun cheap: no stage process is started (each costs ~8 s before any work)
    assert "starting `mlflow run" not in output and "python -m pipeline model_selection" not in output


def test_a_changed_param_reruns_that_stage_and_the_ones_after(study):
    runs_before = {r.info.run_id for r in study.runs()}
    temporary_before = set((study.root / "tmp").iterdir())
    # registered_model only matters from retrain on: earlier stages are reused, later ones rerun
    study.mlflow_run("main", main_params(study, registered_model="svhn-alt"))
    made = new_finished_top_level(study, runs_before)
    assert sorted(made) == ["deepen", "main", "retrain"] and all(len(runs) == 1 for runs in made.values())
    # the one folder `mlflow run` itself leaves in TMPDIR (mkdtemp's tmp*); none for the stages main ran
    left = set((study.root / "tmp").iterdir()) - temporary_before
    assert len([path for path in left if path.is_dir() and path.name.startswith("tmp")]) == 1, left
    (new_retrain,), (new_deepen,) = made["retrain"], made["deepen"]
    assert new_retrain.data.tags["source_run_id"] == stage_run(study, "overfit").info.run_id
    assert new_deepen.data.tags["source_run_id"] == new_retrain.info.run_id


def test_tune_lr_sweep_makes_nested_children_and_picks_the_best(study):
    parent = stage_run(study, "baseline")
    runs_before = {r.info.run_id for r in study.runs()}
    study.mlflow_run("tune_lr", study.params({"parent_run_id": parent.info.run_id, "lrs": "0.0005,1e-12",
                                              "epochs": "1"}))
    (run,) = new_finished_top_level(study, runs_before)["tune_lr"]
    children = {c.info.run_name: c for c in study.children(run.info.run_id)}
    assert sorted(children) == ["tune_lr lr=0.0005", "tune_lr lr=1e-12"]
    accs = {c.info.run_id: c.data.metrics["best_test_acc"] for c in children.values()}
    assert run.data.metrics["best_test_acc"] == max(accs.values())
    assert accs[run.data.tags["best_child_run_id"]] == max(accs.values())
    assert all(c.data.tags["source_run_id"] == parent.info.run_id for c in children.values())
    # every sweep point starts from the parent's best.pt: at lr 1e-12 the weights stay where they began
    still = best_state(study, children["tune_lr lr=1e-12"].info.run_id)
    assert max_weight_change(still, best_state(study, parent.info.run_id), parent.data.tags["arch"]) < 1e-9


def test_unfinished_parent_and_parent_without_checkpoint_are_refused(study):
    experiment = study.client.get_experiment_by_name("Default").experiment_id
    running = study.client.create_run(experiment).info.run_id
    proc = study.cli("tune_lr", "--parent_run_id", running)
    assert proc.returncode == 2 and f"parent run {running} is RUNNING, not FINISHED" in proc.stderr
    proc = study.cli("tune_lr", "--parent_run_id", study.main_run.info.run_id)
    assert proc.returncode == 2 and "has no checkpoints/best.pt" in proc.stderr
    assert "epoch 1" not in proc.stdout
    deleted = study.client.create_run(experiment).info.run_id  # FINISHED, then deleted in the UI
    study.client.set_terminated(deleted, "FINISHED")
    study.client.delete_run(deleted)
    proc = study.cli("tune_lr", "--parent_run_id", deleted)
    assert proc.returncode == 2 and f"parent run {deleted} was deleted: restore it" in proc.stderr


# -- the record: what every run says about what ran ---------------------------------------------

def training_runs(store):
    """Every FINISHED run of the study (an interrupted run may have stopped before logging)."""
    return [r for r in store.runs() if r.data.tags.get("stage") not in (None, "evaluate", "predict")
            and r.info.status == "FINISHED" and r.info.run_id in store.study_runs]


def test_every_run_records_commit_code_environment_and_runtime(study):
    import subprocess

    from support.store import PROJECT

    runs = [r for r in study.runs() if "stage" in r.data.tags and r.info.run_id in study.study_runs]
    assert len(runs) > len(CHAIN) * 2  # stage runs, their children, and main
    commits = {r.data.tags["mlflow.source.git.commit"] for r in runs}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                          check=True).stdout.strip()
    # HEAD when the study ran (a commit made while the tests run would move HEAD, not the record)
    assert commits == {head} or all(
        subprocess.run(["git", "merge-base", "--is-ancestor", c, head], cwd=PROJECT).returncode == 0
        for c in commits), commits
    for run in runs:
        tags = run.data.tags
        assert len(tags["mlflow.source.git.commit"]) == 40, run.info.run_name
        assert tags["code_version"] and tags["env.torch"].startswith(torch_version())
        assert tags["env.mlflow"] == "3.17.2" and tags["env.python"].startswith("3.")
    for run in training_runs(study):
        if run.data.tags["stage"] == "main":
            continue
        params = run.data.params
        resolved = resolve("auto", "auto")
        device, precision = resolved.device, resolved.precision  # what this machine resolves: CPU or GPU
        assert (params["device_resolved"], params["precision_resolved"]) == (str(device), precision)
        assert int(params["torch_threads"]) >= 1 and params["data_pipeline"] == "tensor"


def torch_version():
    import torch

    return torch.__version__.split("+")[0]


def test_every_training_run_logs_its_datasets_with_sha256_digests(study):
    import hashlib

    train_mat = next(study.data_dir.glob("*/train_32x32.mat"))
    whole = hashlib.sha256(train_mat.read_bytes()).hexdigest()
    for run in training_runs(study):
        inputs = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset
                  for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"}, run.info.run_name
        tags = run.data.tags
        assert tags["dataset.train.count"] == TINY["limit_train"] and tags["dataset.test.count"] == TINY["limit_test"]
        for context, dataset in inputs.items():
            assert len(tags[f"dataset.{context}.sha256"]) == 64
            assert dataset.digest == tags[f"dataset.{context}.sha256"][:32]
            assert dataset.source.endswith(f'{context}_32x32.mat"}}')
        # limit_train of 600 rows: the digest is of those rows, not of the whole file
        assert tags["dataset.train.sha256"] != whole


def test_every_child_logs_the_epochs_it_trained(study):
    for stage in CHAIN:
        for child in study.children(stage_run(study, stage).info.run_id):
            epochs = int(child.data.params["epochs"])
            assert study.steps(child.info.run_id, "test_acc") == list(range(1, epochs + 1)), child.info.run_name


def test_retrain_result_is_phase_two_and_deepen_continues_from_phase_one_last_weights(study):
    for stage in ("retrain", "deepen"):
        run = stage_run(study, stage)
        phases = {c.data.tags["phase"]: c for c in study.children(run.info.run_id)}
        assert run.data.tags["best_child_run_id"] == phases["2"].info.run_id  # not the max of both
        assert run.data.metrics["best_test_acc"] == phases["2"].data.metrics["best_test_acc"]
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "deepen").info.run_id)}
    assert phases["2"].data.tags["init_from"] == f"{phases['1'].info.run_id}/last epoch"
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "retrain").info.run_id)}
    assert phases["2"].data.tags["init_from"] == f"{phases['1'].info.run_id}/checkpoints/best.pt"


def test_init_scratch_ignores_the_parents_weights_and_parent_loads_them(study, monkeypatch):
    import torch

    from pipeline import config, lineage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
    parent = stage_run(study, "baseline").info.run_id
    parent_best = study.checkpoint(parent)
    from_parent = lineage.resolve_lineage(config.load("tune_lr", {"parent_run_id": parent}))
    assert all(torch.equal(from_parent.init_state[k], v) for k, v in parent_best.items())
    scratch = lineage.resolve_lineage(config.load("tune_lr", {"parent_run_id": parent, "init": "scratch"}))
    assert scratch.init_state is None and scratch.parent_run_id == parent


def test_evaluate_entry_point_reports_the_champions_accuracy_on_the_test_split(study, monkeypatch, tmp_path):
    import mlflow

    from pipeline import config, data, predict

    params = main_params(study)
    params.pop("epochs"), params.pop("repeats"), params.pop("log_every")  # evaluate reads the model and data only
    study.mlflow_run("evaluate", params)
    (run,) = study.top_level("evaluate")  # this test's: no other runs evaluate
    cfg = config.load("evaluate", params)
    dataset = data.load(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)  # never mlflow.set_tracking_uri: it outlives the test
    model = mlflow.pytorch.load_model("models:/svhn-classifier-synthetic@champion", map_location="cpu",
                                     dst_path=str(tmp_path))
    predicted = predict.probabilities(model, dataset.test_images.permute(0, 2, 3, 1).numpy()).argmax(1)
    truth = dataset.test_labels.numpy()
    assert run.data.metrics["eval_test_acc"] == pytest.approx(100.0 * float((predicted == truth).mean()))
    digit = int(truth[0])
    expected = 100.0 * float((predicted[truth == digit] == digit).mean())
    assert run.data.metrics[f"test_acc_digit_{digit}"] == pytest.approx(expected)
    assert "evaluation/confusion_matrix.png" in study.artifacts(run.info.run_id)
    champion = study.client.get_model_version_by_alias("svhn-classifier-synthetic", "champion")
    assert run.data.tags["model_uri"] == f"models:/svhn-classifier-synthetic/{champion.version}"  # pinned
    inputs = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset.digest
              for d in study.client.get_run(run.info.run_id).inputs.dataset_inputs}  # the data it read
    assert inputs == {"test": dataset.test.digest[:32]} and run.data.tags["data_digest"] == dataset.digest


def test_main_reuses_by_data_digest_and_retrains_when_one_byte_changes(study, tmp_path):
    """The key holds the data's digest, not its folder: a byte-identical copy is reused, and one
    changed byte makes `main` train again from its first stage."""
    import os
    import shutil
    import signal
    import subprocess

    copy = tmp_path / "data"
    shutil.copytree(study.data_dir, copy)
    proc = study.mlflow_run("main", main_params(study, data_dir=str(copy)))
    assert (proc.stdout + proc.stderr).count("reusing FINISHED run") == len(CHAIN)
    train_mat = next(copy.glob("*/train_32x32.mat"))
    raw = bytearray(train_mat.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one pixel of one image
    train_mat.write_bytes(bytes(raw))
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "main", "--env-manager", "local"]
    for key, value in main_params(study, data_dir=str(copy)).items():
        cmd += ["-P", f"{key}={value}"]
    main = subprocess.Popen(cmd, cwd=study.root, env=study.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in main.stdout:  # the first stage's verdict is all this test needs
            if line.startswith("[main] model_selection:"):
                assert "starting `mlflow run -e model_selection`" in line, line
                break
        else:
            raise AssertionError("main never reached model_selection")
    finally:
        os.killpg(main.pid, signal.SIGKILL)
        main.wait(timeout=60)


def test_main_with_tuner_optuna_swaps_the_sweeps_for_autotune_and_retrain_uses_its_values(study):
    from pipeline import config

    proc = study.mlflow_run("main", main_params(study, tuner="optuna", n_trials="1"))
    output = proc.stdout + proc.stderr
    assert "[main] baseline: reusing FINISHED run" in output  # the seed chain's, up to the sweeps
    main = next(r for r in finished_top_level(study, "main") if r.data.params.get("tuner") == "optuna")
    assert main.info.run_id not in study.study_runs
    assert "run_tune_lr" not in main.data.tags and "run_overfit" not in main.data.tags
    tuned = study.client.get_run(main.data.tags["run_autotune"])
    assert tuned.data.tags["init_from"] == f"{main.data.tags['run_baseline']}/checkpoints/best.pt"
    assert [c.data.tags["trial_number"] for c in study.children(tuned.info.run_id)] == ["0"]  # n_trials=1
    retrain = study.client.get_run(main.data.tags["run_retrain"])
    assert retrain.info.status == "FINISHED"
    assert retrain.data.params["parent_run_id"] == tuned.info.run_id
    (phase2,) = [c for c in study.children(retrain.info.run_id) if c.data.tags["phase"] == "2"]
    for name in ("lr", "gamma", "wd", "bs"):
        best = config.parse_value(name, tuned.data.tags[f"best_{name}"])
        assert config.parse_value(name, retrain.data.params[name]) == best
        assert config.parse_value(name, phase2.data.params[name]) == best  # the values it trained with
        assert retrain.data.tags[f"{name}_from"] == f"autotune:{tuned.info.run_id}"
    assert (config.parse_value("lr", retrain.data.params["lr"]) !=
            config.load("retrain").lr)  # not retrain.yaml's own (the draw is log-uniform over a range)
