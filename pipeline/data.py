"""SVHN and SVHN-format .mat files -> uint8 tensors: located (or downloaded), checked, decoded
once into a cached tensor file, split (a stratified validation split), and digested, so a run
records exactly which rows it used. batching.py turns them into training batches."""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torchvision
from torchvision.datasets import utils as tv_utils
from torchvision.datasets.utils import check_integrity

from . import synthetic
from .errors import DataError, first_line
from .files import atomic_write
from .config import PROJECT_DIR, Config

CACHE_DIR = PROJECT_DIR / ".svhn-cache"


class SVHNMat(torchvision.datasets.SVHN):
    """torchvision's SVHN reader, whose MD5 check can be switched off for other SVHN-format files."""

    def __init__(self, root, split, verify=True, filename=None, **kwargs):
        self.verify, self._override = verify, filename
        super().__init__(root, split=split, **kwargs)

    @property
    def filename(self) -> str:  # any file name, not only train_32x32.mat / test_32x32.mat
        return self._override or self._filename

    @filename.setter
    def filename(self, value: str) -> None:
        self._filename = value

    def _check_integrity(self) -> bool:
        path = os.path.join(self.root, self.filename)
        return super()._check_integrity() if self.verify else os.path.isfile(path)


# -- locating and checking the files ---------------------------------------------------------

def data_folder(cfg: Config) -> Path:
    """The folder holding train_32x32.mat and test_32x32.mat (made first for synthetic data)."""
    folder = cfg.resolved_data_dir()
    try:
        return _data_folder(cfg, folder)
    except OSError as err:  # Path.is_dir() and exists() hide only "no such file": EACCES, ENAMETOOLONG
        raise cannot_look(err, folder) from None


def cannot_look(err: OSError, folder: Path) -> DataError:
    if err.errno in (errno.EACCES, errno.EPERM):
        fix = "make it readable to this user, or pass -P data_dir=<a folder of yours>"
    elif err.errno == errno.ENAMETOOLONG:
        fix = "pass a shorter -P data_dir"
    else:
        fix = "check that disk, or pass -P data_dir=<another folder>"
    return DataError(f"cannot look in {err.filename or folder} ({err.strerror or type(err).__name__}): {fix}")


def _data_folder(cfg: Config, folder: Path) -> Path:
    if cfg.dataset == "synthetic":
        return synthetic.ensure(folder, cfg.synthetic_train, cfg.synthetic_test, cfg.data_seed)
    if cfg.download:
        for split in ("train", "test"):
            _download(folder, split, cfg.verify)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist: put SVHN's train_32x32.mat and "
                        f"test_32x32.mat there, or add -P download=true (needs network) or "
                        f"-P dataset=synthetic")
    return folder


def _download(folder: Path, split: str, verify: bool) -> None:
    """Fetch SVHN's `split` file unless it is there (and, with verify, official). It is fetched
    into a temp folder and its checksum checked there, then written into place atomically: a
    failed download leaves the data folder as it was (a kill, at most atomic_write's hidden temp
    file, which the next write there removes). With verify=false a file that is there is the
    user's own: never replaced."""
    url, name, md5 = SVHNMat.split_list[split]
    path = folder / name
    if path.is_file() and (not verify or check_integrity(str(path), md5)):
        return
    try:
        fetching = tempfile.TemporaryDirectory(prefix="svhn-download-")
    except OSError as err:
        raise DataError(cannot_fetch_into(err)) from None
    with fetching as fetched:
        try:
            tv_utils.download_url(url, fetched, name, md5)  # checks the md5 of what it fetched
        except Exception as err:  # noqa: BLE001 - URLError, http.client's errors, a bad checksum: one line
            if isinstance(err, OSError) and not isinstance(err, URLError) and err.errno in DISK_ERRORS:
                raise DataError(cannot_fetch_into(err)) from None
            reason = f"{type(err).__name__}: {first_line(err, None, 'no reason given')}"
            raise DataError(f"cannot download SVHN {split} split into {folder} ({reason}): are you "
                            f"offline? Copy the .mat files there by hand, or use -P dataset=synthetic") from None
        try:
            with open(Path(fetched) / name, "rb") as source, atomic_write(path) as target:
                shutil.copyfileobj(source, target, 1 << 20)
        except OSError as err:
            raise DataError(f"cannot write {path} ({err.strerror or type(err).__name__}): make {folder} writable, "
                            f"or pass -P data_dir=<a folder you can write>") from None


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def cannot_fetch_into(err: OSError) -> str:
    return (f"cannot write the download to {tempfile.gettempdir()} ({err.strerror or type(err).__name__}): free "
            f"some space there, or set TMPDIR to a folder you can write")


