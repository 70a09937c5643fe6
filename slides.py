"""Slides: images too large to read whole (whole-slide scans, pyramidal TIFFs, a JPEG beyond PIL's limit), read
region by region in bounded memory for detect.py.

    $ pip install -r requirements-slides.txt              # tifffile, imagecodecs, openslide-python, openslide-bin
    $ python detect.py slide.svs                          # the pyramid level whose red cells match the model's
    $ python detect.py scan.ome.tif --rbc-width 40        # red cells ~40 px wide at full resolution
    $ python detect.py huge.jpg --max-pixels 400000000    # a plain image beyond PIL's limit, read whole

Which files (plan): .svs, .ndpi and .mrxs through OpenSlide; a .tif or .tiff through tifffile when it is a pyramid
or larger than PIL reads (a plain TIFF goes through PIL as before, and does without tifffile); a JPEG or PNG beyond
PIL's limit only with --max-pixels, which reads it whole and then windows it like a slide.

The level (choose_level): the model learned red cells tiling.RBC_WIDTH px wide; a slide's red cells are --rbc-width
px wide at full resolution (level 0), or RBC_MICRONS / its microns per pixel where it records them, else taken to
be BCCD's. Of the pyramid's levels, the coarsest where red cells are still at least about as wide as the model's is
cut into windows at its scale (tiling.tiling); the windows are read one at a time, only the regions they cover
(window_inputs), go through the model as the model goes (tiling.in_batches), and only their boxes are kept; merged
(tiling.merge_windows), the boxes are scaled to pixels of level 0. Peak memory: the model, the tiles decoded last
(CACHE_BYTES), the overview and the boxes; not the level. Progress goes to stderr every PROGRESS_SECONDS.

The annotated image of a slide larger than OVERVIEW px is an overview half to all of OVERVIEW px on its long side
(read by chunks from the coarsest level at least that large), and detections.json's record says so; the boxes in
counts.csv and detections.json are in pixels of level 0.
"""
import collections
import importlib
import importlib.util
import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from misc import UserError
from tiling import (BCCD_FIELD, MAX_STREAMED_WINDOWS, RBC_WIDTH, check_scale, field_share, rbc_scale, tile_windows,
                    tiling)
from utils import first_line, resize

INSTALL = "pip install -r requirements-slides.txt"
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs")  # also what find_images takes beside PIL's formats
TIFF_EXTENSIONS = (".tif", ".tiff")  # .ome.tif too
# A red cell is about 7.5 um wide (normal range 6-8.5 um); the model learned them RBC_WIDTH = 106 px wide, so a BCCD
# field has about 7.5 / 106 = 0.071 um per pixel (a 100x oil objective). A slide recording m um per pixel shows red
# cells 7.5 / m px wide at level 0: 30 px at 40x's 0.25 um per pixel, where the model wants 106.
RBC_MICRONS = 7.5
BCCD_MPP = RBC_MICRONS / RBC_WIDTH
MPP_RANGE = (0.01, 10)  # um per pixel outside this are a placeholder (72 or 300 dpi, per inch or per cm), not optics
LEVEL_SLACK = 0.95  # a level whose red cells are 95 % of the model's is taken: pyramids' downsamples are rarely
# exact (OpenSlide's 4.0002), and the plain path itself shrinks cells by up to a fifth (tiling.TILE_ABOVE)
OVERVIEW = 4096  # the annotated image of a slide: at most this many pixels on its long side
CHUNK = 2048  # the overview is read in regions about this many pixels square
CACHE_BYTES = 256 << 20  # decoded tiles kept for the next windows (neighbouring windows overlap by a cell or more)
MAX_SEGMENT_BYTES = 64 << 20  # a tile or strip decoded whole to read a region of it: larger ones are refused
PROGRESS_SECONDS = 5
BACKGROUND = 255  # a tile missing from the file, or transparent in a slide: white, as a slide's glass is


