"""Extract frozen backbone features to h5 files.

Inputs (one of):
  --images DIR             image files (searched recursively) -> one h5 with features, label (parent folder), path
  --csv FILE               columns path,label[,split,study,...] -> one h5 with features and every CSV column
  --hest-patches DIR       HEST patches/*.h5 (img, barcode, coords) or patch bags (img, coords)
                           -> one {sample_id}.h5 per file with features, barcode, coords
  --wsi DIR --coords DIR   slides + CLAM coords/*.h5 -> one CLAM feature file {slide_id}.h5 (features, coords)

Examples::

    python -m eval.extract_features --checkpoint teacher_checkpoint.pth --model mv_hybrid \\
        --hest-patches hest/patches --output feats/mv_hybrid
    python -m eval.extract_features --random-init --model vit_12 --csv classification/labels.csv \\
        --output feats/vit_random.h5 --model-kwargs '{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2}'
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dino.data.datasets.folder import IMG_EXTENSIONS
from eval.common import LOG, add_common_args, ensure_dir, parse_cli, parse_model_kwargs, save_features_h5, set_seed, write_report
from mambavision.card import BackboneCard
from mambavision.pretrained import checkpoint_card, checkpoint_normalization

EMBEDDINGS = ("default", "cls", "mean", "cls+mean")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Model and embedding
# ----------------------------------------------------------------------------------------------
def check_model_name(model_name: str) -> None:
    import mambavision

    if model_name not in mambavision.list_models():
        raise ValueError(f"unknown model '{model_name}' (registered: {', '.join(mambavision.list_models())})")


def build_model(model_name: str, checkpoint: Optional[str], random_init: bool, model_kwargs: Dict, seed: int = 0):
    """The backbone in eval mode: ``load_pretrained`` for a checkpoint, ``create_model`` for --random-init."""
    import mambavision

    check_model_name(model_name)
    if random_init == bool(checkpoint):
        raise ValueError("give exactly one of --checkpoint PATH and --random-init")
    if random_init:
        set_seed(seed)  # the random baseline is reproducible for a seed
        return mambavision.create_model(model_name, **model_kwargs).eval()
    return mambavision.load_pretrained(checkpoint, model_name, **model_kwargs).eval()  # refuses pickles, named


PROVENANCE_KEYS = ("model", "checkpoint_sha256", "random_init_seed", "model_kwargs", "embedding", "img_size", "mean",
                   "std", "dtype")


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resolve_card(model_name: str, checkpoint: Optional[str]) -> BackboneCard:
    """The backbone's card, with the preprocessing the checkpoint records (the trainer stores its card)."""
    import mambavision

    check_model_name(model_name)
    return checkpoint_card(checkpoint, model_name) if checkpoint else mambavision.get_card(model_name)


def resolve_normalization(checkpoint, mean, std, card: Optional[BackboneCard] = None):
    """The input normalisation: as given, else the one the checkpoint was trained with (the trainer records
    it in the card it stores), else the card's default, the paper's H&E statistics; logged, so a mismatch
    with pretraining is never silent."""
    card = card or BackboneCard  # the class holds the defaults
    recorded = checkpoint_normalization(checkpoint) if checkpoint else None
    source = "given" if mean is not None and std is not None else "checkpoint" if recorded else card.normalization_source
    mean = tuple(mean) if mean is not None else recorded[0] if recorded else card.mean
    std = tuple(std) if std is not None else recorded[1] if recorded else card.std
    if recorded and (mean, std) != recorded:
        LOG.warning("normalisation mean %s std %s differs from the one %s was trained with (mean %s std %s)",
                    list(mean), list(std), checkpoint, list(recorded[0]), list(recorded[1]))
    LOG.info("normalisation mean %s std %s (%s)", list(mean), list(std), source)
    return tuple(mean), tuple(std)


def provenance(model_name: str, checkpoint: Optional[str], random_init: bool, model_kwargs: Dict, embedding: str,
               img_size: int, mean, std, dtype: str, seed: int) -> Dict[str, str]:
    """What made a feature file, stored as its h5 attributes: the model, the checkpoint's digest (or the
    random-init seed) and the preprocessing. Values are strings so that a rerun compares them exactly."""
    return {"model": model_name, "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else "",
            "random_init_seed": str(seed) if random_init else "", "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
            "embedding": embedding, "img_size": str(img_size), "mean": json.dumps([float(v) for v in mean]),
            "std": json.dumps([float(v) for v in std]), "dtype": dtype}