def mat_path(folder: Path, split: str) -> Path:
    path = folder / SVHNMat.split_list[split][1]
    try:
        there = path.is_file()
    except OSError as err:
        raise cannot_look(err, folder) from None
    if not there:
        raise DataError(f"missing {path}: put SVHN's {path.name} in {folder}, or add "
                        f"-P download=true (needs network) or -P dataset=synthetic")
    return path


def data_files(cfg: Config) -> dict[str, Path]:
    """The train and test .mat files `cfg` reads (made, or downloaded, first where it says so):
    a command checks them before it makes a run, so a missing file leaves no run behind."""
    folder = data_folder(cfg)
    return {split: mat_path(folder, split) for split in ("train", "test")}


def check_md5(path: Path, split: str) -> None:
    if not check_integrity(str(path), SVHNMat.split_list[split][2]):
        raise DataError(f"checksum mismatch for {path}: not the official SVHN file; download it "
                        f"again, or add -P verify=false to load another SVHN-format .mat")


# -- decode once -----------------------------------------------------------------------------

def _cache_file(path: Path) -> Path:
    """Keyed by the file's bytes (the digest that training_key holds), not its name or mtime."""
    return CACHE_DIR / f"{path.stem}-{file_sha256(path)[:16]}.pt"


def read_mat(path: Path, split: str, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,3,32,32) uint8, labels (N,) int64), decoded once and cached as a tensor file.

    The cache key is the file's SHA-256, so a changed .mat is decoded again, whatever its mtime.
    """
    cache = _cache_file(path)
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if (blob["verified"] or not verify) and not svhn_problem(blob["images"], blob["labels"]):
                return blob["images"], blob["labels"]
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    if verify:
        check_md5(path, split)
    images, labels = mat_arrays(path, labelled=True)
    problem = svhn_problem(images, labels, from_mat=True)
    if problem:
        raise DataError(f"cannot read {path}: {problem}; {SVHN_FORMAT}, replace the file")
    images = torch.from_numpy(np.ascontiguousarray(images))
    labels = torch.from_numpy(labels.astype(np.int64))
    try:
        with atomic_write(cache) as fh:
            torch.save({"images": images, "labels": labels, "verified": verify}, fh)
    except OSError as err:  # a cache only spares the next decode: a read-only project or a full disk is no error
        print(f"note: could not keep the decoded {path.name} in {CACHE_DIR} ({err.strerror or type(err).__name__}): "
              f"it is decoded again next time", flush=True)
    return images, labels


def not_svhn_mat(path: Path, err: Exception) -> DataError:
    return DataError(f"cannot read {path}: not a valid SVHN-format .mat ({type(err).__name__}: "
                     f"{first_line(err, None)}); replace the file")


def mat_has_labels(path: Path) -> bool:
    """Whether a .mat holds a y (predict also labels files that hold only X); True for a file that
    is not a .mat at all, which read_mat then describes."""
    import scipy.io

    try:
        return any(name == "y" for name, _, _ in scipy.io.whosmat(str(path)))
    except Exception:  # noqa: BLE001 - read_mat says what is wrong with it
        return True


def mat_arrays(path: Path, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """X as (N,3,32,32) and y as (N,) with 10 read as 0, as torchvision's SVHN reader turns them
    (tests/test_data.py compares the two), and also from a file of one image, whose trailing
    dimension of 1 MATLAB and Octave drop (X 32x32x3), which torchvision's reader refuses."""
    import scipy.io

    try:
        loaded = scipy.io.loadmat(str(path), variable_names=["X", "y"] if labelled else ["X"])
        x = loaded["X"]
        labels = np.atleast_1d(loaded["y"].astype(np.int64).squeeze()) if labelled else None
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line
        raise not_svhn_mat(path, err) from None
    if labels is not None:
        np.place(labels, labels == 10, 0)  # SVHN's label for digit 0
    if x.shape == (32, 32, 3):
        x = x[..., np.newaxis]
    return (np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x), labels