def require(module):
    """Import an optional extra (requirements-slides.txt), or a one-line UserError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading it needs {module}, an optional extra: {INSTALL}") from None


# ---------------------------------------------------------------------------------------------
# The level, by the size of the cells
# ---------------------------------------------------------------------------------------------

class Level(NamedTuple):
    width: int
    height: int
    downsample: tuple  # (x, y) pixels of level 0 per pixel of this level


def choose_level(levels, rbc_width, field=BCCD_FIELD):
    """(index, scale): the coarsest of `levels` where a red cell rbc_width px wide at level 0 is at least about as
    wide as the model's (scale >= LEVEL_SLACK), with the scale there (tiling.rbc_scale); the finest level if none
    is (small cells: windows smaller than the field, enlarged to the model's input)."""
    scales = [rbc_scale(rbc_width / level.downsample[0], field) for level in levels]
    large = [i for i, s in enumerate(scales) if s >= LEVEL_SLACK]
    i = (max(large, key=lambda i: levels[i].downsample[0]) if large
         else min(range(len(levels)), key=lambda i: levels[i].downsample[0]))
    return i, scales[i]


def cell_width(reading, mpp):
    """A red cell's width in pixels of level 0, and where it comes from: the flags, the slide's microns per pixel,
    else BCCD's size."""
    if reading.rbc_width is not None:
        return reading.rbc_width, "--rbc-width/--scale"
    if mpp:
        return RBC_MICRONS / mpp, f"{mpp:.4g} um per pixel recorded"
    return RBC_WIDTH * field_share(reading.field), "no um per pixel recorded: BCCD's size"


def sane_mpp(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if MPP_RANGE[0] <= value <= MPP_RANGE[1] else None


MICRONS = {"µm": 1, "um": 1, "micron": 1, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def tiff_mpp(tif):
    """Microns per pixel of a TIFF's level 0 (tifffile.TiffFile), or None: OME-XML's PhysicalSizeX, an SVS
    description's MPP, else resolution tags in centimetres, millimetres or microns (inches are left: scanners write
    72 or 300 dpi whatever the optics)."""
    import tifffile
    if tif.is_ome:
        try:
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
            size = pixels.get("PhysicalSizeX")
            if size is not None:
                return sane_mpp(float(size) * MICRONS.get(pixels.get("PhysicalSizeXUnit", "µm"), math.nan))
        except (ET.ParseError, StopIteration, TypeError, ValueError):
            pass
    page = tif.pages.first
    if tif.is_svs:
        try:
            return sane_mpp(tifffile.svs_description_metadata(page.description).get("MPP"))
        except (ValueError, KeyError):
            pass
    unit = page.tags.get("ResolutionUnit")
    per_unit = {3: 1e4, 4: 1e3, 5: 1}.get(int(unit.value) if unit is not None else 2)
    if per_unit and page.tags.get("XResolution") is not None:
        x = page.get_resolution()[0]
        return sane_mpp(per_unit / x) if x else None
    return None


# ---------------------------------------------------------------------------------------------
# Sources: levels read by region, uint8 (h, w, 3) arrays
# ---------------------------------------------------------------------------------------------

class TiffSource:
    """A TIFF through tifffile: its series' pyramid levels (one level for a plain TIFF), read by region from the
    tiles or strips the region covers, decoded with imagecodecs where compressed. The tiles decoded last are kept
    (CACHE_BYTES): neighbouring windows share many. A tile that does not decode is read as BACKGROUND and counted
    (self.bad_tiles)."""

    def __init__(self, path):
        tifffile = require("tifffile")
        self.path, self.cache, self.cached, self.bad_tiles = path, collections.OrderedDict(), 0, 0
        try:
            self.tif = tifffile.TiffFile(path)
        except Exception as e:  # tifffile raises many kinds on a damaged file
            raise UserError(f"cannot read as a TIFF ({type(e).__name__}: {first_line(e)})") from None
        try:
            self.pages = [level.keyframe for level in self.tif.series[0].levels]
            self.mpp = tiff_mpp(self.tif)
            w0, h0 = self.pages[0].imagewidth, self.pages[0].imagelength
            self.levels = [Level(p.imagewidth, p.imagelength, (w0 / p.imagewidth, h0 / p.imagelength))
                           for p in self.pages]
        except Exception as e:
            self.close()
            raise UserError(f"cannot read as a TIFF ({type(e).__name__}: {first_line(e)})") from None

    def check(self):
        """A one-line UserError where a level cannot be read by region (check_page), or its tiles not decoded (a
        codec missing: imagecodecs; found here, not as blank tiles all through the run)."""
        for level, page in enumerate(self.pages):
            check_page(page, os.path.getsize(self.path))
            index = next((i for i, n in enumerate(page.databytecounts) if n), None)
            try:
                if index is not None:
                    self.decode(level, index)
            except Exception as e:
                hint = f"; {INSTALL}" if importlib.util.find_spec("imagecodecs") is None else ""
                raise UserError(f"cannot decode its {getattr(page.compression, 'name', page.compression)} tiles "
                                f"({type(e).__name__}: {first_line(e)}){hint}") from None

    def close(self):
        self.tif.close()

    def segment(self, level, index):
        """Tile or strip `index` of a level, decoded: uint8 (h, w, 3)."""
        key = (level, index)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        page = self.pages[level]
        try:
            if not page.databytecounts[index]:  # an empty tile (a sparse TIFF: glass left out), not a damaged one
                raise LookupError
            pixels = self.decode(level, index)
        except Exception as e:  # a damaged tile: the others are read, and the run says how many were not
            self.bad_tiles += not isinstance(e, LookupError)
            pixels = np.full((*segment_shape(page, index), 3), BACKGROUND, np.uint8)
        self.cache[key] = pixels
        self.cached += pixels.nbytes
        while self.cached > CACHE_BYTES and len(self.cache) > 1:
            self.cached -= self.cache.popitem(last=False)[1].nbytes
        return pixels

    def decode(self, level, index):
        """Tile or strip `index` of a level read from the file and decoded (tifffile's own decoder, with imagecodecs
        where compressed): uint8 (h, w, 3). Raises what the decoder raises, ValueError for an empty tile."""
        page = self.pages[level]
        fh = self.tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        jpeg = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression in (6, 7, 34892,
                                                                                                     33007) else {}
        decoded = page.decode(data or None, index, _fullsize=page.is_tiled, **jpeg)[0]
        if decoded is None:
            raise ValueError("an empty tile")
        h, w = segment_shape(page, index)
        pixels = decoded.reshape(decoded.shape[-3:])[:h, :w]
        return np.repeat(pixels, 3, 2) if pixels.shape[2] == 1 else pixels[:, :, :3]

    def read(self, level, x0, y0, x1, y1):
        """The region [x0, x1) x [y0, y1) of a level (inside it): uint8 (y1 - y0, x1 - x0, 3)."""
        page = self.pages[level]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        th, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth)
        across = math.ceil(page.imagewidth / tw)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self.segment(level, row * across + col)
                ty, tx = row * th, col * tw
                ya, yb, xa, xb = max(y0, ty), min(y1, ty + tile.shape[0]), max(x0, tx), min(x1, tx + tile.shape[1])
                out[ya - y0:yb - y0, xa - x0:xb - x0] = tile[ya - ty:yb - ty, xa - tx:xb - tx]
        return out


def segment_shape(page, index):
    """(height, width) of tile or strip `index` of a tifffile page (the last strip may be shorter)."""
    if page.is_tiled:
        return page.tilelength, page.tilewidth
    return min(page.rowsperstrip, page.imagelength - index * page.rowsperstrip), page.imagewidth


def check_page(page, file_size):
    """A level tifffile can read region by region: one 8-bit image (1, 3 or 4 samples, interleaved), all of whose
    tiles lie inside the file (a truncated file is refused here, not halfway through the run)."""
    if page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4) or page.imagedepth > 1:
        raise UserError(f"{page.imagewidth}x{page.imagelength} px of {page.samplesperpixel} {page.dtype} sample(s) "
                        f"per pixel: only 8-bit grey, RGB or RGBA is read; convert it (e.g. vips tiffsave in.tif "
                        f"out.tif --tile --pyramid --compression jpeg)")
    photometric, compression = int(page.photometric), int(page.compression)
    if photometric not in (1, 2, 6) or (photometric == 6 and compression not in (7, 33003, 33005, 34712)):
        name = getattr(page.photometric, "name", photometric)  # palette, CMYK, MinIsWhite would read as wrong colours
        raise UserError(f"its pixels are {name} ({'compression ' + str(compression) + ', ' if photometric == 6 else ''}"
                        f"not read here): only grey, RGB or JPEG's YCbCr; convert it (vips tiffsave in.tif out.tif "
                        f"--tile --pyramid --compression jpeg)")
    if page.planarconfig == 2 and page.samplesperpixel > 1:
        raise UserError("samples stored by plane (PlanarConfiguration 2): convert it (vips tiffsave in.tif out.tif "
                        "--tile --pyramid --compression jpeg)")
    (h, w), samples = segment_shape(page, 0), page.samplesperpixel
    if h * w * max(samples, 3) > MAX_SEGMENT_BYTES:  # a whole image in one strip (tifffile's and PIL's default)
        kind = "tiles" if page.is_tiled else "strips"
        raise UserError(f"its {page.imagewidth}x{page.imagelength} px level is stored in {kind} of {w}x{h} px, too "
                        f"large to read by region in little memory: convert it (vips tiffsave in.tif out.tif --tile "
                        f"--pyramid --compression jpeg)")
    offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
    if len(offsets) != math.prod(page.chunked) or (len(offsets) and (offsets + counts).max() > file_size):
        raise UserError(f"truncated: the tiles of its {page.imagewidth}x{page.imagelength} px level reach past the "
                        f"end of the file ({file_size:,} bytes)")


class OpenSlideSource:
    """A whole-slide scan through OpenSlide (.svs, .ndpi, .mrxs): its levels, read by region; transparent parts (an
    MRXS's unscanned glass) as BACKGROUND."""

    def __init__(self, path):
        openslide = require("openslide")
        self.path, self.open = path, openslide.OpenSlide
        try:
            self.slide = openslide.OpenSlide(path)
        except Exception as e:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise UserError(f"cannot read as a slide ({type(e).__name__}: {first_line(e)})") from None
        self.levels = [Level(w, h, (d, d)) for (w, h), d in zip(self.slide.level_dimensions,
                                                                 self.slide.level_downsamples)]
        self.mpp, self.bad_tiles = sane_mpp(self.slide.properties.get("openslide.mpp-x")), 0

    def close(self):
        self.slide.close()

    def check(self):
        pass

    def read(self, level, x0, y0, x1, y1):
        d = self.levels[level].downsample[0]
        try:
            region = self.slide.read_region((round(x0 * d), round(y0 * d)), level, (x1 - x0, y1 - y0))  # RGBA
        except Exception:  # a damaged tile: as TiffSource does
            self.bad_tiles += 1
            try:  # OpenSlide keeps an error in the handle: every later read would fail too
                self.slide.close()
                self.slide = self.open(self.path)
            except Exception:
                pass
            return np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)
        out = Image.new("RGB", region.size, (BACKGROUND,) * 3)
        out.paste(region, mask=region.getchannel("A"))
        return np.array(out)  # writable, as torch.from_numpy wants


