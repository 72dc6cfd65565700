"""Data: the synthetic set, the .mat reader and its errors, decode-once cache, and the two
augmentation pipelines agreeing in distribution."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline import batching, config, data, synthetic
from pipeline.data import DataError
from support.faults import disk_full_midway


def test_synthetic_is_deterministic_and_a_larger_set_extends_a_smaller_one():
    a, la = synthetic.generate("train", 12)
    b, lb = synthetic.generate("train", 20)
    assert np.array_equal(a, b[..., :12]) and np.array_equal(la, lb[:12])
    assert a.shape == (32, 32, 3, 12) and a.dtype == np.uint8
    assert set(np.unique(synthetic.generate("test", 200)[1])) == set(range(1, 11))  # 10 = digit 0


def test_the_same_synthetic_set_is_the_same_bytes_whenever_it_is_written(tmp_path, monkeypatch):
    """A file's SHA-256 is the data digest: the set made again (another folder, clone or day) must
    match, though scipy's .mat header says when it was written."""
    import scipy.io.matlab._mio5 as mio5

    first = synthetic.ensure(tmp_path / "a", 20, 10)
    monkeypatch.setattr(mio5.time, "asctime", lambda *when: "Thu Jan  1 00:00:00 2099")
    again = synthetic.ensure(tmp_path / "b", 20, 10)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert data.read_mat(again / "test_32x32.mat", "test", verify=False)[0].shape == (10, 3, 32, 32)


@pytest.fixture
def mat_folder(tmp_path):
    return synthetic.ensure(tmp_path, 64, 32)


def test_mat_files_read_through_torchvision_svhn_code(mat_folder):
    cfg = config.load("train", {"dataset": "svhn", "data_dir": str(mat_folder), "verify": "false",
                                "limit_train": "50"})
    loaded = data.load(cfg)
    assert loaded.train_images.shape == (50, 3, 32, 32) and loaded.train_images.dtype == torch.uint8
    assert loaded.n_test == 32 and loaded.n_train == 50
    X, y = synthetic.generate("train", 64)
    assert torch.equal(loaded.train_images, torch.from_numpy(X[..., :50]).permute(3, 2, 0, 1))
    assert loaded.train_labels.tolist() == [int(label) % 10 for label in y[:50, 0]]  # SVHN's 10 is digit 0
    assert 0 in loaded.train_labels.tolist()


def test_decode_once_cache_is_reused_and_invalidated_on_change(mat_folder):
    path = mat_folder / "train_32x32.mat"
    first = data.read_mat(path, "train", verify=False)
    cache = data._cache_file(path)
    assert cache.exists()
    assert torch.equal(data.read_mat(path, "train", verify=False)[0], first[0])
    synthetic.write_mat(path, *synthetic.generate("train", 10))
    assert data._cache_file(path) != cache and len(data.read_mat(path, "train", verify=False)[0]) == 10


def test_a_cache_that_cannot_be_written_is_a_note_and_the_data_is_read(mat_folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")  # where the cache folder would be: as a read-only project, mkdir fails
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "a_file" / ".svhn-cache")
    path = mat_folder / "train_32x32.mat"
    images, labels = data.read_mat(path, "train", verify=False)
    X, y = synthetic.generate("train", 64)
    assert torch.equal(images, torch.from_numpy(X).permute(3, 2, 0, 1)) and len(labels) == 64
    assert "note: could not keep the decoded train_32x32.mat in " in capsys.readouterr().out
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")  # a folder, on a disk that fills up mid-write
    monkeypatch.setattr(data, "atomic_write", disk_full_midway(data.atomic_write, keep=lambda blob: bytes(blob)[:100]))
    assert torch.equal(data.read_mat(path, "train", verify=False)[0], images)
    assert "(No space left on device): it is decoded again next time" in capsys.readouterr().out
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache, no temp beside it