def read_unlabelled_mat(path: Path) -> torch.Tensor:
    """Images (N,3,32,32) uint8 of an SVHN-format .mat that holds X and no y, checked as read_mat
    checks them (not cached: predict reads such a file once)."""
    images, _ = mat_arrays(path, labelled=False)
    problem = svhn_problem(images, None, from_mat=True)
    if problem:
        raise DataError(f"cannot read {path}: {problem}; {SVHN_FORMAT}, replace the file")
    return torch.from_numpy(np.ascontiguousarray(images))


def file_sha256(path: Path) -> str:
    """SHA-256 of a data file's bytes: what the data digest and `training_key` rest on."""
    try:
        stat = path.stat()  # hashed once per process and file version (read_mat and load both ask)
        return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError as err:  # a file of another user's, mode 600
        raise DataError(f"cannot read {path} ({err.strerror or type(err).__name__}): make it readable "
                        f"to this user, or copy it to a folder of yours and pass -P data_dir=<that folder>") from None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(cfg: Config, file_digests: list[str] | None = None, rows: list[int | None] | None = None) -> str:
    """One digest for the data a run of `cfg` sees: both files' bytes and how they are cut. A
    limit that cuts nothing (at least the file's `rows`) is written as 0, so the same rows give
    the same digest however they were asked for."""
    if file_digests is None:
        paths = [mat_path(data_folder(cfg), split) for split in ("train", "test")]
        file_digests, rows = [file_sha256(path) for path in paths], [mat_rows(path) for path in paths]
    limits = [0 if n is not None and limit >= n else limit
              for limit, n in zip((cfg.limit_train, cfg.limit_test), rows or (None, None))]
    cut = f"{limits[0]}|{limits[1]}|{cfg.val_split!r}|{cfg.data_seed}"
    return hashlib.sha256("|".join([*file_digests, cut]).encode()).hexdigest()


def mat_rows(path: Path) -> int | None:
    """The images an SVHN-format .mat holds, from its header (nothing decoded); None when it
    cannot say (the digest then keeps the limit as given: a cache miss at worst)."""
    import scipy.io

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(str(path))}
    except Exception:  # noqa: BLE001 - read_mat says what is wrong with the file
        return None
    return int(shapes["X"][-1]) if len(shapes.get("X", ())) == 4 else None


@dataclass
class Split:
    """One role's data (train, val or test): uint8 images, labels, and where they come from."""
    role: str
    images: torch.Tensor            # (N,3,32,32) uint8
    labels: torch.Tensor            # (N,) int64
    source: Path                    # the .mat file
    file_sha256: str
    indices: torch.Tensor           # rows of the .mat file (the digest of a cut)
    file_rows: int                  # rows in the whole file

    @property
    def digest(self) -> str:
        """SHA-256 of exactly these images and labels; the whole file's when nothing is cut."""
        if len(self.indices) == self.file_rows and bool((self.indices == torch.arange(self.file_rows)).all()):
            return self.file_sha256
        digest = hashlib.sha256(self.file_sha256.encode())
        digest.update(self.indices.numpy().tobytes())
        return digest.hexdigest()


SVHN_FORMAT = "SVHN stores X as 32x32x3xN uint8 and y as N labels 1-10 (10 for digit 0)"