class ArraySource:
    """An image read whole (--max-pixels), uint8 (3, H, W): one level."""

    def __init__(self, image):
        self.image, self.mpp, self.bad_tiles = image, None, 0
        self.levels = [Level(image.shape[2], image.shape[1], (1.0, 1.0))]

    def close(self):
        pass

    def read(self, level, x0, y0, x1, y1):
        return self.image[:, y0:y1, x0:x1].permute(1, 2, 0).numpy()


def open_source(path, kind):
    return OpenSlideSource(path) if kind == "openslide" else TiffSource(path)


# ---------------------------------------------------------------------------------------------
# The plan of a slide, its windows read one at a time, its overview
# ---------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    """What files.ImageFiles gives for a slide (picklable, for DataLoader workers): where and how to read it."""
    path: str
    kind: str  # "tiff", "openslide", or "array" (image holds it)
    level: int
    levels: list
    tiles: object  # the Tiling at that level
    windows: list  # at that level; None: the level is resized whole
    why: str  # where the cells' size comes from, and the scale
    image: object = None


class Overview(NamedTuple):
    """A slide's annotated image, downscaled: image (PIL), factor (x, y) of its pixels per pixel of level 0, and
    what detections.json's record says of the slide (files.Results.add)."""
    image: object
    factor: tuple
    record: dict