def check_reusable(path: str, wanted: Dict[str, str]) -> None:
    """Refuse to keep an existing feature file made by another model, checkpoint or preprocessing."""
    try:
        with h5py.File(path, "r") as f:
            found = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()}
    except OSError as err:
        raise OSError(f"existing output {path} is unreadable ({err}); pass --overwrite to recompute it") from None
    if not wanted:
        return
    if "model" not in found:
        raise ValueError(f"existing output {path} records no model or checkpoint, so it cannot be reused safely; "
                         "pass --overwrite to recompute it or choose another --output")
    diff = [f"{k}: {found.get(k, '<none>')!r} in the file, {wanted[k]!r} now" for k in PROVENANCE_KEYS
            if found.get(k, "") != wanted[k]]
    if diff:
        raise ValueError(f"existing output {path} was extracted differently ({'; '.join(diff)}); pass --overwrite "
                         "to recompute it or choose another --output")


def embed(model: torch.nn.Module, x: torch.Tensor, embedding: str) -> torch.Tensor:
    """One embedding per image: the backbone's own pooling (``Backbone.pool``) of ``forward_features``;
    "default" is the eval pooling its card names (CLS for ViT, CLS + mean patch for MV_Hybrid)."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding '{embedding}' (choose from {EMBEDDINGS})")
    return model.pool(model.forward_features(x), None if embedding == "default" else embedding)


_PIL_RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize_uint8(img: np.ndarray, size: int, interpolation: str = BackboneCard.interpolation) -> np.ndarray:
    """(H,W,3) uint8 -> (size,size,3) uint8 with the card's resampling (no-op when already that size)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), _PIL_RESAMPLING[interpolation]))


class Extractor:
    """Runs a backbone on uint8 RGB batches: resize, scale to [0,1], normalise, embed; returns float32 numpy.
    The size, interpolation, mean and std default to the model's card."""

    def __init__(self, model, embedding="default", img_size=None, mean=None, std=None, device="cpu", dtype="fp32"):
        self.device = torch.device(device)
        if dtype != "fp32" and self.device.type != "cuda":
            raise ValueError(f"--dtype {dtype} needs a CUDA device; on {self.device.type} features are computed in fp32")
        card = model.card
        img_size = img_size or card.img_size
        patch = int(model.patch_size)
        if img_size % patch:
            raise ValueError(f"--img-size {img_size} is not a multiple of the model's patch size {patch}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding '{embedding}' (choose from {EMBEDDINGS})")
        self.model = model.to(self.device).eval()
        self.embedding, self.img_size, self.dtype = embedding, img_size, DTYPES[dtype]
        self.interpolation = card.interpolation
        self.provenance: Dict[str, str] = {}  # written into every output h5 (see provenance())
        self.mean = torch.tensor(card.mean if mean is None else mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(card.std if std is None else std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B,H,W,3) uint8 (any H,W) -> (B, D) float32 features."""
        if batch.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got {batch.dtype}")
        batch = np.stack([resize_uint8(im, self.img_size, self.interpolation) for im in batch])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        amp = (torch.autocast(device_type="cuda", dtype=self.dtype) if self.dtype != torch.float32
               else contextlib.nullcontext())
        with amp:
            feats = embed(self.model, x, self.embedding)
        return feats.float().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Image files (folder or CSV)
# ----------------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Decodes image files to uint8 RGB at ``img_size``; unreadable files give ``None`` (skipped and counted)."""

    def __init__(self, paths: Sequence[str], img_size: int, interpolation: str = BackboneCard.interpolation):
        self.paths, self.img_size, self.interpolation = list(paths), img_size, interpolation

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                arr = np.asarray(im.convert("RGB"))
            return i, resize_uint8(arr, self.img_size, self.interpolation), None
        except Exception as err:  # corrupt/truncated/missing file: report, do not abort a long run
            return i, None, f"{self.paths[i]}: {type(err).__name__}: {err}"


def _collate(items):
    ok = [(i, a) for i, a, _ in items if a is not None]
    bad = [(i, e) for i, _, e in items if e is not None]
    idx = [i for i, _ in ok]
    arr = np.stack([a for _, a in ok]) if ok else None
    return idx, arr, bad


def list_image_folder(root: str) -> pd.DataFrame:
    """Every image under ``root`` (sorted): columns path (relative to root) and label (parent folder name)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if p.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root}")
    rel = [os.path.relpath(p, root) for p in files]
    return pd.DataFrame({"path": rel, "label": [os.path.basename(os.path.dirname(r)) for r in rel]})


def read_label_csv(path: str) -> pd.DataFrame:
    """A CSV with at least a ``path`` column (``label`` and others optional), checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV not found: {path}")
    df = pd.read_csv(path)
    if "path" not in df.columns:
        raise ValueError(f"{path} has no 'path' column (columns: {list(df.columns)})")
    if df.empty:
        raise ValueError(f"{path} has no rows")
    return df


def extract_image_table(extractor: Extractor, table: pd.DataFrame, root: str, output: str, batch_size: int = 64,
                        num_workers: int = 0, progress: bool = True) -> Dict:
    """Features of every image in ``table`` (paths relative to ``root``) -> one h5 with every table column."""
    from tqdm import tqdm

    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in table["path"].astype(str)]
    loader = DataLoader(ImageFiles(paths, extractor.img_size, extractor.interpolation), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    feats, kept, skipped = [], [], []
    for idx, arr, bad in tqdm(loader, desc=os.path.basename(output), disable=not progress, unit="batch"):
        skipped += bad
        if arr is not None:
            feats.append(extractor(arr))
            kept += idx
    for _, err in skipped:
        LOG.warning("skipped unreadable image %s", err)
    if not kept:
        raise RuntimeError(f"no readable image among {len(paths)} (first error: {skipped[0][1] if skipped else '-'})")
    rows = table.iloc[kept]
    extra = {c: rows[c].to_numpy() for c in rows.columns}
    for c, v in extra.items():
        if v.dtype == object:
            extra[c] = v.astype(str)
    save_features_h5(output, np.concatenate(feats), attrs=extractor.provenance, **extra)
    return {"output": output, "n_images": len(paths), "n_extracted": len(kept), "n_skipped": len(skipped),
            "skipped": [e for _, e in skipped[:20]]}


# ----------------------------------------------------------------------------------------------
# Patch h5 files (HEST patches, patch bags)
# ----------------------------------------------------------------------------------------------
def _read_str(ds) -> np.ndarray:
    arr = ds[()]
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()])
    return arr.ravel().astype(str)


