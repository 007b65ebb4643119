"""Image features from the frozen image tower, encoded once and cached on disk.

:class:`FeatureCache` encodes a list of :class:`~hipro_fast.data.tasks_spec.ImageRecord`
with the model's own open_clip eval preprocessing, in batches with a progress
bar, L2-normalises the features and keeps them on the model's device (the GPU
when there is one). Each set is persisted as a safetensors file:

* its **file name** is derived from what the set *is*: the model (name +
  a content hash of the image tower's loaded weights), the preprocessing (``repr`` of the
  transform), a tag (task / split / few-shot draw), the augmentation settings
  and the labelled image list (every path and label). Two different image
  lists never share a file, so two specs with a task of the same name can
  share one cache folder without evicting each other; a list that gains or
  loses an image is a new set (the old file stays until the folder is
  cleaned: delete any of these files at any time, they are rebuilt);
* its **key** (stored in the metadata) adds every image file's size,
  modification time and status-change time (``st_size``, ``st_mtime_ns``,
  ``st_ctime_ns``). A file whose key differs is *stale* and is rebuilt, with a
  warning naming how many images changed and the first one. The bytes are not
  hashed (that would read every image on every run); the ctime catches an
  edit that restores the size and mtime (``cp -p``, ``rsync -t``,
  ``os.utime``), since no user can set it;
* the metadata also stores a SHA-256 of the tensor bytes; a file that does not
  parse or whose checksum differs is *corrupt* and is rebuilt. Neither is ever
  used silently: a warning names the file and the reason;
* ``skip_bad_images`` is not part of the key: a file that skipped nothing
  serves both settings, and a file that skipped images, loaded without the
  option, raises BadImageError naming the first of them, as encoding would.

Writes go to a temporary file in the same folder and are moved in place with
``os.replace``, so an interrupted run (Ctrl-C) leaves the previous cache as it
was. A writer killed outright (SIGKILL, the out-of-memory killer, a power
cut) leaves its temporary file behind; opening the folder removes those whose
writer is gone (hipro_fast.files.remove_orphaned_temp_files).

Under torchrun (a process group of more than one rank,
hipro_fast.distributed.group) rank 0 decides hit or rebuild for every set;
a rebuild splits the images into whole batches, each rank encodes a
contiguous run of them, the parts are all-gathered in rank order, and rank 0
writes the file: the same keys and tensors as one process would write (every
batch is the one a single process would encode).

Augmented views: with ``views=K`` every image is also encoded K times through
CoOp's training augmentation (random resized crop, scale 0.08-1, + horizontal
flip, then the model's normalisation), seeded per (seed, image, view) with
the image's pixels standing for the image (view_seed: not its path), giving
``[N, K, D]`` (``EncodedSet.views``; ``features`` stay the plain eval-transform
features). :func:`sample_views` picks one view per image for an epoch, for a
loop that trains epoch by epoch. ``hipro_fast.method.training.fit`` takes plain
``[N, D]`` features and owns the epoch loop, so the CLI (``--aug-views K``)
uses the simplest correct option: :func:`stack_views` makes every view its own
training sample (``[N*K, D]``, labels repeated). fit's epoch then walks a
random permutation of all N*K views (K times the steps of a plain epoch), so
every step sees random augmentations of random images, as CoOp's on-the-fly
augmentation does, drawn from a fixed bank of K views per image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..distributed import group as dist_group
from ..engine.fingerprint import image_side_digest, tensors_digest
from ..errors import CacheWriteError, DistributedError, InvalidInputError, MissingFileError, SpecError
from ..files import atomic_write_bytes, remove_orphaned_temp_files
from .tasks_spec import BadImageError, ImageRecord, read_image

__all__ = [
    "FORMAT", "CacheWarning", "EncodedSet", "FeatureCache", "model_fingerprint", "preprocess_repr",
    "train_augmentation", "sample_views", "stack_views", "default_cache_dir",
]

FORMAT = "hipro-features-v2"  # v2: the key adds each image's ctime


class CacheWarning(UserWarning):
    """A cache file was stale or corrupt and is being rebuilt."""


def default_cache_dir() -> Path:
    """$HIPRO_CACHE_DIR, else $XDG_CACHE_HOME/hipro_fast, else ~/.cache/hipro_fast."""
    if os.environ.get("HIPRO_CACHE_DIR"):
        return Path(os.environ["HIPRO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hipro_fast"


# ------------------------------------------------------------------ identities
def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def model_fingerprint(clip) -> dict[str, Any]:
    """What identifies the image tower: its name and a content hash of its loaded
    weights (once per FeatureCache; about a second for ViT-B/16). Not the weights
    file's size and mtime: a same-size file copied in with its old mtime
    (cp -p, rsync -t, tar -x) would serve the old weights' features."""
    name = getattr(clip, "name", type(clip).__name__)
    model = getattr(clip, "model", clip)
    # hashed anew (a write through .data must not serve old features), and cached for image_tower_info;
    # not the file's path: a moved file still hits
    return {"name": name, "visual_sha256": image_side_digest(model, refresh=True)}


