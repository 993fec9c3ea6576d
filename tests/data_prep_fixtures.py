"""Test slides for data_prep: small synthetic slides and the broken files a real slide folder contains."""
import ctypes
import os
import shutil
import signal

import numpy as np
import tifffile

from xmag_jax.wsi import synthetic

SIZE_PX = 4096  # 1.024 mm side: 2 x 2 fields of 448 µm at 5x


def make_slides(out, n: int = 2, seed: int = 0) -> list[str]:
    """n synthetic slides (even: 40x SVS, odd: 20x TIFF) in `out`; returns their paths."""
    synthetic.write_dataset(str(out), n, SIZE_PX, seed)
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith((".svs", ".tif")))


def not_a_slide(path) -> str:
    with open(path, "w") as f:
        f.write("this is a scanner log, not an image\n")
    return str(path)


def truncated(source, path, keep: float = 0.3) -> str:
    """The first `keep` fraction of a valid slide's bytes (an interrupted copy)."""
    with open(source, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return str(path)


def without_mpp(path) -> str:
    """A tiled pyramidal TIFF OpenSlide opens but with no resolution tags."""
    image = np.full((1024, 1024, 3), 240, np.uint8)
    image[256:768, 256:768] = (200, 120, 170)
    with tifffile.TiffWriter(path) as tif:
        for ds in (1, 4):
            tif.write(image[::ds, ::ds], tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                      subfiletype=0 if ds == 1 else 1)
    return str(path)


def corrupt_tiles(source, path, every: int = 3) -> str:
    """A copy of `source` whose level-0 tile data is zeroed for every `every`-th tile (undecodable JPEG)."""
    shutil.copyfile(source, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))[::every]
    with open(path, "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\0" * count)
    return str(path)


def stripped_tiff(source_slide, path) -> str:
    """A non-tiled (stripped) TIFF with resolution in px/inch: OpenSlide refuses it, tiffslide reads it."""
    import openslide

    slide = openslide.OpenSlide(source_slide)
    mpp = float(slide.properties["openslide.mpp-x"])
    image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=64, resolution=(25400 / mpp, 25400 / mpp),
                     resolutionunit="INCH", metadata=None)
    return str(path)


def crash_on_bad(spec, *args):
    """Per-slide work that dies like a segfaulting decoder (a NULL read in C: SIGSEGV) on slide `bad`."""
    if spec.slide_id == "bad":
        ctypes.string_at(0)
    return echo(spec)


def killed_once(spec, config, work_dir, *args):
    """Per-slide work whose process is SIGKILLed (as by the OOM killer) the first time, then does the slide."""
    if not os.path.exists(os.path.join(work_dir, "killed")):
        open(os.path.join(work_dir, "killed"), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return echo(spec)


def echo(spec, *args):
    return {"slide_id": spec.slide_id, "status": "done", "pid": os.getpid()}