def extract_patch_file(extractor: Extractor, path: str, output: str, batch_size: int = 64, progress: bool = True) -> int:
    """One HEST patch file / patch bag (``img`` (N,H,W,3) uint8 plus ``barcode`` and/or ``coords``) -> one h5."""
    from tqdm import tqdm

    with h5py.File(path, "r") as f:
        if "img" not in f:
            raise KeyError(f"{path} has no 'img' dataset (found: {list(f.keys())})")
        imgs = f["img"]
        if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
            raise ValueError(f"{path}: 'img' must be (N, H, W, 3) uint8, got {imgs.shape} {imgs.dtype}")
        n = imgs.shape[0]
        extra = {}
        if "barcode" in f:
            extra["barcode"] = _read_str(f["barcode"])
        if "coords" in f:
            extra["coords"] = f["coords"][()]
        for k, v in extra.items():
            if len(v) != n:
                raise ValueError(f"{path}: '{k}' has {len(v)} rows but 'img' has {n}")
        feats = [extractor(imgs[s:s + batch_size]) for s in tqdm(range(0, n, batch_size), desc=os.path.basename(path),
                                                                  disable=not progress, unit="batch")]
    dim = feats[0].shape[1] if feats else 0
    save_features_h5(output, np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
                     attrs=extractor.provenance, **extra)
    return n