def preprocess_repr(preprocess) -> str:
    return " ".join(repr(preprocess).split())


def _image_stats(records: Sequence[ImageRecord]) -> list[list[Any]]:
    out = []
    for r in records:
        try:
            st = os.stat(r.path)
            out.append([r.path, r.label, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        except FileNotFoundError:
            raise MissingFileError(f"image not found: {r.path}") from None
    return out


# ------------------------------------------------------------------ augmentation
def _find_normalize(preprocess):
    from torchvision import transforms as T

    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    return None


def _image_size(preprocess, clip=None) -> int:
    if clip is not None:
        model = getattr(clip, "model", clip)
        size = getattr(getattr(model, "visual", None), "image_size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    from torchvision import transforms as T

    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, (T.CenterCrop, T.Resize)):
            s = t.size
            return int(s[0] if isinstance(s, (tuple, list)) else s)
    raise InvalidInputError("cannot tell the image size from the preprocessing; pass image_size")


def train_augmentation(preprocess, image_size: int | None = None, clip=None) -> Callable:
    """CoOp's training transform: random resized crop (scale 0.08-1, bicubic) + flip,
    then ToTensor and the model's own normalisation."""
    from torchvision import transforms as T

    size = image_size or _image_size(preprocess, clip)
    steps = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip(), T.ToTensor()]
    norm = _find_normalize(preprocess)
    if norm is not None:
        steps.append(T.Normalize(norm.mean, norm.std))
    return T.Compose(steps)


def sample_views(features: torch.Tensor, epoch: int, seed: int = 0) -> torch.Tensor:
    """One view per image for `epoch`: [N, K, D] -> [N, D] (a [N, D] input is returned as is).

    Deterministic in (seed, epoch); different epochs draw different views.
    """
    if features.dim() == 2:
        return features
    if features.dim() != 3:
        raise InvalidInputError(f"features must be [N, K, D] or [N, D], got {tuple(features.shape)}")
    n, k, _ = features.shape
    g = torch.Generator().manual_seed(zlib.crc32(f"views/{seed}/{epoch}".encode()))
    idx = torch.randint(k, (n,), generator=g).to(features.device)
    return features[torch.arange(n, device=features.device), idx]


def stack_views(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, D], [N] -> [N*K, D], [N*K]: every view as its own training sample."""
    if features.dim() == 2:
        return features, labels
    n, k, d = features.shape
    return features.reshape(n * k, d), labels.repeat_interleave(k)


# ------------------------------------------------------------------ dataset
VIEWS_SEEDED_BY = "pixels"  # in a views cache's identity: views seeded by path (before session 11) are not reused


def pixel_digest(img) -> bytes:
    """sha256 of a decoded (PIL) image's mode, size and pixels: what stands for the
    image in view_seed (computed once per image: hashing a photo costs more than a view)."""
    return hashlib.sha256(f"{img.mode}/{img.size}/".encode() + img.tobytes()).digest()


def view_seed(pixels: bytes, seed: int, view: int) -> int:
    """The 64-bit seed of augmented view `view` of the image whose pixel_digest is
    `pixels`: from its pixels, not its path, so a moved or copied dataset, or one
    reached through another path, trains on the same views."""
    return int.from_bytes(hashlib.sha256(f"aug/{int(seed)}/{int(view)}/".encode() + pixels).digest()[:8], "little")


class _Images(torch.utils.data.Dataset):
    def __init__(self, records, transform, aug=None, views: int = 0, seed: int = 0):
        self.records, self.transform, self.aug, self.views, self.seed = records, transform, aug, views, seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path = self.records[i].path
        try:
            img = read_image(path)
        except BadImageError as e:
            return i, None, None, str(e)
        x = self.transform(img)
        v = None
        if self.views:
            vs = []
            pixels = pixel_digest(img)
            with torch.random.fork_rng(devices=[]):
                for k in range(self.views):
                    torch.manual_seed(view_seed(pixels, self.seed, k))
                    vs.append(self.aug(img))
            v = torch.stack(vs)
        return i, x, v, None


def _collate(batch):
    return batch


# ------------------------------------------------------------------ the cache
@dataclass
class EncodedSet:
    """Features of one image list. `features` is [N, D] (or [N, K, D] views in
    `views`), rows L2-normalised, on the cache's device; `labels` [N] int64."""

    features: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    views: torch.Tensor | None = None
    skipped: list[str] = field(default_factory=list)
    status: str = "built"  # hit | built | stale | corrupt | uncached
    file: Path | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


class FeatureCache:
    """Encodes image lists with a frozen CLIP image tower and caches the features.

    Args:
        clip: a LoadedClip (model, preprocess, name, pretrained).
        cache_dir: folder of the safetensors files; None disables the disk cache.
        device: where features live (default: the model's device).
        batch_size, num_workers: data loading (workers default to 0 on CPU and
            min(8, cpu count) with CUDA).
        skip_bad_images: skip undecodable images (counted in EncodedSet.skipped)
            instead of raising BadImageError naming the file.
        progress: tqdm bars while encoding.
    """

    def __init__(self, clip, cache_dir: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int = 128, num_workers: int | None = None, skip_bad_images: bool = False,
                 progress: bool = True):
        self.clip = clip
        self.model = clip.model
        self.preprocess = clip.preprocess
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:  # what writers killed mid-write left (never a live writer's file)
            remove_orphaned_temp_files(self.cache_dir, ".safetensors")
        self.batch_size = batch_size
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        self.num_workers = num_workers
        self.skip_bad_images = skip_bad_images
        self.progress = progress
        self._fingerprint: dict | None = None
        self.log: list[str] = []  # one line per set: what happened

    # ---------------------------------------------------------------- keys
    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.clip)
        return self._fingerprint

    def identity(self, tag: str, views: int, seed: int) -> dict:
        return {"format": FORMAT, "model": self.fingerprint, "preprocess": preprocess_repr(self.preprocess),
                "tag": tag, "views": int(views), "aug_seed": int(seed) if views else None,
                "augmentation": preprocess_repr(train_augmentation(self.preprocess, clip=self.clip)) if views else None,
                **({"views_seeded_by": VIEWS_SEEDED_BY} if views else {})}

    def file_for(self, tag: str, views: int = 0, seed: int = 0,
                 records: Sequence[ImageRecord] | None = None) -> Path:
        """The cache file of `records` under `tag`: named by the identity (model,
        preprocessing, tag, augmentation) and the labelled image list, so that
        different image lists never share (and evict) a file."""
        if self.cache_dir is None:
            raise InvalidInputError("this FeatureCache has no cache_dir")
        body: dict[str, Any] = {"identity": self.identity(tag, views, seed)}
        if records is not None:
            body["images"] = [[r.path, int(r.label)] for r in records]
        ident = _sha(json.dumps(body, sort_keys=True))[:20]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        safe = safe.encode("utf-8")[:80].decode("utf-8", "ignore")  # 80 bytes: the name stays under 255
        return self.cache_dir / f"{safe}-{ident}.safetensors"

    def key(self, tag: str, records: Sequence[ImageRecord], views: int, seed: int,
            stats: list[list[Any]] | None = None) -> str:
        """Hash of the identity and every image's (path, label, size, mtime_ns, ctime_ns)
        (`stats`, from _image_stats, or read now). Not skip_bad_images: a file
        written with nothing skipped serves both settings, and one that skipped
        images refuses the strict setting when it is loaded (as encoding would)."""
        body = {"identity": self.identity(tag, views, seed),
                "images": stats if stats is not None else _image_stats(records)}
        return _sha(json.dumps(body, sort_keys=True))

    # ---------------------------------------------------------------- public
    def encode(self, records: Sequence[ImageRecord], tag: str = "images", views: int = 0,
               seed: int = 0) -> EncodedSet:
        """Features of `records` (from the cache when its key matches)."""
        records = list(records)
        if not records:
            raise SpecError(f"{tag}: no images to encode")
        if self.cache_dir is None:
            sharded = dist_group.current() is not None
            out = self._encode_sharded(records, tag, views, seed) if sharded else self._encode(records, tag, views, seed)
            out.status = "uncached"
            return out
        stats = _image_stats(records)  # once: the key and the saved stats describe the same files
        key = self.key(tag, records, views, seed, stats)
        path = self.file_for(tag, views, seed, records)
        status = "built"
        sharded = dist_group.current() is not None
        if sharded:
            # Rank 0 decides hit / rebuild for everyone (a file read twice could change in between).
            verdict = dist_group.broadcast_object(
                self._load(path, key, records)[1] if dist_group.is_main() and path.exists() else None)
            if verdict == "":
                # A rank that cannot read rank 0's file (a node with its own cache folder) gets rank 0's copy.
                loaded = self._load(path, key, records)[0] if path.exists() else None
                have = dist_group.all_gather_object(loaded is not None)
                if not all(have):
                    theirs = dist_group.broadcast_object(loaded if dist_group.is_main() else None)
                    if loaded is None:
                        loaded = dataclasses.replace(theirs, features=theirs.features.to(self.device),
                                                     labels=theirs.labels.to(self.device),
                                                     views=None if theirs.views is None else
                                                     theirs.views.to(self.device))
                return self._hit(loaded, tag)
            if verdict is not None:
                status = "stale" if verdict.startswith("stale") else "corrupt"
                if dist_group.is_main():
                    warnings.warn(f"{status} feature cache {path}: {verdict}; rebuilding", CacheWarning,
                                  stacklevel=2)
        elif path.exists():
            loaded, reason = self._load(path, key, records)
            if loaded is not None:
                return self._hit(loaded, tag)
            status = "stale" if reason.startswith("stale") else "corrupt"
            warnings.warn(f"{status} feature cache {path}: {reason}; rebuilding", CacheWarning, stacklevel=2)
        out = self._encode_sharded(records, tag, views, seed) if sharded else self._encode(records, tag, views, seed)
        if sharded:
            # Written once, atomically, by rank 0; a failed write stops the others with its reason.
            dist_group.main_first(lambda: self._save(path, key, out, records, stats),
                                  f" writing the feature cache {path}", describe=lambda e: f"{type(e).__name__}: {e}")
        else:
            self._save(path, key, out, records, stats)
        out.status, out.file = status, path
        self.log.append(f"{tag}: {status} -> encoded {len(out)} images into {path.name}")
        return out

    # ---------------------------------------------------------------- encode
    def _encode_sharded(self, records, tag, views, seed) -> EncodedSet:
        """Each rank encodes a contiguous run of whole batches (so every batch, and
        hence every feature, is computed as in one process); the parts are
        all-gathered in rank order into the one-process result on every rank."""
        n_batches = -(-len(records) // self.batch_size)
        rank, world = dist_group.rank(), dist_group.world_size()
        base, extra = divmod(n_batches, world)
        first = rank * base + min(rank, extra)
        mine = range(first * self.batch_size,
                     min(len(records), (first + base + (1 if rank < extra else 0)) * self.batch_size))
        failure: Exception | None = None
        try:
            part = self._encode_rows(records, mine, tag, views, seed, progress=self.progress and rank == 0)
            cpu: tuple = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in part)
        except Exception as e:  # noqa: BLE001 - re-raised here, reported on the other ranks below
            # Its message goes to every rank (the exception itself may not pickle),
            # so that all of them stop here instead of waiting on this one.
            failure, cpu = e, ("error", str(e))
        parts = dist_group.all_gather_object(cpu)
        if failure is not None:
            raise failure
        for r, p in enumerate(parts):
            if isinstance(p[0], str):
                raise DistributedError(f"rank {r} failed to encode its share of {tag}: {p[1]}")
        feats = [p[0] for p in parts if p[0] is not None]
        vfeats = [p[1] for p in parts if p[1] is not None]
        kept = [i for p in parts for i in p[2]]
        skipped = [s for p in parts for s in p[3]]
        if not kept:
            raise SpecError(f"{tag}: none of the {len(records)} images could be decoded")
        labels = torch.tensor([records[i].label for i in kept], dtype=torch.long, device=self.device)
        return EncodedSet(torch.cat(feats).to(self.device), labels, [records[i].path for i in kept],
                          torch.cat(vfeats).to(self.device) if views else None, skipped)

    def _encode(self, records, tag, views, seed) -> EncodedSet:
        feats, vfeats, kept, skipped = self._encode_rows(records, range(len(records)), tag, views, seed,
                                                         self.progress)
        if not kept:
            raise SpecError(f"{tag}: none of the {len(records)} images could be decoded")
        labels = torch.tensor([records[i].label for i in kept], dtype=torch.long, device=self.device)
        return EncodedSet(feats, labels, [records[i].path for i in kept], vfeats, skipped)

    @torch.no_grad()
    def _encode_rows(self, records, rows: range, tag, views, seed, progress: bool):
        """(features [n, D] or None, views [n, K, D] or None, kept indices into
        `records`, skipped paths) of records[rows], in batches of batch_size."""
        from tqdm.auto import tqdm

        aug = train_augmentation(self.preprocess, clip=self.clip) if views else None
        ds = torch.utils.data.Subset(_Images(records, self.preprocess, aug, views, seed), rows)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda")
        first = next(self.model.parameters())
        model_device, model_dtype = first.device, first.dtype  # a half / bf16 tower takes its own dtype
        feats, vfeats, kept, skipped = [], [], [], []
        bar = tqdm(total=len(ds), desc=f"encode {tag}", unit="img", disable=not progress, leave=False)
        try:
            for batch in loader:
                good = []
                for i, x, v, err in batch:
                    if err is not None:
                        if not self.skip_bad_images:
                            raise _bad(records[i].path, err)
                        skipped.append(records[i].path)
                    else:
                        good.append((i, x, v))
                bar.update(len(batch))
                if not good:
                    continue
                x = torch.stack([g[1] for g in good]).to(model_device, model_dtype, non_blocking=True)
                feats.append(F.normalize(self.model.encode_image(x).float(), dim=-1).to(self.device))
                if views:
                    v = torch.stack([g[2] for g in good])  # [B, K, 3, H, W]
                    b, k = v.shape[:2]
                    f = self.model.encode_image(v.flatten(0, 1).to(model_device, model_dtype, non_blocking=True)).float()
                    vfeats.append(F.normalize(f, dim=-1).reshape(b, k, -1).to(self.device))
                kept.extend(g[0] for g in good)
        finally:
            bar.close()
        return (torch.cat(feats) if feats else None, torch.cat(vfeats) if vfeats else None, kept, skipped)

    # ---------------------------------------------------------------- disk
    def _save(self, path: Path, key: str, enc: EncodedSet, records, stats: list[list[Any]]) -> None:
        from safetensors.torch import save

        index = {r.path: i for i, r in enumerate(records)}
        tensors = {"features": enc.features.detach().cpu().contiguous(),
                   "labels": enc.labels.detach().cpu().contiguous(),
                   "kept": torch.tensor([index[p] for p in enc.paths], dtype=torch.long),
                   # [N, 3] (size, mtime_ns, ctime_ns) of every image: lets a stale file say which image changed
                   "stats": torch.tensor([s[2:] for s in stats], dtype=torch.long)}
        if enc.views is not None:
            tensors["views"] = enc.views.detach().cpu().contiguous()
        meta = {"format": FORMAT, "key": key, "checksum": tensors_digest(tensors),
                "n_images": str(len(records)), "skipped": json.dumps(enc.skipped),
                "skip_bad_images": json.dumps(bool(self.skip_bad_images))}
        try:
            atomic_write_bytes(path, save(tensors, metadata=meta))
        except OSError as e:  # the features are lost with it: at least say which file, and why
            raise CacheWriteError(e.errno, f"cannot write the feature cache {path}: {e.strerror or e} (free "
                                           f"space there, or pass another --cache-dir)") from None

    def _load(self, path: Path, key: str, records) -> tuple[EncodedSet | None, str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    return None, f"unknown format {meta.get('format')!r}"
                if meta.get("key") != key:
                    stats = f.get_tensor("stats").tolist() if "stats" in f.keys() else None
                    return None, "stale: " + self._why_stale(meta, stats, records)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types on a damaged file
            return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if meta.get("checksum") != tensors_digest(tensors):
            return None, "checksum mismatch"
        need = {"features", "labels", "kept"}
        if not need <= set(tensors):
            return None, f"missing tensors {sorted(need - set(tensors))}"
        kept = tensors["kept"].tolist()
        try:  # the metadata is outside the checksum: a damaged one is corrupt, like damaged tensors
            n_images = int(meta.get("n_images", -1))
            skipped = json.loads(meta.get("skipped", "[]"))
        except ValueError as e:
            return None, f"unreadable metadata ({type(e).__name__}: {e})"
        if not isinstance(skipped, list) or not all(isinstance(s, str) for s in skipped):
            return None, "unreadable metadata (skipped is not a list of paths)"
        if (len(kept) != tensors["features"].shape[0] or len(kept) != tensors["labels"].shape[0]
                or n_images != len(records) or any(i < 0 or i >= len(records) for i in kept)):
            return None, "inconsistent shapes"
        views = tensors.get("views")
        return EncodedSet(tensors["features"].to(self.device), tensors["labels"].to(self.device),
                          [records[i].path for i in kept],
                          views.to(self.device) if views is not None else None,
                          skipped, "hit", path), ""

    def _hit(self, loaded: EncodedSet, tag: str) -> EncodedSet:
        """A loaded file, unless it skipped images and this cache is strict: then
        what encoding them would say (every rank of a job decides alike, from the
        same file)."""
        if loaded.skipped and not self.skip_bad_images:
            raise BadImageError(loaded.skipped[0], f"it could not be decoded when the cache file {loaded.file} "
                                                   "was written with skip_bad_images (--skip-bad-images): fix or "
                                                   "remove the image, pass that option again, or delete the "
                                                   "cache file to decode every image anew")
        self.log.append(f"{tag}: cache hit {loaded.file.name}")
        return loaded

    def _why_stale(self, meta: dict, stats: list | None, records) -> str:
        """What changed since a file of the same name (same model, preprocessing,
        tag and labelled image list) was written: image sizes/mtimes."""
        if stats is None or len(stats) != len(records):
            return "written by another version of hipro_fast"
        now = [s[2:] for s in _image_stats(records)]
        changed = [r.path for r, old, new in zip(records, stats, now) if list(old) != list(new)]
        if changed:
            return (f"{len(changed)} of {len(records)} images changed (size or modification time) since "
                    f"they were cached, first {changed[0]}")
        return "its key differs (written by another version of hipro_fast)"


def _bad(path: str, err: str) -> BadImageError:
    prefix = f"cannot decode image {path}: "
    return BadImageError(path, err[len(prefix):] if err.startswith(prefix) else err)