@pytest.mark.parametrize("problem", ["folder", "file", "checksum", "corrupt"])
def test_bad_data_gets_one_line_naming_path_and_fix(tmp_path, mat_folder, problem):
    overrides = {"dataset": "svhn", "data_dir": str(mat_folder), "verify": "false"}
    if problem == "folder":
        overrides["data_dir"] = str(tmp_path / "nowhere")
    elif problem == "file":
        (mat_folder / "test_32x32.mat").unlink()
    elif problem == "checksum":
        overrides["verify"] = "true"
    else:
        (mat_folder / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage" * 10)
    with pytest.raises(DataError) as err:
        data.load(config.load("train", overrides))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    expected = {"folder": "does not exist", "file": "missing", "checksum": "checksum mismatch",
                "corrupt": "not a valid SVHN-format .mat"}[problem]
    assert expected in message and ("-P " in message or "replace" in message)


@pytest.fixture
def svhn_server(tmp_path, monkeypatch):
    """SVHN's two files served over HTTP on 127.0.0.1, torchvision's own download code fetching
    them: `serve(mode)` points SVHN's URLs at it and returns the files' bytes. Modes: "ok", "cut"
    (a chunked body that stops midway), "other" (bytes that are not the checksummed ones)."""
    import hashlib
    import http.server
    import threading

    files = {}
    for split, count in (("train", 30), ("test", 20)):
        path = tmp_path / "served" / f"{split}_32x32.mat"
        synthetic.write_mat(path, *synthetic.generate(split, count, 7))
        files[path.name] = path.read_bytes()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            requests.append(self.path)
            mode, name = self.path.strip("/").split("/")
            body = files[name] if mode != "other" else b"not the file" * 100
            self.send_response(200)
            if mode == "cut":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(body) + body[:len(body) // 2])  # then the connection drops
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    def serve(mode):
        base = f"http://127.0.0.1:{server.server_address[1]}/{mode}"
        monkeypatch.setattr(data.SVHNMat, "split_list", {
            split: [f"{base}/{split}_32x32.mat", f"{split}_32x32.mat",
                    hashlib.md5(files[f"{split}_32x32.mat"]).hexdigest()] for split in ("train", "test")})
        return files

    serve.requests = requests
    yield serve
    server.shutdown()


def test_a_download_lands_whole_or_not_at_all_and_never_replaces_the_users_own_file(tmp_path, svhn_server,
                                                                                     monkeypatch):
    folder = tmp_path / "svhn"

    def load(**params):
        return data.load(config.load("train", {"download": "true", "data_dir": str(folder),
                                              **{k: str(v) for k, v in params.items()}}))

    def contents():
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    # a connection that drops midway, then bytes whose checksum is not SVHN's: one line, nothing left
    for mode, said in (("cut", "IncompleteRead"), ("other", "File not found or corrupted")):
        svhn_server(mode)
        with pytest.raises(DataError) as err:
            load()
        assert f"cannot download SVHN train split into {folder} (" in str(err.value) and said in str(err.value)
        assert "\n" not in str(err.value) and contents() == {}
    files = svhn_server("ok")
    dataset = load()
    assert contents() == files and dataset.n_train == 30 and dataset.n_test == 20
    fetched = len(svhn_server.requests)
    load()  # there and official: nothing fetched again
    assert len(svhn_server.requests) == fetched
    # the user's own SVHN-format file (verify=false) stays, whatever the download would bring
    own = tmp_path / "own.mat"
    synthetic.write_mat(own, *synthetic.generate("train", 12, 99))
    (folder / "train_32x32.mat").write_bytes(own.read_bytes())
    assert load(verify="false").n_train == 12 and len(svhn_server.requests) == fetched
    # with verify=true a file that is not SVHN's is fetched again, but a failed fetch leaves it as it was
    svhn_server("cut")
    with pytest.raises(DataError, match="IncompleteRead"):
        load()
    assert contents() == {**files, "train_32x32.mat": own.read_bytes()}
    # a data folder under a file: fetched, then it cannot be written, which is not "offline"
    (tmp_path / "a-file").write_text("not a folder")
    svhn_server("ok")
    cfg = config.load("train", {"download": "true", "data_dir": str(tmp_path / "a-file" / "svhn")})
    with pytest.raises(DataError, match=r"^cannot write .*a-file/svhn/train_32x32.mat \(Not a directory\): make "):
        data.load(cfg)
    # nowhere to fetch it to (TMPDIR under a file): said so, not "offline"
    monkeypatch.setattr(data.tempfile, "tempdir", str(tmp_path / "a-file" / "tmp"))
    cfg = config.load("train", {"download": "true", "data_dir": str(folder / "fresh")})
    with pytest.raises(DataError, match=r"^cannot write the download to .*a-file/tmp \(Not a directory\): free "):
        data.load(cfg)


def test_a_data_file_this_user_cannot_read_is_one_line(mat_folder, tmp_path):
    """As root, the file is read under a bounding set without the capabilities that bypass modes."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "theirs"
    folder.mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (folder / name).write_bytes((mat_folder / name).read_bytes())
        (folder / name).chmod(0o200 if name.startswith("train") else 0o644)
    script = ("from pipeline import config, data\n"
              f"data.load(config.load('train', {{'data_dir': {str(folder)!r}, 'verify': 'false'}}))")
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DataError: cannot read" in done.stderr
    assert (f"cannot read {folder / 'train_32x32.mat'} (Permission denied): make it readable to this user"
            in done.stderr.strip().splitlines()[-1])
    folder.chmod(0o600)  # a folder this user cannot look in: is_file() raises, not "missing"
    try:
        script = ("from pipeline import config, data\n"
                  f"data.data_files(config.load('train', {{'data_dir': {str(folder)!r}}}))")
        done = subprocess.run([*command[:-1], script], capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        f"pipeline.errors.DataError: cannot look in {folder / 'train_32x32.mat'} (Permission denied): make it "
        f"readable to this user, or pass -P data_dir=<a folder of yours>")


def test_a_synthetic_set_that_cannot_be_written_and_a_home_of_no_user_are_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = config.load("train", {"dataset": "synthetic", "data_dir": str(tmp_path / "a-file" / "synthetic")})
    with pytest.raises(DataError) as err:
        data.load(cfg)
    assert str(err.value).startswith(f"cannot write the synthetic set to {tmp_path / 'a-file' / 'synthetic'}/")
    assert str(err.value).endswith("(Not a directory): pass -P data_dir=<a folder you can write>")
    cfg = config.load("train", {"data_dir": "~no-such-user-here/svhn"})
    with pytest.raises(config.ConfigError, match="^path ~no-such-user-here/svhn: ~no-such-user-here names no "
                                                 "home directory on this machine: give the path in full$"):
        data.load(cfg)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cfg = config.load("train", {"data_dir": str(tmp_path / "loop" / "svhn")})
    with pytest.raises(config.ConfigError, match="a symbolic link in it points back at itself"):
        data.load(cfg)


# -- the two pipelines agree --------------------------------------------------------------------

def coordinate_images(n):
    """Pixel (r, c) holds R = 7r, G = 7c: the output reveals where each pixel came from."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows * 7, cols * 7, np.full_like(rows, 128)]).astype(np.uint8)
    return torch.from_numpy(np.repeat(image[None], n, 0))


def crop_and_angle(out):
    """(top, left, angle in degrees) of each augmented coordinate image (B,3,28,28) in [0,1]."""
    values = torch.round(out * 255).numpy()
    i, j = np.meshgrid(np.arange(7, 21), np.arange(7, 21), indexing="ij")
    design = np.stack([i.ravel() - 13.5, j.ravel() - 13.5, np.ones(i.size)], 1)
    found = []
    for image in values:
        r_in = image[0, 7:21, 7:21].ravel() / 7
        (a, b, r0), *_ = np.linalg.lstsq(design, r_in, rcond=None)
        c_in = image[1, 7:21, 7:21].ravel() / 7
        (_, _, c0), *_ = np.linalg.lstsq(design, c_in, rcond=None)
        found.append((round(r0 - 13.5), round(c0 - 13.5), math.degrees(math.atan2(b, a))))
    return np.array(found)


def denormalise(x):
    return x * torch.tensor(batching.STD).view(1, 3, 1, 1) + torch.tensor(batching.MEAN).view(1, 3, 1, 1)


def test_tensor_and_torchvision_augmentations_match_in_distribution():
    n = 600
    images = coordinate_images(n)
    ours = crop_and_angle(batching.augment(images, torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    transform = batching.seed_transforms(train=True)
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    theirs = crop_and_angle(denormalise(torch.stack([transform(pil) for _ in range(n)])))
    for column in (0, 1):  # crop offsets: uniform over 0..4 in both
        for found in (ours, theirs):
            counts = np.bincount(found[:, column].astype(int), minlength=5)
            assert len(counts) == 5 and counts.min() > n / 5 * 0.6, counts
    for found in (ours, theirs):  # angles: uniform over [-30, 30]
        assert found[:, 2].min() >= -31 and found[:, 2].max() <= 31
        assert abs(found[:, 2].mean()) < 3 and abs(found[:, 2].std() - 60 / math.sqrt(12)) < 2.5
    assert abs(ours[:, 2].std() - theirs[:, 2].std()) < 2.5


def test_normalised_statistics_match_between_pipelines():
    X, y = synthetic.generate("train", 256)
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(X, (3, 2, 0, 1))))
    ours = batching.normalise(batching.augment(images, torch.Generator().manual_seed(1)))
    torch.manual_seed(1)
    transform = batching.seed_transforms(train=True)
    theirs = torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    assert ours.shape == theirs.shape == (256, 3, 28, 28)
    assert torch.allclose(ours.mean((0, 2, 3)), theirs.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(ours.std((0, 2, 3)), theirs.std((0, 2, 3)), atol=0.05)
    test_ours = batching.normalise(batching.center_crop(images))
    test_theirs = torch.stack([batching.seed_transforms(train=False)(Image.fromarray(img.permute(1, 2, 0).numpy()))
                               for img in images])
    assert torch.allclose(test_ours, test_theirs, atol=1e-5)  # the test transform is exact


def test_tensor_batches_cover_every_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    labels = torch.arange(10)
    batches = batching.TensorBatches(images, labels, 4, train=True, augment_images=False,
                                 device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    seen = torch.cat([y for _, y in batches])
    assert len(batches) == 3 and sorted(seen.tolist()) == list(range(10))


# -- the batched transforms, exactly ------------------------------------------------------------

def random_images(n, seed=1):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augment_is_torchvision_crop_then_rotate_with_the_drawn_params():
    images = random_images(64)
    out = batching.augment(images, torch.Generator().manual_seed(5))
    tops, lefts, angles = batching.sample_augment_params(64, torch.Generator().manual_seed(5))
    expected = torch.stack([
        TF.rotate(images[i, :, top:top + 28, left:left + 28], angle, InterpolationMode.NEAREST, fill=0)
        for i, (top, left, angle) in enumerate(zip(tops.tolist(), lefts.tolist(), angles.tolist()))])
    assert out.dtype == torch.float32 and torch.equal(out, expected.float() / 255)


def test_augment_params_span_randomcrop_28_and_rotation_30():
    tops, lefts, angles = batching.sample_augment_params(2000, torch.Generator().manual_seed(0))
    for offsets in (tops, lefts):
        assert sorted(offsets.unique().tolist()) == [0, 1, 2, 3, 4]
    assert -30 <= angles.min() < -29.5 and 29.5 < angles.max() <= 30
    assert len({tuple(t.tolist()) for t in (tops[:20], lefts[:20])}) == 2  # drawn independently


def test_normalise_and_center_crop_match_totensor_normalize_and_centercrop():
    images = random_images(4)
    expected = torch.stack([T.Normalize(batching.MEAN, batching.STD)(T.CenterCrop(28)(img.float() / 255))
                            for img in images])
    assert torch.allclose(batching.normalise(batching.center_crop(images)), expected, atol=1e-6)
    assert torch.allclose(batching.normalise(images.float() / 255), batching.normalise(images), atol=1e-6)
    assert batching.center_crop(images, 30).shape == (4, 3, 30, 30)
    assert torch.equal(batching.center_crop(images, 30), images[..., 1:31, 1:31])
    wide = torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8)  # one image, not square
    assert torch.equal(batching.center_crop(wide), T.CenterCrop(28)(wide)) and batching.center_crop(wide).shape == (3, 28, 28)


@pytest.mark.parametrize("train,augment_images", [(True, True), (True, False), (False, True)])
def test_tensor_batches_are_the_seed_transforms_in_shuffled_or_fixed_order(train, augment_images):
    images, labels = random_images(10), torch.arange(10)
    batches = batching.TensorBatches(images, labels, 4, train=train, augment_images=augment_images,
                                 device=torch.device("cpu"), generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    order = torch.randperm(10, generator=generator) if train else torch.arange(10)
    got = list(batches)
    assert [len(y) for _, y in got] == [4, 4, 2]
    for start, (x, y) in zip(range(0, 10, 4), got):
        index = order[start:start + 4]
        expected = batching.augment(images[index], generator) if train and augment_images \
            else batching.center_crop(images[index])
        assert torch.equal(y, labels[index]) and torch.equal(x, batching.normalise(expected))
    assert all(x.is_contiguous() for x, _ in got)  # NCHW unless asked
    channels_last = batching.TensorBatches(images, labels, 4, train=False, augment_images=False,
                                       device=torch.device("cpu"), channels_last=True)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in channels_last)


# -- the seed's pipeline from memory ------------------------------------------------------------

def seed_loader_batches(folder, part, bs, train, seed):
    """The torchvision pipeline as it read the .mat before: torchvision's SVHN reader over the
    file, the split's rows as a Subset, the seed's transforms, a DataLoader."""
    split = "test" if part.role == "test" else "train"
    reader = data.SVHNMat(str(folder), split, verify=False, filename=part.source.name,
                          transform=batching.seed_transforms(train))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reader, part.indices.tolist()),
                                         batch_size=bs, shuffle=train,
                                         generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the PIL transforms draw from torch's global generator
    return list(loader)


def test_the_torchvision_pipeline_gives_the_seed_readers_batches_without_the_mat_file(tmp_path):
    """A Ray worker gets the decoded split, not the file: with the .mat files gone, the
    torchvision pipeline serves the same batches (images, augmentation draws, order, labels) as
    torchvision's own SVHN reader over the file."""
    import shutil

    folder = synthetic.ensure(tmp_path / "mats", 90, 40)
    cfg = config.load("train", {"dataset": "svhn", "data_dir": str(folder), "verify": "false",
                                "val_split": "0.2", "data_pipeline": "torchvision"})
    loaded = data.load(cfg)  # what the driver puts in Ray's object store
    expected = {role: seed_loader_batches(folder, getattr(loaded, role), 16, role == "train", 3)
                for role in ("train", "val", "test")}
    shutil.rmtree(folder)
    for role, want in expected.items():
        batches = batching.batches(cfg, loaded, role, torch.device("cpu"), 16, torch.Generator().manual_seed(3))
        torch.manual_seed(3)
        got = list(batches)
        assert len(got) == len(want) == len(batches), role
        for (x, y), (x_want, y_want) in zip(got, want):
            assert torch.equal(y, y_want) and torch.equal(x, x_want), role


def test_a_validation_split_that_holds_out_no_image_is_one_line(tmp_path):
    """Each digit's share rounding to 0 would select on no images: val_acc 0 every epoch."""
    folder = synthetic.ensure(tmp_path / "mats", 90, 40)
    base = {"dataset": "svhn", "data_dir": str(folder), "verify": "false", "limit_train": "20"}
    with pytest.raises(DataError) as refused:
        data.load(config.load("train", dict(base, val_split="0.01")))
    assert str(refused.value) == ("val_split=0.01 holds out no image of the 20 training images (each digit's share "
                                  "rounds to 0): raise val_split or limit_train, or pass -P val_split=0 to select "
                                  "on the test split")
    held = data.load(config.load("train", dict(base, val_split="0.5")))
    assert held.n_val > 0 and held.n_val + len(held.train.labels) == 20


def test_a_mat_of_one_image_is_read_and_one_of_none_is_one_line(tmp_path):
    image = np.zeros((32, 32, 3, 1), dtype=np.uint8)
    image[..., 0] = 200
    synthetic.write_mat(tmp_path / "one" / "test_32x32.mat", image, np.array([[10]], dtype=np.uint8))
    images, labels = data.read_mat(tmp_path / "one" / "test_32x32.mat", "test", verify=False)
    assert images.shape == (1, 3, 32, 32) and int(images.max()) == 200 and labels.tolist() == [0]

    synthetic.write_mat(tmp_path / "none" / "test_32x32.mat", np.zeros((32, 32, 3, 0), dtype=np.uint8),
                        np.zeros((0, 1), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        data.read_mat(tmp_path / "none" / "test_32x32.mat", "test", verify=False)
    assert str(err.value) == (f"cannot read {tmp_path / 'none' / 'test_32x32.mat'}: X holds no images; "
                              f"{data.SVHN_FORMAT}, replace the file")


def test_a_mat_of_one_image_saved_without_its_last_dimension_is_read_labelled_or_not(tmp_path):
    """MATLAB and Octave drop a trailing dimension of 1: one image is stored as X 32x32x3."""
    import scipy.io

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "one.mat", {"X": image})
    assert torch.equal(data.read_unlabelled_mat(tmp_path / "one.mat"),
                       torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0))
    scipy.io.savemat(tmp_path / "flat.mat", {"X": image[..., 0]})
    with pytest.raises(DataError, match="X has shape 32x32, not 32x32x3xN"):
        data.read_unlabelled_mat(tmp_path / "flat.mat")
    scipy.io.savemat(tmp_path / "labelled.mat", {"X": image, "y": np.array([[10]], dtype=np.uint8)})  # digit 0
    images, labels = data.read_mat(tmp_path / "labelled.mat", "test", verify=False)
    assert torch.equal(images, torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)) and labels.tolist() == [0]


def test_the_same_rows_have_one_digest_however_the_limits_ask_for_them(tmp_path):
    """limit_train 0 (all), the file's 90 rows, or more than it holds: the same images, one digest,
    from the decoded data and from the files' headers alike (main's reuse check reads only those)."""
    folder = synthetic.ensure(tmp_path / "mats", 90, 40)
    base = {"dataset": "svhn", "data_dir": str(folder), "verify": "false", "val_split": "0.1"}
    digests = {}
    for limits in ((0, 0), (90, 40), (999, 0), (0, 41), (89, 0), (0, 39)):
        cfg = config.load("train", dict(base, limit_train=str(limits[0]), limit_test=str(limits[1])))
        loaded = data.load(cfg)
        assert data.data_digest(cfg) == loaded.digest, limits
        digests[limits] = (loaded.digest, len(loaded.train.labels) + loaded.n_val, loaded.n_test)
    assert {digests[k] for k in ((0, 0), (90, 40), (999, 0), (0, 41))} == {digests[(0, 0)]}
    assert digests[(0, 0)][1:] == (90, 40)
    assert digests[(89, 0)][0] != digests[(0, 0)][0] and digests[(0, 39)][0] != digests[(0, 0)][0]  # a cut
    assert data.mat_rows(folder / "train_32x32.mat") == 90 and data.mat_rows(tmp_path / "nothing.mat") is None