def extract_patch_dir(extractor: Extractor, in_dir: str, out_dir: str, batch_size: int = 64, overwrite: bool = False,
                      progress: bool = True) -> Dict:
    """Every ``*.h5`` of ``in_dir`` -> ``out_dir/{same name}``; existing outputs are kept (resume)."""
    files = sorted(glob.glob(os.path.join(in_dir, "*.h5")))
    if not os.path.isdir(in_dir) or not files:
        raise FileNotFoundError(f"no .h5 patch files in {in_dir}")
    ensure_dir(out_dir)
    stats = {"n_files": len(files), "n_done": 0, "n_resumed": 0, "n_failed": 0, "n_patches": 0, "failed": []}
    for path in files:
        out = os.path.join(out_dir, os.path.basename(path))
        if os.path.exists(out) and not overwrite:
            check_reusable(out, extractor.provenance)
            stats["n_resumed"] += 1
            continue
        try:
            stats["n_patches"] += extract_patch_file(extractor, path, out, batch_size, progress)
            stats["n_done"] += 1
        except (OSError, KeyError, ValueError) as err:  # a corrupt file must not stop the other samples
            LOG.error("skipped %s: %s", path, err)
            stats["n_failed"] += 1
            stats["failed"].append(f"{os.path.basename(path)}: {err}")
    return stats


# ----------------------------------------------------------------------------------------------
# Whole-slide images (CLAM coords)
# ----------------------------------------------------------------------------------------------
def _stack_images(items):
    return np.stack([im for im, _ in items])