def svhn_problem(images, labels, from_mat: bool = False) -> str:
    """What is wrong with decoded (N,3,32,32) uint8 images and (N,) labels 0-9 (None: no labels to
    check), or ''.

    from_mat: numpy arrays as torchvision's SVHN reader leaves them (X transposed to N,C,H,W,
    label 10 already mapped to 0), described in the file's own terms.
    """
    shape, dtype = tuple(images.shape), str(images.dtype).replace("torch.", "")
    x_shape = "x".join(map(str, (*shape[2:], shape[1], shape[0]) if len(shape) == 4 else shape)) or "?"
    if len(shape) != 4 or shape[1:] != (3, 32, 32):
        return f"X has shape {x_shape}, not 32x32x3xN" if from_mat else f"images of shape {shape}"
    if dtype != "uint8":
        return f"X is {dtype}, not uint8"
    if shape[0] == 0:
        return "X holds no images" if from_mat else "no images"
    if labels is None:
        return ""
    labels_shape = tuple(labels.shape)
    if len(labels_shape) != 1 or labels_shape[0] != shape[0]:
        count = labels_shape[0] if len(labels_shape) == 1 else "x".join(map(str, labels_shape)) or 1
        return f"y holds {count} labels for {shape[0]} images in X"
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        return f"y holds labels outside 1-10 (found {int(labels.min())}..{int(labels.max())})"
    return ""


@dataclass
class SVHNData:
    folder: Path
    train: Split
    test: Split
    val: Split | None = None
    digest: str = ""                # data_digest(cfg): enters training_key

    @property
    def train_images(self) -> torch.Tensor:
        return self.train.images

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_images(self) -> torch.Tensor:
        return self.test.images

    @property
    def test_labels(self) -> torch.Tensor:
        return self.test.labels

    @property
    def n_train(self) -> int:
        return len(self.train.labels)

    @property
    def n_test(self) -> int:
        return len(self.test.labels)

    @property
    def n_val(self) -> int:
        return len(self.val.labels) if self.val is not None else 0

    def splits(self) -> list[Split]:
        return [s for s in (self.train, self.val, self.test) if s is not None]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) row indices: `fraction` of each label held out, drawn from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label in range(10):
        rows = torch.nonzero(labels == label).flatten()
        count = round(fraction * len(rows))
        held.append(rows[torch.randperm(len(rows), generator=generator)[:count]])
    held_out = torch.sort(torch.cat(held)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


def load(cfg: Config) -> SVHNData:
    files = data_files(cfg)
    folder = files["train"].parent
    verify = cfg.verify and cfg.dataset == "svhn"
    splits = {}
    for split, limit in (("train", cfg.limit_train), ("test", cfg.limit_test)):
        path = files[split]
        images, labels = read_mat(path, split, verify)
        rows = torch.arange(min(limit, len(labels)) if limit else len(labels))
        splits[split] = Split(split, images[rows], labels[rows], path, file_sha256(path), rows,
                              len(labels))
    train, val = splits["train"], None
    if cfg.val_split > 0:
        kept, held = stratified_split(train.labels, cfg.val_split, cfg.data_seed)
        if not len(held):  # selection on no images: val_acc 0 every epoch, a nan figure at registration
            raise DataError(f"val_split={cfg.val_split:g} holds out no image of the {len(train.labels)} training "
                            f"images (each digit's share rounds to 0): raise val_split or limit_train, or "
                            f"pass -P val_split=0 to select on the test split")
        val = Split("val", train.images[held], train.labels[held], train.source, train.file_sha256,
                    train.indices[held], train.file_rows)
        train = Split("train", train.images[kept], train.labels[kept], train.source, train.file_sha256,
                      train.indices[kept], train.file_rows)
    digest = data_digest(cfg, [splits["train"].file_sha256, splits["test"].file_sha256],
                         [splits["train"].file_rows, splits["test"].file_rows])
    return SVHNData(folder, train, splits["test"], val, digest)