def kind_of(path):
    """How a file is read: 'openslide', 'tiff' (a TIFF, which plan() may still hand to PIL), or None (PIL)."""
    ext = os.path.splitext(path)[1].lower()
    return "openslide" if ext in OPENSLIDE_EXTENSIONS else "tiff" if ext in TIFF_EXTENSIONS else None


def plan(path, reading, tiles, pil_limit):
    """How to read `path`: None where PIL reads it as before (not a slide; a TIFF with one level within PIL's
    limit; any TIFF without tifffile installed, or with --tile off), else (its Plan, overview(source)). A file that
    cannot be read this way is a one-line UserError."""
    kind = kind_of(path)
    if kind is None or (kind == "tiff" and (tiles is None or importlib.util.find_spec("tifffile") is None)):
        return None
    if tiles is None:
        raise UserError("--tile off resizes an image whole; a whole slide cannot be: give --tile auto")
    try:
        source = open_source(path, kind)
    except UserError:
        if kind == "tiff":  # PIL may read what tifffile does not; else PIL's error names the file
            return None
        raise
    try:
        level0 = source.levels[0]
        if kind == "tiff" and len(source.levels) == 1 and level0.width * level0.height <= pil_limit:
            return None  # a plain TIFF: as before, whatever its kind of samples
        source.check()
        return plan_source(path, kind, source, reading, tiles), overview(source)
    finally:
        source.close()