def extract_wsi(extractor: Extractor, wsi_dir: str, coords_dir: str, out_dir: str, batch_size: int = 64,
                num_workers: int = 0, overwrite: bool = False, progress: bool = True) -> Dict:
    """CLAM-style ``{slide_id}.h5`` (features, coords) per slide, reading patches with ``WSICoordsDataset``."""
    from torch.utils.data import Subset
    from tqdm import tqdm

    try:
        from dino.data.datasets.wsi_coords import WSICoordsDataset
    except ImportError as err:
        raise ImportError(f"--wsi needs dino.data.datasets.wsi_coords.WSICoordsDataset and OpenSlide "
                          f"(pip install 'mvhybrid[wsi]'): {err}") from err
    size = extractor.img_size

    def to_uint8(img):
        return resize_uint8(np.asarray(img.convert("RGB")), size, extractor.interpolation)

    ds = WSICoordsDataset(wsi_dir, coords_dir, transform=to_uint8)
    ensure_dir(out_dir)
    stats = {"n_slides": len(ds.slide_paths), "n_done": 0, "n_resumed": 0, "n_failed": 0, "n_patches": 0, "failed": []}
    for s, slide_path in enumerate(ds.slide_paths):
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(slide_path))[0] + ".h5")
        if os.path.exists(out) and not overwrite:
            check_reusable(out, extractor.provenance)
            stats["n_resumed"] += 1
            continue
        idx = np.flatnonzero(ds.slide_index == s)
        try:
            loader = DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                collate_fn=_stack_images)
            feats = [extractor(b) for b in tqdm(loader, desc=os.path.basename(out), disable=not progress, unit="batch")]
            save_features_h5(out, np.concatenate(feats), attrs=extractor.provenance, coords=ds.coords[idx])
        except (OSError, RuntimeError, ValueError, KeyError) as err:  # one unreadable slide must not stop the others
            LOG.error("skipped slide %s: %s", slide_path, err)
            stats["n_failed"] += 1
            stats["failed"].append(f"{os.path.basename(slide_path)}: {type(err).__name__}: {err}")
            continue
        stats["n_done"] += 1
        stats["n_patches"] += len(idx)
    return stats


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="registered backbone name (mambavision.list_models())")
    m.add_argument("--checkpoint", help="any checkpoint mambavision.load_pretrained accepts")
    m.add_argument("--random-init", action="store_true", help="a randomly initialised backbone (baseline; seeded)")
    m.add_argument("--model-kwargs", default="{}", help="JSON overrides for create_model, e.g. '{\"depth\": 2}'")
    m.add_argument("--embedding", choices=EMBEDDINGS, default="default",
                   help="default: the model's eval forward (CLS for ViT, CLS+mean patch for MV_Hybrid)")
    i = p.add_argument_group("input (one of)")
    i.add_argument("--images", help="folder of image files (label = parent folder name)")
    i.add_argument("--csv", help="CSV with path,label[,...]; relative paths are resolved against the CSV's folder")
    i.add_argument("--hest-patches", help="folder of HEST patches/*.h5 or patch bags (img + barcode/coords)")
    i.add_argument("--wsi", help="folder of whole-slide images (with --coords)")
    i.add_argument("--coords", help="folder of CLAM coords/*.h5 (with --wsi)")
    p.add_argument("--output", required=True, help="output .h5 (--images/--csv) or folder (--hest-patches/--wsi)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist (default: skip them)")
    pre = p.add_argument_group("preprocessing and runtime")
    pre.add_argument("--img-size", type=int, default=None,
                     help="resize to this square size, a multiple of the patch size (default: the card's eval size, 224)")
    pre.add_argument("--mean", type=float, nargs=3, default=None,
                     help="normalisation mean (default: what the checkpoint was trained with, else the paper's H&E stats)")
    pre.add_argument("--std", type=float, nargs=3, default=None,
                     help="normalisation std (default: what the checkpoint was trained with, else the paper's H&E stats)")
    pre.add_argument("--batch-size", type=int, default=64)
    pre.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image files and WSIs")
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pre.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (CUDA only)")
    pre.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_common_args(p, default_out="eval_out/extract_features")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Extract features as configured on the command line; returns the summary also written to JSON."""
    args = parse_cli(build_parser(), argv)
    sources = [s for s in ("images", "csv", "hest_patches", "wsi") if getattr(args, s)]
    if len(sources) != 1:
        raise ValueError("give exactly one input: --images, --csv, --hest-patches or --wsi (with --coords)")
    if args.wsi and not args.coords:
        raise ValueError("--wsi needs --coords (a folder of CLAM coords/*.h5)")
    kwargs = parse_model_kwargs(args.model_kwargs)
    single_file = sources[0] in ("images", "csv")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    card = resolve_card(args.model, args.checkpoint)  # the checkpoint's card: preprocessing it was trained with
    args.img_size = args.img_size or card.img_size
    args.mean, args.std = resolve_normalization(args.checkpoint, args.mean, args.std, card)
    prov = provenance(args.model, args.checkpoint, args.random_init, kwargs, args.embedding, args.img_size, args.mean,
                      args.std, args.dtype, args.seed)
    if single_file and os.path.isdir(args.output):
        raise IsADirectoryError(f"--output {args.output} is a folder; --{sources[0]} writes one .h5 file")
    if not single_file and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output {args.output} exists and is a file; --{sources[0].replace('_', '-')} "
                                 "writes one .h5 per sample or slide into a folder")
    if single_file and os.path.exists(args.output) and not args.overwrite:
        check_reusable(args.output, prov)
        LOG.info("%s exists, made by the same model and preprocessing: nothing to do (pass --overwrite to recompute)",
                 args.output)
        return {"output": args.output, "resumed": True}
    model = build_model(args.model, args.checkpoint, args.random_init, kwargs, args.seed)
    ext = Extractor(model, args.embedding, args.img_size, args.mean, args.std, args.device, args.dtype)
    ext.provenance = prov
    progress = not args.no_progress
    if args.images:
        stats = extract_image_table(ext, list_image_folder(args.images), args.images, args.output, args.batch_size,
                                    args.num_workers, progress)
    elif args.csv:
        stats = extract_image_table(ext, read_label_csv(args.csv), os.path.dirname(os.path.abspath(args.csv)),
                                    args.output, args.batch_size, args.num_workers, progress)
    elif args.hest_patches:
        stats = extract_patch_dir(ext, args.hest_patches, args.output, args.batch_size, args.overwrite, progress)
    else:
        stats = extract_wsi(ext, args.wsi, args.coords, args.output, args.batch_size, args.num_workers, args.overwrite,
                            progress)
    if not single_file and stats["n_failed"] and not (stats["n_done"] or stats["n_resumed"]):
        raise RuntimeError(f"every input failed ({stats['n_failed']}); first: {stats['failed'][0]}")
    summary = {"model": args.model, "checkpoint": args.checkpoint, "checkpoint_sha256": prov["checkpoint_sha256"],
               "random_init": args.random_init,
               "model_kwargs": kwargs, "embedding": args.embedding, "feature_dim": int(getattr(model, "num_features", 0)),
               "img_size": args.img_size, "mean": list(args.mean), "std": list(args.std), "device": args.device,
               "dtype": args.dtype, "seed": args.seed, **stats}
    rows = [{k: v for k, v in stats.items() if isinstance(v, (int, float, str))}]
    warns = [f"failed: {e}" for e in stats.get("failed", [])]
    write_report(args.out_dir, "extract_features", summary, rows, title=f"Feature extraction ({args.model})",
                 warnings=warns)
    LOG.info("done: %s", rows[0])
    return summary


if __name__ == "__main__":
    main()