def plan_source(path, kind, source, reading, tiles, image=None):
    """The Plan of an open source: its level and the windows there (see the module's docstring)."""
    if reading.auto:
        width, why = cell_width(reading, source.mpp)
        level, scale = choose_level(source.levels, width, reading.field)
        check_scale(scale, f"red cells {width:.0f} px wide at full resolution ({why})")
        tiles, why = tiling(reading.field, scale=scale), f"red cells {width:.3g} px wide ({why}), scale {scale:.3g}"
    else:
        level, why = 0, f"--tile {tiles.window[0]}x{tiles.window[1]} at full resolution"
    size = source.levels[level][:2]
    windows = tile_windows(*size, tiles, limit=MAX_STREAMED_WINDOWS)
    return Plan(path, kind, level, source.levels, tiles, windows, why, image)


def overview(source):
    """The slide's overview, uint8 RGB PIL image at most OVERVIEW px on its long side, and (x, y) its pixels per
    pixel of level 0: the coarsest level at least OVERVIEW px on its long side (else level 0) reduced by a whole
    factor, read by chunks aligned to it (Image.reduce averages whole blocks: no seams)."""
    levels = source.levels
    large = [i for i, lv in enumerate(levels) if max(lv.width, lv.height) >= OVERVIEW]
    level = max(large, key=lambda i: levels[i].downsample[0]) if large else 0
    w, h = levels[level].width, levels[level].height
    r = math.ceil(max(w, h) / OVERVIEW)
    step = r * math.ceil(CHUNK / r)
    out = Image.new("RGB", (math.ceil(w / r), math.ceil(h / r)))
    for y in range(0, h, step):
        for x in range(0, w, step):
            chunk = Image.fromarray(source.read(level, x, y, min(x + step, w), min(y + step, h)))
            out.paste(chunk.reduce(r) if r > 1 else chunk, (x // r, y // r))
    return out, (out.width / levels[0].width, out.height / levels[0].height)


def window_inputs(plan, name, errors):
    """The model's inputs for a slide's windows, uint8 (3, 300, 300), read one window at a time as they are asked
    for: each the region the window covers, resized exactly as tiling.prepare does a window of an image held whole
    (utils.resize of the window, moved to the region's corner). Progress on stderr every PROGRESS_SECONDS; at the
    end a note of the level and windows, and a damaged tile added to `errors`. The slide is opened again here, at once
    (a handle does not cross processes): a one-line UserError where it no longer opens as planned."""
    source = ArraySource(plan.image) if plan.kind == "array" else open_source(plan.path, plan.kind)
    if source.levels != plan.levels:
        source.close()
        raise UserError("changed while the run was reading it (its levels differ from a moment before): count it again")
    return read_windows(plan, source, name, errors)


def read_windows(plan, source, name, errors):
    """window_inputs' stream, from the open source."""
    level = plan.levels[plan.level]
    windows = plan.windows or [(0, 0, level.width, level.height)]
    no_boxes = torch.zeros(0, 4)
    start = last = time.perf_counter()
    try:
        for n, (x0, y0, x1, y1) in enumerate(windows):
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, level.width), min(y1, level.height)
            region = np.ascontiguousarray(source.read(plan.level, ix0, iy0, ix1, iy1))
            region = torch.from_numpy(region).permute(2, 0, 1)  # (3, h, w), as utils.resize takes an image
            yield resize(region, (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0), no_boxes)[0]
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS and n + 1 < len(windows):
                left = (now - start) / (n + 1) * (len(windows) - n - 1)
                print(f"{name}: {n + 1:,} of {len(windows):,} windows, about {duration(left)} left", file=sys.stderr,
                      flush=True)
                last = now
    finally:
        source.close()
    if source.bad_tiles:
        errors.append(f"{name}: {source.bad_tiles} tile(s) of level {plan.level} could not be decoded (damaged?), "
                      f"read as blank: its counts miss the cells there")
    print(f"note: {name}: level {plan.level} ({level.width}x{level.height} px, 1/{level.downsample[0]:.4g}), "
          f"{plan.why}: {len(windows):,} window(s) in {duration(time.perf_counter() - start)}", file=sys.stderr,
          flush=True)


def duration(seconds):
    return (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400
            else f"{seconds / 3600:.1f} h")


def record_of(plan, overview_image, factor):
    """What detections.json's record says of a slide, beside its boxes in pixels of level 0."""
    level, full = plan.levels[plan.level], plan.levels[0]
    record = {"width": full.width, "height": full.height, "level": {
        "index": plan.level, "width": level.width, "height": level.height, "downsample": round(level.downsample[0], 4)}}
    if overview_image.size != (full.width, full.height):
        record["overview"] = {"width": overview_image.width, "height": overview_image.height, "note": "the annotated "
                              "image is this overview, downscaled; the boxes are in pixels of the full image"}
    return record
